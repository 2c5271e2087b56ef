"""Documents -> Megatron indexed datasets (the engine of tools/preprocess_data.py).

Inputs are JSON lines (plain, .gz, .zst), parquet, Arrow or a `datasets` directory
(data/sources.py turns rows into JSON lines of the fields asked for, so every form of the same
documents gives the same bytes).

Outputs follow Megatron-LM's naming, `{output_prefix}_{key}_document.bin/.idx`, or with a
language key one dataset per language, `{output_prefix}_{lang}_{key}_document`. Workers
tokenize chunks of lines; results are consumed in input order, so the bytes written do not
depend on the number of workers. Everything is written to temporary names and renamed at the
end: a failed run leaves no partial dataset behind.
"""
from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field

import numpy as np

from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.indexed import IndexedOutputs, token_dtype
from megatron_ext.data.jsonl import EncodeStats, check_io, encoded_lines
from megatron_ext.data.sources import check_inputs, read_chunks
from megatron_ext.data.tokenizer import build_tokenizer

_LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_W: dict = {}  # per-process worker state: tokenizer and options


@dataclass
class PreprocessStats(EncodeStats):
    documents: int = 0
    empty: int = 0
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # "[lang/]key" -> prefix
    tokens_by_output: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens {self.source()}: "
                f"{self.per_second(self.input_bytes / 1e6):.2f} MB/s, "
                f"{self.per_second(self.tokens):,.0f} tokens/s"
                + (f"; skipped {len(self.skipped)} bad line(s)" if self.skipped else "")
                + (f"; {self.empty} empty document(s) left out" if self.empty else ""))


def output_prefix(prefix: str, key: str, lang: str | None = None) -> str:
    return f"{prefix}_{lang}_{key}_document" if lang else f"{prefix}_{key}_document"


def _init_worker(tokenizer_type, tokenizer_model, keys, lang_key, append_eod, dtype):
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _W.update(tok=tok, keys=keys, lang_key=lang_key, eod=tok.eod if append_eod else None, dtype=dtype)


def _encode_line(raw: bytes, where: str):
    """-> ("ok", lang, [ids per key]) | ("empty",) | ("bad", "FILE:LINE: reason")."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return ("bad", f"{where}: invalid JSON")
    if not isinstance(obj, dict):
        return ("bad", f"{where}: not a JSON object")
    lang = None
    if _W["lang_key"]:
        lang = obj.get(_W["lang_key"])
        if not isinstance(lang, str) or not _LANG_RE.match(lang):
            return ("bad", f"{where}: missing or invalid language key '{_W['lang_key']}'")
    arrays = []
    for key in _W["keys"]:
        if key not in obj:
            return ("bad", f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            return ("bad", f"{where}: key '{key}' is not a string")
        ids = _W["tok"].tokenize(obj[key]) if obj[key] else []
        if ids and _W["eod"] is not None:
            ids.append(_W["eod"])
        arrays.append(np.asarray(ids, dtype=_W["dtype"]))
    if all(a.size == 0 for a in arrays):
        return ("empty",)
    return ("ok", lang, arrays)


def preprocess(inputs, out_prefix: str, *, tokenizer_type: str = "SentencePieceTokenizer",
               tokenizer_model=None, json_keys=("text",), lang_key: str | None = None,
               append_eod: bool = False, workers: int = 1, on_bad_line: str = "stop",
               progress: bool = True, chunk_bytes: int = 1 << 18) -> PreprocessStats:
    if on_bad_line not in ("stop", "skip"):
        raise DataConfigError(f"--on-bad-line {on_bad_line}: expected 'stop' or 'skip'")
    keys = tuple(json_keys)
    columns = keys + ((lang_key,) if lang_key and lang_key not in keys else ())
    inputs = check_inputs(check_io(inputs, out_prefix, workers, dirs=True), columns)
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    init = (tokenizer_type, tokenizer_model, keys, lang_key, append_eod, dtype)

    stats = PreprocessStats()
    t0 = time.perf_counter()
    with IndexedOutputs() as outputs, encoded_lines(
            inputs, _encode_line, _init_worker, init, workers=workers, chunk_bytes=chunk_bytes,
            progress=progress, desc="preprocess",
            reader=functools.partial(read_chunks, columns=columns)) as lines:
        for _, _, nbytes, res in lines:
            stats.input_bytes += nbytes
            if res[0] == "bad":
                if on_bad_line == "stop":
                    raise DataConfigError(f"{res[1]} (--on-bad-line skip skips such lines)")
                stats.skipped.append(res[1])
                continue
            if res[0] == "empty":
                stats.empty += 1
                continue
            _, lang, arrays = res
            for key, arr in zip(keys, arrays):
                name = f"{lang}/{key}" if lang else key
                if name not in outputs:
                    outputs.add(name, output_prefix(out_prefix, key, lang), dtype)
                    stats.tokens_by_output[name] = 0
                outputs[name].add_document(arr, [arr.size])
                stats.tokens += arr.size
                stats.tokens_by_output[name] += arr.size
            stats.documents += 1
        if not outputs.builders:
            raise DataConfigError(f"--input {' '.join(inputs)}: no documents found")
        outputs.finalize()
        stats.outputs = outputs.publish()
    stats.seconds = time.perf_counter() - t0
    return stats
