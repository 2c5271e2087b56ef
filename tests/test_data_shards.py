"""Manifest preprocessing in shards (the tasks of slurm/preprocess.sbatch), run in-process:
the merged datasets equal one process over each source's files, byte for byte; a re-run redoes
only unfinished shards; the final step refuses to merge an incomplete set."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import REPO, load_tool

CORPUS = REPO / "data" / "corpus"
preprocess_data = load_tool("preprocess_data")


def write_manifest(d: Path) -> Path:
    """Source 'mixed': de as parquet then fr as JSON lines (two shards); 'ja': one JSONL.zst."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    with gzip.open(CORPUS / "de.valid.jsonl.gz", "rt", encoding="utf-8") as f:
        de = [json.loads(line) for line in f if line.strip()]
    pq.write_table(pa.Table.from_pylist(de), d / "a_de.parquet", row_group_size=3)
    (d / "b_fr.jsonl").write_bytes(gzip.decompress((CORPUS / "fr.valid.jsonl.gz").read_bytes()))
    (d / "ja.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        gzip.decompress((CORPUS / "ja.valid.jsonl.gz").read_bytes())))
    manifest = d / "manifest.yaml"
    manifest.write_text(f"""
tokenizer: {{type: SentencePieceTokenizer, model: {REPO}/data/tokenizer/marco_tiny_spm.model}}
sources:
  mixed: {{inputs: ["a_*.parquet", "b_*.jsonl"], prefix: mixed_text_document}}
  ja: ja.jsonl.zst
""")
    return manifest


def _pp(*argv) -> int:
    return preprocess_data.main([*map(str, argv), "--no-progress"])


def one_process_reference(d: Path) -> dict[str, bytes]:
    """Each source's files through one plain --input run."""
    refs = {}
    for name, inputs in (("mixed", [d / "a_de.parquet", d / "b_fr.jsonl"]), ("ja", [d / "ja.jsonl.zst"])):
        assert _pp("--input", *inputs, "--output-prefix", d / f"ref_{name}", "--append-eod") == 0
        refs[name] = b"".join((d / f"ref_{name}_text_document{e}").read_bytes() for e in (".bin", ".idx"))
    return refs


def test_shards_merge_to_one_process_bytes_and_rerun_only_what_is_unfinished(tmp_path, capsys):
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    m = ["--manifest", manifest, "--output-dir", out]
    assert _pp(*m, "--pending") == 0
    assert capsys.readouterr().out.strip() == "0-2"
    for task in (0, 1, 2):
        assert _pp(*m, "--task", task, "--workers", "1") == 0
    log = capsys.readouterr().out
    assert "task 1/3 (source mixed, shard 1, 1 file(s)): 6 documents, 8,309 tokens" in log, log
    assert log.count("documents/s") == 3 and log.count("tokens/s") == 3
    assert _pp(*m, "--finalize") == 0
    summary = capsys.readouterr().out
    assert "source mixed: 2 shard(s)" in summary and "total: 2 source(s)" in summary

    refs = one_process_reference(tmp_path)
    capsys.readouterr()
    merged = {"mixed": out / "mixed_text_document", "ja": out / "ja_text_document"}
    for name, prefix in merged.items():
        got = prefix.with_suffix(".bin").read_bytes() + prefix.with_suffix(".idx").read_bytes()
        assert got == refs[name], f"{name}: merged shards differ from one process"
    import yaml

    listing = yaml.safe_load((out / "prefixes.yaml").read_text())["sources"]
    assert listing["mixed"]["tokens"] == sum(s["tokens"] for s in listing["mixed"]["shards"])
    assert listing["mixed"]["bytes"] == (out / "mixed_text_document.bin").stat().st_size
    assert listing["ja"]["data_path"] == f"{listing['ja']['tokens']} shards/ja/00000_text_document"
    # tools/data_plan.py --output-dir reads the shards' counts.
    curriculum = tmp_path / "c.yaml"
    curriculum.write_text("sources: {mixed: mixed_text_document, ja: ja_text_document}\n"
                          "stages: [{name: one, end: 100K, blend: {mixed: 3, ja: 1}}]\n")
    assert load_tool("data_plan").main([str(manifest), str(curriculum), "--output-dir", str(out)]) == 0
    plan = capsys.readouterr().out
    assert f"| mixed | {listing['mixed']['tokens']:,} (preprocessed) | one | 75,000 |" in plan, plan

    # A killed task 1: its record gone, a temporary left behind. Only task 1 is pending; the
    # final step refuses to merge until it ran; other shards are not rewritten.
    (out / "shards" / "mixed" / "00001.done.json").unlink()
    stale = out / "shards" / "mixed" / "00001_text_document.tmp-99999.bin"
    stale.write_bytes(b"half")
    untouched = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("0000[0]*")}
    assert _pp(*m, "--pending") == 0 and capsys.readouterr().out.strip() == "1"
    assert _pp(*m, "--finalize") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out}: 1 of 3 task(s) not finished (1): run them again (bash slurm/preprocess.sh "
        "submits only those)")
    assert _pp(*m, "--task", "all") == 0
    log = capsys.readouterr().out
    assert log.count("finished before") == 2
    assert "task 1/3 (source mixed, shard 1, 1 file(s)): 6 documents" in log
    assert not stale.exists()
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    # A changed input (another size): its shard is unfinished again.
    with open(tmp_path / "b_fr.jsonl", "a") as f:
        f.write(json.dumps({"text": "Une ligne de plus."}) + "\n")
    assert _pp(*m, "--pending") == 0 and capsys.readouterr().out.strip() == "1"


def test_manifest_errors_are_one_line(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("sources:\n  web: {inputs: 'nothing/*.parquet'}\n")
    (tmp_path / "out").mkdir()
    assert _pp("--manifest", manifest, "--output-dir", tmp_path / "out", "--pending") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {manifest}: source 'web' has no data: no file matches {tmp_path}/nothing/*.parquet")
    manifest.write_text("sources:\n  web: {inputs: a.jsonl, json_keys: [text, title]}\n")
    assert _pp("--manifest", manifest, "--output-dir", tmp_path / "out", "--pending") == 2
    assert "expected one key" in capsys.readouterr().err
    assert _pp("--manifest", manifest, "--output-dir", tmp_path / "none", "--pending") == 2
    assert capsys.readouterr().err.strip() == f"error: --output-dir {tmp_path / 'none'}: no such directory"


@pytest.mark.parametrize("indices,spec", [([], ""), ([3], "3"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8")])
def test_array_spec(indices, spec):
    from megatron_ext.data.shards import array_spec

    assert array_spec(indices) == spec
