"""JSON-lines files: the parallel chunk-encoding driver of the preprocessing tools, and the
deterministic gzip writer of the bundled data sets.

data/preprocess.py (pretraining text, tools/preprocess_data.py) and posttrain/sft_data.py (chat
data, tools/preprocess_chat_data.py) share it: JSON-lines files (.gz too) are read in chunks of
about `chunk_bytes` of non-blank lines; each line is encoded by the caller's module-level
`encode_line(raw, where)` (`where` = "FILE:LINE"), in this process for --workers 1, else by a
pool of worker processes set up by the caller's `init_worker(*init_args)`. Results come back
in input order, so what is written does not depend on --workers. A tqdm bar follows the
input bytes. `encoded_lines` is a context manager: leaving it stops the workers and closes the
bar, on error too. `add_output_args` adds the output and runtime flags both tools share.

`gz_jsonl` / `gzip_bytes` write gzip without timestamp or file name, so the tools that build
data/corpus and data/sft give the same bytes from the same input.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import io
import json
import multiprocessing
import os
from dataclasses import dataclass

from megatron_ext.data.errors import DataConfigError


@dataclass
class EncodeStats:
    """What every preprocessing run counts (the tools' summaries extend it)."""

    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def source(self) -> str:
        """'from X MB in Y s', for the summaries."""
        return f"from {self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s"

    def per_second(self, amount: float) -> float:
        return amount / max(self.seconds, 1e-9)


def check_io(inputs, out_prefix: str, workers: int, dirs: bool = False) -> list[str]:
    """The input files as strings, after the checks both tools make before any work
    (`dirs`: a directory is an input too, e.g. a `datasets` directory: data/sources.py)."""
    inputs = [str(p) for p in inputs]
    for path in inputs:
        if dirs and os.path.isdir(path):
            continue
        if os.path.isdir(path):
            raise DataConfigError(f"--input {path} is a directory; expected a JSON-lines file "
                                  "(.jsonl or .jsonl.gz)")
        if not os.path.isfile(path):
            raise DataConfigError(f"--input {path}: no such file")
    if workers < 1:
        raise DataConfigError(f"--workers {workers}: must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    if not os.path.isdir(out_dir):
        raise DataConfigError(f"--output-prefix {out_prefix}: directory {out_dir} does not exist")
    return inputs


def open_lines(path: str, raw):
    """A binary line reader over `raw` (the open file): decompressed for .gz and .zst."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
    return raw


def _zstd_errors(path: str) -> tuple:
    if not path.endswith(".zst"):
        return ()
    import zstandard

    return (zstandard.ZstdError,)


def jsonl_chunks(path: str, chunk_bytes: int, bar=None):
    """One JSON-lines file (plain, .gz or .zst) as (path, [(line number, raw line)]) chunks of
    about chunk_bytes; blank lines skipped; the progress bar advances by compressed bytes."""
    with open(path, "rb") as raw:
        lines, size, last = [], 0, 0
        try:
            for n, line in enumerate(open_lines(path, raw), 1):
                if not line.strip():
                    continue
                lines.append((n, line))
                size += len(line)
                if size >= chunk_bytes:
                    yield path, lines
                    lines, size = [], 0
                    if bar is not None:
                        bar.update(raw.tell() - last)
                        last = raw.tell()
        except (OSError, EOFError, *_zstd_errors(path)) as e:
            raise DataConfigError(f"--input {path}: cannot read ({e})") from None
        if lines:
            yield path, lines
        if bar is not None:
            bar.update(os.path.getsize(path) - last)


def read_chunks(inputs: list[str], chunk_bytes: int, bar=None):
    """Yield (path, [(line number, raw line)]) with about chunk_bytes per chunk; blank lines skipped."""
    for path in inputs:
        yield from jsonl_chunks(path, chunk_bytes, bar)


def _input_bytes(path: str) -> int:
    """Size of an input file, or of the files of an input directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _encode_chunk(encode_line, chunk):
    path, lines = chunk
    return [(path, n, len(raw), encode_line(raw, f"{path}:{n}")) for n, raw in lines]


@contextlib.contextmanager
def encoded_lines(inputs: list[str], encode_line, init_worker, init_args: tuple, *, workers: int = 1,
                  chunk_bytes: int = 1 << 18, progress: bool = True, desc: str = "preprocess",
                  reader=None):
    """Yield an iterator of (path, line number, line bytes, encode_line's result), in input order.
    `reader(inputs, chunk_bytes, bar)` yields the chunks (default `read_chunks`; data/sources.py
    reads parquet and Arrow rows as JSON lines of the fields asked for)."""
    bar = pool = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(_input_bytes(p) for p in inputs), unit="B", unit_scale=True,
                   desc=desc, dynamic_ncols=True, disable=None)  # None: TTY only
    try:
        chunks = (reader or read_chunks)(inputs, chunk_bytes, bar)
        encode = functools.partial(_encode_chunk, encode_line)
        if workers == 1:
            init_worker(*init_args)
            results = map(encode, chunks)
        else:
            pool = _worker_context(encode_line).Pool(workers, init_worker, init_args)
            results = pool.imap(encode, chunks)
        yield (line for chunk in results for line in chunk)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()


def _worker_context(encode_line):
    """Pool workers forked by a fork server, not by this process. A fork of the caller
    copies whatever it holds mid-flight: a test process or a trainer holds hundreds of gloo
    threads (and their locks) and the trainer's save-and-stop SIGTERM handler. Two CI runs hung
    in Pool.terminate(): a forked worker blocked on a lock no thread would release, or swallowed
    the SIGTERM that should stop it. The fork server is a fresh, single-threaded interpreter
    with default handlers. It imports the caller's module and Megatron-Core's text tokenizers (every
    tool's workers build one) once, when it starts (seconds), so that each worker it forks starts
    in milliseconds. Where there is no fork server (not POSIX), spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [encode_line.__module__, "megatron_ext.data.tokenizer", "megatron.core.tokenizers.text"])
    return context


def add_output_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The tools' output and runtime flags: --output-prefix, --workers, --no-progress."""
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=required, default=None,
                   help="path prefix of the output files")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _deterministic_gzip(buf: io.BytesIO) -> gzip.GzipFile:
    return gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9)


def gzip_bytes(data: bytes) -> bytes:
    """`data` gzipped without timestamp or file name (the same data, the same bytes)."""
    buf = io.BytesIO()
    with _deterministic_gzip(buf) as gz:
        gz.write(data)
    return buf.getvalue()


def gz_jsonl(records) -> bytes:
    """Records as gzipped JSON lines (UTF-8, sorted keys), byte-for-byte reproducible."""
    buf = io.BytesIO()
    with _deterministic_gzip(buf) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode())
    return buf.getvalue()
