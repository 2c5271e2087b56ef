"""JSON lines -> Megatron indexed datasets (the engine of tools/preprocess_data.py).

Outputs follow Megatron-LM's naming, `{output_prefix}_{key}_document.bin/.idx`, or with a
language key one dataset per language, `{output_prefix}_{lang}_{key}_document`. Workers
tokenize chunks of lines; results are consumed in input order, so the bytes written do not
depend on the number of workers. Everything is written to temporary names and renamed at the
end: a failed run leaves no partial dataset behind.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from megatron_ext.data.errors import DataConfigError

_LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_W: dict = {}  # per-process worker state: tokenizer and options


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # "[lang/]key" -> prefix
    tokens_by_output: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.documents} documents, {self.tokens} tokens from "
                f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s: "
                f"{self.input_bytes / 1e6 / s:.2f} MB/s, {self.tokens / s:,.0f} tokens/s"
                + (f"; skipped {len(self.skipped)} bad line(s)" if self.skipped else "")
                + (f"; {self.empty} empty document(s) left out" if self.empty else ""))


def output_prefix(prefix: str, key: str, lang: str | None = None) -> str:
    return f"{prefix}_{lang}_{key}_document" if lang else f"{prefix}_{key}_document"


def _init_worker(tokenizer_type, tokenizer_model, keys, lang_key, append_eod, dtype):
    from megatron_ext.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _W.update(tok=tok, keys=keys, lang_key=lang_key, eod=tok.eod if append_eod else None, dtype=dtype)


def _encode_line(raw: bytes):
    """-> ("ok", lang, [ids per key]) | ("empty",) | ("bad", reason)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return ("bad", "invalid JSON")
    if not isinstance(obj, dict):
        return ("bad", "not a JSON object")
    lang = None
    if _W["lang_key"]:
        lang = obj.get(_W["lang_key"])
        if not isinstance(lang, str) or not _LANG_RE.match(lang):
            return ("bad", f"missing or invalid language key '{_W['lang_key']}'")
    arrays = []
    for key in _W["keys"]:
        if key not in obj:
            return ("bad", f"missing key '{key}'")
        if not isinstance(obj[key], str):
            return ("bad", f"key '{key}' is not a string")
        ids = _W["tok"].tokenize(obj[key]) if obj[key] else []
        if ids and _W["eod"] is not None:
            ids.append(_W["eod"])
        arrays.append(np.asarray(ids, dtype=_W["dtype"]))
    if all(a.size == 0 for a in arrays):
        return ("empty",)
    return ("ok", lang, arrays)


def _encode_chunk(chunk):
    file_index, lines = chunk
    return file_index, [(n, len(raw), _encode_line(raw)) for n, raw in lines]


def _read_chunks(inputs, chunk_bytes, bar):
    """Yield (file index, [(line number, raw line)]) with about chunk_bytes per chunk."""
    for fi, path in enumerate(inputs):
        with open(path, "rb") as raw:
            fh = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            lines, size, last = [], 0, 0
            try:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    lines.append((n, line))
                    size += len(line)
                    if size >= chunk_bytes:
                        yield fi, lines
                        lines, size = [], 0
                        if bar is not None:
                            bar.update(raw.tell() - last)
                            last = raw.tell()
            except (OSError, EOFError) as e:
                raise DataConfigError(f"--input {path}: cannot read ({e})")
            if lines:
                yield fi, lines
            if bar is not None:
                bar.update(os.path.getsize(path) - last)


def preprocess(inputs, out_prefix: str, *, tokenizer_type: str = "SentencePieceTokenizer",
               tokenizer_model=None, json_keys=("text",), lang_key: str | None = None,
               append_eod: bool = False, workers: int = 1, on_bad_line: str = "stop",
               progress: bool = True, chunk_bytes: int = 1 << 18) -> PreprocessStats:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ext.data.indexed import token_dtype
    from megatron_ext.data.tokenizer import build_tokenizer

    inputs = [str(p) for p in inputs]
    for path in inputs:
        if not os.path.isfile(path):
            raise DataConfigError(f"--input {path}: no such file")
    if on_bad_line not in ("stop", "skip"):
        raise DataConfigError(f"--on-bad-line {on_bad_line}: expected 'stop' or 'skip'")
    if workers < 1:
        raise DataConfigError(f"--workers {workers}: must be >= 1")
    keys = tuple(json_keys)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    if not os.path.isdir(out_dir):
        raise DataConfigError(f"--output-prefix {out_prefix}: directory {out_dir} does not exist")
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    init = (tokenizer_type, tokenizer_model, keys, lang_key, append_eod, dtype)

    stats, builders, tag = PreprocessStats(), {}, f".tmp-{os.getpid()}"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(os.path.getsize(p) for p in inputs), unit="B", unit_scale=True,
                   desc="preprocess", dynamic_ncols=True, disable=None)  # None: TTY only
    pool = None
    t0 = time.perf_counter()
    try:
        chunks = _read_chunks(inputs, chunk_bytes, bar)
        if workers == 1:
            _init_worker(*init)
            results = map(_encode_chunk, chunks)
        else:
            # fork: workers inherit the imported modules instead of re-importing Megatron.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, init)
            results = pool.imap(_encode_chunk, chunks)
        for fi, encoded in results:
            for n, nbytes, res in encoded:
                stats.input_bytes += nbytes
                if res[0] == "bad":
                    where = f"{inputs[fi]}:{n}: {res[1]}"
                    if on_bad_line == "stop":
                        raise DataConfigError(f"{where} (--on-bad-line skip skips such lines)")
                    stats.skipped.append(where)
                    continue
                if res[0] == "empty":
                    stats.empty += 1
                    continue
                _, lang, arrays = res
                for key, arr in zip(keys, arrays):
                    name = f"{lang}/{key}" if lang else key
                    if name not in builders:
                        final = output_prefix(out_prefix, key, lang)
                        builders[name] = (IndexedDatasetBuilder(f"{final}{tag}.bin", dtype=dtype), final)
                        stats.tokens_by_output[name] = 0
                    builders[name][0].add_document(arr, [arr.size])
                    stats.tokens += arr.size
                    stats.tokens_by_output[name] += arr.size
                stats.documents += 1
        if not builders:
            raise DataConfigError(f"--input {' '.join(inputs)}: no documents found")
        for name, (builder, final) in builders.items():
            builder.finalize(f"{final}{tag}.idx")
        for name, (builder, final) in sorted(builders.items()):
            os.replace(f"{final}{tag}.bin", f"{final}.bin")
            os.replace(f"{final}{tag}.idx", f"{final}.idx")  # last: .idx marks a complete pair
            stats.outputs[name] = final
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        for builder, final in builders.values():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(f"{final}{tag}{ext}"):
                    os.remove(f"{final}{tag}{ext}")
    stats.seconds = time.perf_counter() - t0
    return stats
