"""Released-corpus inputs of tools/preprocess_data.py: JSON lines (plain, .gz, .zst), parquet,
Arrow and `datasets` directories give the same .bin/.idx bytes; bad inputs are one line."""
from __future__ import annotations

import gzip
import json

import pytest
from conftest import REPO, load_tool

CORPUS = REPO / "data" / "corpus"
preprocess_data = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def rows():
    """Documents of two languages; 'content' holds the text, other columns ride along."""
    out = []
    for lang in ("de", "ja"):
        with gzip.open(CORPUS / f"{lang}.valid.jsonl.gz", "rt", encoding="utf-8") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return [{"id": i, "content": r["text"], "lang": r["lang"], "source": r["source"]}
            for i, r in enumerate(out)]


def _forms(rows, d):
    """The same rows in every input form; -> {form: [input paths]}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    (d / "a.jsonl").write_bytes(lines)
    (d / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    half = len(rows) // 2
    # Columns in another order, several row groups, two files.
    for k, part in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist([dict(reversed(list(r.items()))) for r in part])
        pq.write_table(table, d / f"p{k}.parquet", row_group_size=5)
        with pa.ipc.new_file(d / f"f{k}.arrow", table.schema) as w:  # IPC file format
            w.write_table(table, max_chunksize=4)
    datasets.Dataset.from_list(rows).save_to_disk(str(d / "ds"), num_shards=3)
    stream = sorted((d / "ds").glob("*.arrow"))  # the datasets cache form: IPC streams
    return {"jsonl": [d / "a.jsonl"], "gz": [d / "a.jsonl.gz"], "zst": [d / "a.jsonl.zst"],
            "parquet": [d / "p0.parquet", d / "p1.parquet"],
            "arrow_file": [d / "f0.arrow", d / "f1.arrow"], "arrow_stream": stream,
            "datasets_dir": [d / "ds"], "mixed": [d / "p0.parquet", d / "f1.arrow"]}


def _run(inputs, prefix, *extra):
    return preprocess_data.main(["--input", *map(str, inputs), "--output-prefix", str(prefix),
                                 "--json-keys", "content", "--append-eod", "--no-progress",
                                 *extra])


def test_every_input_form_gives_identical_bin_and_idx(tmp_path, rows, capsys):
    forms = _forms(rows, tmp_path)
    out = {}
    for form, inputs in forms.items():
        for workers in ("1", "2") if form == "parquet" else ("1",):
            prefix = tmp_path / f"out_{form}_{workers}"
            assert _run(inputs, prefix, "--workers", workers) == 0, capsys.readouterr().err
            doc = tmp_path / f"out_{form}_{workers}_content_document"
            out[form, workers] = (doc.with_suffix(".bin").read_bytes(),
                                  doc.with_suffix(".idx").read_bytes())
    reference = out["jsonl", "1"]
    assert len(reference[0]) > 20_000
    for key, data in out.items():
        assert data == reference, f"{key} differs from the JSON-lines output"
    # --lang-key names a column too: one dataset per language, as from JSON lines.
    for form in ("jsonl", "parquet"):
        assert _run(forms[form], tmp_path / f"lang_{form}", "--lang-key", "lang") == 0
    for lang in ("de", "ja"):
        a, b = (tmp_path / f"lang_{f}_{lang}_content_document.bin" for f in ("jsonl", "parquet"))
        assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 1000


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_columnar_inputs_are_one_line_naming_the_file(tmp_path, rows, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:4]), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all PAR1")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_bytes(b"")
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]).slice(0, 0), no_rows)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"content": [1, 2]}), numbers)
    cases = [
        ([good, bad], f"error: --input {bad}: not a readable parquet file ("),
        ([good, empty], f"error: --input {empty}: empty file"),
        ([empty_jsonl], f"error: --input {empty_jsonl}: empty file"),
        ([no_rows], f"error: --input {no_rows}: holds no rows"),
        ([numbers], f"error: --input {numbers}: column 'content' holds int64, expected strings"),
    ]
    for inputs, expected in cases:
        assert _run(inputs, tmp_path / "o") == 2
        assert _one_error_line(capsys).startswith(expected)
    # A missing column names the file and the columns it has.
    assert preprocess_data.main(["--input", str(good), "--output-prefix", str(tmp_path / "o"),
                                 "--json-keys", "text", "--no-progress"]) == 2
    assert _one_error_line(capsys) == (f"error: --input {good}: no column 'text' "
                                       "(columns: id, content, lang, source)")
    # A null text is a bad row, located like a bad line: FILE:row N.
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"content": ["one", None, "three"]}), nulls)
    assert _run([nulls], tmp_path / "o") == 2
    assert _one_error_line(capsys) == (f"error: {nulls}:row 2: key 'content' is not a string "
                                       "(--on-bad-line skip skips such lines)")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []


def test_dataset_dict_and_bare_directory_are_named(tmp_path, rows, capsys):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3])}).save_to_disk(
        str(tmp_path / "dd"))
    capsys.readouterr()
    assert _run([tmp_path / "dd"], tmp_path / "o") == 2
    assert _one_error_line(capsys) == (f"error: --input {tmp_path / 'dd'}: a DatasetDict; give one "
                                       f"split's directory ({tmp_path / 'dd' / 'train'})")
    assert _run([tmp_path / "dd" / "train"], tmp_path / "o") == 0
    (tmp_path / "bare").mkdir()
    assert _run([tmp_path / "bare"], tmp_path / "o") == 2
    assert "a directory without state.json" in _one_error_line(capsys)
