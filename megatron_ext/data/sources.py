"""Input documents of the preprocessing tools, whatever form a corpus is released in.

Forms, told apart by name:
  JSON lines          anything else: .jsonl/.json, compressed as .gz or .zst (zstandard)
  parquet             *.parquet: streamed one record batch at a time with pyarrow, reading only
                      the columns asked for; memory is bounded by one row group's column chunks
                      (measured: bench/bench_parquet_memory.py), not by the file
  Arrow               *.arrow: an Arrow IPC stream (the `datasets` cache) or file, memory-mapped
  `datasets` dir      a directory written by `Dataset.save_to_disk` (state.json lists its Arrow
                      files in order); read offline, without importing `datasets`

One path for all of them: a row of a columnar file becomes the JSON line of the fields asked for
(`--json-keys`, `--lang-key`: column names there), and the JSON-lines encoder of
data/preprocess.py takes it from there. The same documents in the same order therefore give the
same .bin/.idx bytes in every form (tests/test_data_sources.py). A row is located as
"FILE:row N" (1-based), a line as "FILE:N".

`check_inputs` opens every input before any work and stops with one line naming the file:
an empty file, a parquet/Arrow file that does not parse, a missing or non-string column.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.jsonl import jsonl_chunks, open_lines  # noqa: F401 (open_lines: data/plan.py)

ROWS_PER_BATCH = 1024  # rows decoded at a time from a columnar file


def input_format(path: str) -> str:
    """'datasets' (a directory), 'parquet', 'arrow' or 'jsonl'."""
    if os.path.isdir(path):
        return "datasets"
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl"


def check_inputs(inputs, columns) -> list[str]:
    """The inputs as strings, each checked as described above; `columns` are the fields read
    (--json-keys, then --lang-key)."""
    inputs = [str(p) for p in inputs]
    for path in inputs:
        if not os.path.exists(path):
            raise DataConfigError(f"--input {path}: no such file")
        kind = input_format(path)
        if kind != "datasets" and os.path.getsize(path) == 0:
            raise DataConfigError(f"--input {path}: empty file")
        if kind == "jsonl":
            continue
        for file, schema, rows in _columnar_files(path, kind):
            _check_columns(file, schema, columns)
            if rows == 0:
                raise DataConfigError(f"--input {file}: holds no rows")
    return inputs


def count_rows(path: str) -> int | None:
    """Documents in a columnar input from its metadata (None for JSON lines)."""
    kind = input_format(path)
    if kind == "jsonl":
        return None
    return sum(rows for _, _, rows in _columnar_files(path, kind))


def read_chunks(inputs: list[str], chunk_bytes: int, bar=None, *, columns=("text",)):
    """Yield (path, [(line number or "row N", raw JSON line)]) of about chunk_bytes each, in
    input order (data/jsonl.py's chunk protocol; blank lines skipped)."""
    for path in inputs:
        kind = input_format(path)
        if kind == "jsonl":
            yield from jsonl_chunks(path, chunk_bytes, bar)
        else:
            yield from _row_chunks(path, kind, tuple(columns), chunk_bytes, bar)


def _row_chunks(path: str, kind: str, columns: tuple, chunk_bytes: int, bar):
    for file, _, rows in _columnar_files(path, kind):
        lines, size, row, done = [], 0, 0, 0
        file_bytes = os.path.getsize(file)
        for batch in _batches(file, kind, columns):
            values = [batch.column(c).to_pylist() for c in columns]
            for record in zip(*values):
                row += 1
                line = json.dumps(dict(zip(columns, record)), ensure_ascii=False).encode()
                lines.append((f"row {row}", line))
                size += len(line)
                if size >= chunk_bytes:
                    yield file, lines
                    lines, size = [], 0
            if bar is not None and rows:
                step = file_bytes * row // rows - done
                bar.update(step)
                done += step
        if lines:
            yield file, lines


# ----------------------------------------------------------------------------- columnar files
def _columnar_files(path: str, kind: str):
    """[(file, arrow schema, rows)] of a parquet/Arrow input or a `datasets` directory."""
    files = _dataset_dir_files(path) if kind == "datasets" else [path]
    out = []
    for file in files:
        if input_format(file) == "parquet":
            pf = _parquet(file)
            out.append((file, pf.schema_arrow, pf.metadata.num_rows))
        else:
            schema, rows = _arrow_meta(file)
            out.append((file, schema, rows))
    return out


def _dataset_dir_files(path: str) -> list[str]:
    """The Arrow files of a `Dataset.save_to_disk` directory, in order (state.json)."""
    root = Path(path)
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise DataConfigError(f"--input {path}: a DatasetDict; give one split's directory "
                              f"({', '.join(str(root / s) for s in splits) or 'DIR/train'})")
    state = root / "state.json"
    if not state.is_file():
        raise DataConfigError(f"--input {path}: a directory without state.json: expected one "
                              "written by datasets' save_to_disk")
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DataConfigError(f"--input {state}: not a datasets state.json (no _data_files)") from None
    files = [str(root / n) for n in names]
    for file in files:
        if not os.path.isfile(file):
            raise DataConfigError(f"--input {path}: state.json lists {file}, which is missing")
    if not files:
        raise DataConfigError(f"--input {path}: holds no rows")
    return files


def _parquet(file: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise DataConfigError(f"--input {file}: not a readable parquet file ({_reason(e)})") from None


def _arrow_reader(file: str):
    """(reader, is_stream) of an Arrow IPC stream or file, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source), True
    except pa.ArrowException:
        source.seek(0)
    try:
        return pa.ipc.open_file(source), False
    except pa.ArrowException as e:
        raise DataConfigError(f"--input {file}: not a readable Arrow IPC file ({_reason(e)})") from None


def _arrow_meta(file: str):
    import pyarrow as pa

    reader, stream = _arrow_reader(file)
    try:
        rows = (sum(b.num_rows for b in reader) if stream
                else sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)))
    except pa.ArrowException as e:
        raise DataConfigError(f"--input {file}: not a readable Arrow IPC file ({_reason(e)})") from None
    return reader.schema, rows


def _batches(file: str, kind: str, columns: tuple):
    """Record batches of `columns` (selected and ordered as asked)."""
    import pyarrow as pa

    try:
        if input_format(file) == "parquet":
            yield from _parquet(file).iter_batches(batch_size=ROWS_PER_BATCH, columns=list(columns),
                                                   use_threads=False)
            return
        reader, stream = _arrow_reader(file)
        batches = reader if stream else (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                yield batch.slice(start, ROWS_PER_BATCH).select(list(columns))
    except pa.ArrowException as e:
        raise DataConfigError(f"--input {file}: cannot read ({_reason(e)})") from None


def _check_columns(file: str, schema, columns) -> None:
    import pyarrow as pa

    names = schema.names
    for col in columns:
        if col not in names:
            raise DataConfigError(f"--input {file}: no column '{col}' (columns: {', '.join(names)})")
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise DataConfigError(f"--input {file}: column '{col}' holds {t}, expected strings")


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
