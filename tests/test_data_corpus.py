"""The shipped sample corpus and tokenizer: coverage, size, splits, exact round trip."""
from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
TOKENIZER = REPO / "data" / "tokenizer" / "marco_tiny_spm.model"
MARCO_LANGS = set("en zh ar de es fr ko ja pt tr id it nl pl ru vi th he uk ms "
                  "bn cs ur kk el ro hu ne az".split())


def _records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((CORPUS / "manifest.json").read_text())


def test_corpus_covers_marco_languages_within_size_budget(manifest):
    langs = set(manifest["languages"])
    assert "en" in langs
    assert len(langs & MARCO_LANGS) >= 16  # English + at least 15 others
    assert langs <= MARCO_LANGS
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    assert total <= 5_000_000, f"corpus is {total} bytes, budget 5 MB"


def test_corpus_files_match_manifest_and_splits_are_disjoint(manifest):
    for lang, info in manifest["languages"].items():
        texts = {}
        for split in ("train", "valid"):
            path = CORPUS / f"{lang}.{split}.jsonl.gz"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info[split]["sha256"], path
            recs = _records(path)
            assert len(recs) == info[split]["docs"] >= 1
            assert all(r["lang"] == lang and r["text"].strip() for r in recs)
            assert all(r["source"].startswith(info["package"] + " ") for r in recs)
            texts[split] = {r["text"] for r in recs}
        assert not texts["train"] & texts["valid"], f"{lang}: a document is in both splits"
    for lic in set(manifest["copyright_files"].values()):
        assert (CORPUS / lic).is_file()


def test_tokenizer_ids_and_exact_round_trip_on_every_document():
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert sp.get_piece_size() == 8192
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(4) == "\n"
    n_docs = n_tokens = 0
    for path in sorted(CORPUS.glob("*.jsonl.gz")):
        for rec in _records(path):
            ids = sp.encode(rec["text"])
            assert sp.decode(ids) == rec["text"], f"{path.name}: round trip differs"
            n_docs += 1
            n_tokens += len(ids)
    assert n_docs > 1000 and n_tokens > 1_500_000
    # Unseen scripts go through byte fallback, still exactly.
    for text in ("한국어 텍스트 😀", "  two  spaces\n\n\ttab"):
        assert sp.decode(sp.encode(text)) == text
        assert 0 not in sp.encode(text)  # never <unk>


def test_train_tokenizer_reproduces_shipped_model(tmp_path):
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"),
                        "--output-prefix", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # Trained, then given the ChatML tokens (tools/add_chat_tokens.py): the shipped model, byte
    # for byte, and its metadata records the same edit.
    assert (tmp_path / "tok.model").read_bytes() == TOKENIZER.read_bytes()
    shipped = json.loads((TOKENIZER.parent / "tokenizer_metadata.json").read_text())
    made = json.loads((tmp_path / "tokenizer_metadata.json").read_text())
    assert made["chat_tokens"]["replaced"] == shipped["chat_tokens"]["replaced"]
    assert made["chat_template"] == shipped["chat_template"]


def test_train_tokenizer_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no key"}\n')
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input",
                        str(bad), "--output-prefix", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}:2: expected a JSON object with a string 'text'"
    assert not list(tmp_path.glob("t.*"))
