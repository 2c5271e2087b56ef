"""tools/preprocess_data.py and the prepared sample corpus, read back through Megatron-Core."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
CORPUS = REPO / "data" / "corpus"

import preprocess_data  # noqa: E402  (tools/preprocess_data.py, run in-process)


@pytest.fixture(scope="module")
def sp_tok():
    from megatron_ext.data import build_tokenizer

    return build_tokenizer("SentencePieceTokenizer", None)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from megatron_ext.data import prepare_sample_corpus

    return prepare_sample_corpus(tmp_path_factory.getbasetemp() / "marco-data-cache")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local Hugging Face tokenizer with 70,257 ids (> uint16): byte-level, exact round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab.update({f"<unused{i}>": len(vocab) + i for i in range(70_000)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    out = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _texts(path: Path, key: str = "text") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def _read_back(prefix: str, tok, texts: list[str], dtype) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts)
    assert ds.index.dtype == dtype
    for i, text in enumerate(texts):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1].tolist()) == text, f"{prefix}: document {i} differs"


def test_prepared_sample_corpus_detokenizes_to_source_text(sample, sp_tok, tmp_path_factory):
    from megatron_ext.data import check_indexed_dataset, prepare_sample_corpus

    assert set(sample["train"]) == set(sample["valid"]) and len(sample["train"]) >= 16
    for split in ("train", "valid"):
        for lang, prefix in sample[split].items():
            texts = _texts(CORPUS / f"{lang}.{split}.jsonl.gz")
            _read_back(prefix, sp_tok, texts, np.uint16)
            info = check_indexed_dataset(prefix, "test", sp_tok.vocab_size)
            assert info.num_tokens == sample[f"{split}_tokens"][lang]
    assert sum(sample["train_tokens"].values()) > 1_500_000
    # Second call: a cache hit returning the same prefixes.
    again = prepare_sample_corpus(tmp_path_factory.getbasetemp() / "marco-data-cache")
    assert again == sample


@pytest.mark.slow  # worker pools: an integration test (tests/conftest.py)
def test_workers_give_byte_identical_output(tmp_path, capsys):
    inputs = [str(p) for p in sorted(CORPUS.glob("*.train.jsonl.gz"))]
    for workers in (1, 2):
        rc = preprocess_data.main(["--input", *inputs, "--output-prefix", str(tmp_path / f"w{workers}"),
                                   "--append-eod", "--workers", str(workers)])
        assert rc == 0
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert "MB/s" in summary and "tokens/s" in summary
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        b = (tmp_path / f"w2_text_document{ext}").read_bytes()
        assert a == b
    assert (tmp_path / "w1_text_document.bin").stat().st_size > 3_000_000  # ~2M uint16 tokens


def test_lang_key_and_several_json_keys(tmp_path, sp_tok):
    rows = [{"text": f"Hallo Welt {i}", "title": f"T{i}", "lang": "de"} for i in range(3)]
    rows += [{"text": "Bonjour le monde", "title": "Titre", "lang": "fr"}]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "out"),
                               "--json-keys", "text", "title", "--lang-key", "lang",
                               "--append-eod", "--workers", "2"])
    assert rc == 0
    for lang in ("de", "fr"):
        for key in ("text", "title"):
            texts = [r[key] for r in rows if r["lang"] == lang]
            _read_back(str(tmp_path / f"out_{lang}_{key}_document"), sp_tok, texts, np.uint16)


def test_bad_line_stops_with_file_and_line_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "one"}\n\n{"body": "no text key"}\n{"text": "four"}\n')
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                               "--workers", "2"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {src}:3: missing key 'text' (--on-bad-line skip skips such lines)"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]

    src.write_text('{"text": "one"}\nnot json\n')
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {src}:2: invalid JSON")


def test_bad_line_skip_keeps_the_rest(tmp_path, capsys, sp_tok):
    src = tmp_path / "bad.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write('{"text": "one"}\n{"body": "x"}\n{"text": 7}\n{"text": "four"}\n')
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                               "--on-bad-line", "skip", "--append-eod"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"skipped {src}:2: missing key 'text'" in err
    assert f"skipped {src}:3: key 'text' is not a string" in err
    _read_back(str(tmp_path / "o_text_document"), sp_tok, ["one", "four"], np.uint16)


def test_large_vocab_hf_tokenizer_writes_int32(tmp_path, hf_dir):
    from megatron_ext.data import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_dir))
    assert tok.vocab_size == 70_257 and tok.eod == 256
    src = CORPUS / "ja.valid.jsonl.gz"
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "ja"),
                               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                               str(hf_dir), "--append-eod", "--workers", "2"])
    assert rc == 0
    _read_back(str(tmp_path / "ja_text_document"), tok, _texts(src), np.int32)


def test_bad_tokenizer_is_one_clear_line(tmp_path, capsys):
    from megatron_ext.data import DataConfigError, build_tokenizer

    cases = [
        ("SentencePieceTokenizer", tmp_path / "none.model", "no such SentencePiece model file"),
        ("HuggingFaceTokenizer", tmp_path / "none", "expected a local Hugging Face tokenizer directory"),
        ("HuggingFaceTokenizer", tmp_path, "cannot load as HuggingFaceTokenizer"),
        ("GPT2BPETokenizer", None, "expected one of SentencePieceTokenizer, HuggingFaceTokenizer"),
    ]
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    cases.append(("SentencePieceTokenizer", tmp_path / "garbage.model",
                  "cannot load as SentencePieceTokenizer"))
    for kind, path, expected in cases:
        with pytest.raises(DataConfigError) as e:
            build_tokenizer(kind, path)
        msg = str(e.value)
        assert expected in msg and "\n" not in msg
        if path is not None:
            assert str(path) in msg
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "x"}\n')
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer-model", str(tmp_path / "none.model")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --tokenizer-model {tmp_path / 'none.model'}: no such SentencePiece model file")
