"""The data plan of a manifest and a curriculum (tools/data_plan.py): for every source and
stage, the tokens available, the tokens the stage draws and the epochs that implies.

Tokens available, by the first that applies:
  preprocessed   the shards' records under --output-dir, when every shard of the source finished
  counted        every document tokenized, when the source's files hold at most --count-below bytes
  estimated      from a sample: up to --sample-files files (evenly spaced in the sorted list),
                 the first documents of each, --sample-docs in all. Columnar files know their row
                 count (metadata): tokens = rows x mean tokens per document. JSON lines know their
                 size: tokens = bytes x tokens per byte of the sampled lines (ratio estimator;
                 for .gz/.zst the size is scaled by the sampled part's compression ratio). The
                 error stated is two standard errors of that estimate; it assumes the sampled
                 documents are typical of the rest (the first documents of a file may not be).

A stage of T tokens draws T x w / sum(w) from a source of weight w; epochs = drawn / available.
Errors (one line, exit 2): a source the curriculum blends that the manifest lacks or that has no
files. Warnings: a source drawn more than --max-epochs times over the whole curriculum, a
manifest prefix other than the curriculum's.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.shards import finished
from megatron_ext.data.sources import count_rows, input_format, open_lines, read_chunks


@dataclass(frozen=True)
class Available:
    tokens: float
    how: str  # "preprocessed", "counted" or "estimated"
    error: float = 0.0  # two standard errors, in tokens (estimated only)
    sampled_docs: int = 0

    def describe(self) -> str:
        if self.how != "estimated":
            return f"{human(self.tokens)} ({self.how})"
        return (f"{human(self.tokens)} ± {100 * self.error / max(self.tokens, 1):.1f}% "
                f"(estimated, {self.sampled_docs:,} docs)")


def human(n: float) -> str:
    """130,081 below a million; 1.23M, 4.56B, 5.10T above."""
    if n < 1e6:
        return f"{n:,.0f}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- availability
def _file_bytes(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _documents(path: str, key: str, limit: int | None):
    """The documents of `path` as JSON lines, at most `limit`; -> (iterator, state), state's
    'raw_bytes' filled, for JSON lines, with the bytes read on disk once the iterator ends."""

    state = {"raw_bytes": None}

    def gen():
        n = 0
        if input_format(path) == "jsonl":
            with open(path, "rb") as raw:
                for line in open_lines(path, raw):
                    if not line.strip():
                        continue
                    if limit is not None and n >= limit:
                        state["raw_bytes"] = raw.tell()
                        return
                    n += 1
                    yield line
                state["raw_bytes"] = raw.tell()
        else:
            for _, lines in read_chunks([path], 1 << 16, columns=(key,)):
                for _, line in lines:
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield line

    return gen(), state


def _tokens_of(line: bytes, key: str, tok, eod: bool) -> int:
    import json

    text = json.loads(line).get(key)
    if not isinstance(text, str) or not text:
        return 0
    return len(tok.tokenize(text)) + (1 if eod else 0)


def available(manifest, name: str, tok, *, out_dir: str | None = None,
              count_below: int = 256 << 20, sample_docs: int = 2000, sample_files: int = 16) -> Available:
    src = manifest.sources[name]
    if out_dir:
        recs = [finished(manifest, out_dir, s) for s in manifest.shards() if s.source == name]
        if recs and all(recs):
            return Available(sum(r["tokens"] for r in recs), "preprocessed")
    sizes = {f: _file_bytes(f) for f in src.files}
    if sum(sizes.values()) <= count_below:
        total = 0
        for f in src.files:
            docs, _ = _documents(f, src.json_key, None)
            total += sum(_tokens_of(d, src.json_key, tok, manifest.append_eod) for d in docs)
        return Available(total, "counted")
    return _estimate(manifest, src, tok, sizes, sample_docs, sample_files)


def _estimate(manifest, src, tok, sizes: dict, sample_docs: int, sample_files: int) -> Available:
    files = list(src.files)
    step = max(1, len(files) // sample_files)
    chosen = files[::step][:sample_files]
    per_file = max(1, math.ceil(sample_docs / len(chosen)))
    rows_docs, jsonl_docs, ratios = [], [], {}  # (tokens) / (tokens, bytes) / file -> raw ratio
    for f in chosen:
        docs, state = _documents(f, src.json_key, per_file)
        columnar = input_format(f) != "jsonl"
        read = 0
        for line in docs:
            t = _tokens_of(line, src.json_key, tok, manifest.append_eod)
            read += len(line)
            if columnar:
                rows_docs.append(t)
            else:
                jsonl_docs.append((t, len(line)))
        if not columnar and state["raw_bytes"]:
            ratios[f] = read / state["raw_bytes"]  # uncompressed per on-disk byte
    total, var, n = 0.0, 0.0, len(rows_docs) + len(jsonl_docs)
    col_files = [f for f in files if input_format(f) != "jsonl"]
    if col_files:
        if not rows_docs:
            raise DataConfigError(f"{manifest.path}: source '{src.name}': no document sampled")
        rows = sum(count_rows(f) for f in col_files)
        mean = sum(rows_docs) / len(rows_docs)
        sd = _sd(rows_docs, mean)
        fpc = max(0.0, 1 - len(rows_docs) / rows)
        total += rows * mean
        var += (rows * sd / math.sqrt(len(rows_docs))) ** 2 * fpc
    js_files = [f for f in files if input_format(f) == "jsonl"]
    if js_files:
        if not jsonl_docs:
            raise DataConfigError(f"{manifest.path}: source '{src.name}': no document sampled")
        pooled = sum(ratios.values()) / len(ratios) if ratios else 1.0
        text_bytes = sum(sizes[f] * ratios.get(f, pooled) for f in js_files)
        t_sum = sum(t for t, _ in jsonl_docs)
        b_sum = sum(b for _, b in jsonl_docs)
        r = t_sum / b_sum
        k = len(jsonl_docs)
        resid = sum((t - r * b) ** 2 for t, b in jsonl_docs) / max(k - 1, 1)
        se_r = math.sqrt(resid / k) / (b_sum / k)
        total += text_bytes * r
        var += (text_bytes * se_r) ** 2
    return Available(total, "estimated", 2 * math.sqrt(var), n)


def _sd(values, mean) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Row:
    source: str
    stage: str
    drawn: float
    epochs: float
    epochs_so_far: float


def draws(curriculum) -> dict[str, list[tuple[str, float]]]:
    """source -> [(stage name, tokens drawn)] in stage order."""
    out: dict[str, list] = {}
    for st in curriculum.stages:
        total = sum(st.weights.values())
        for name, w in st.weights.items():
            out.setdefault(name, []).append((st.name, (st.end_tokens - st.start_tokens) * w / total))
    return out


def check_coverage(manifest, curriculum) -> list[str]:
    """One-line errors for blended sources without data; returns the warnings."""
    drawn = draws(curriculum)
    for name in drawn:
        if name not in manifest.sources:
            raise DataConfigError(f"source '{name}' of {curriculum.path} has no data: not in "
                                  f"{manifest.path}")
    manifest.check_files(list(drawn))
    warnings = []
    for name in drawn:
        want = curriculum.sources[name].prefix
        if manifest.sources[name].prefix != want:
            warnings.append(f"warning: source '{name}': the manifest writes "
                            f"{manifest.sources[name].prefix}, the curriculum reads {want}")
    return warnings


def plan_rows(curriculum, avail: dict[str, Available]) -> list[Row]:
    rows = []
    for name, stages in draws(curriculum).items():
        so_far = 0.0
        for stage, tokens in stages:
            epochs = tokens / avail[name].tokens if avail[name].tokens else math.inf
            so_far += epochs
            rows.append(Row(name, stage, tokens, epochs, so_far))
    return rows


def render(curriculum, avail: dict[str, Available], rows: list[Row], max_epochs: float) -> list[str]:
    lines = ["| source | tokens available | stage | tokens drawn | epochs | epochs so far |",
             "|---|---|---|---:|---:|---:|"]
    last = None
    for r in rows:
        first = r.source != last
        lines.append(f"| {r.source if first else ''} | {avail[r.source].describe() if first else ''} "
                     f"| {r.stage} | {human(r.drawn)} | {r.epochs:.2f} | {r.epochs_so_far:.2f} |")
        last = r.source
    total_avail = sum(a.tokens for n, a in avail.items() if n in {r.source for r in rows})
    total = curriculum.stages[-1].end_tokens
    lines.append(f"\n{len(avail)} source(s), {human(total_avail)} tokens available; the curriculum "
                 f"draws {human(total)} tokens in {len(curriculum.stages)} stage(s) "
                 f"({total / max(total_avail, 1):.2f} epochs of all data)")
    for name in dict.fromkeys(r.source for r in rows):
        final = [r for r in rows if r.source == name][-1].epochs_so_far
        if final > max_epochs:
            lines.append(f"warning: source '{name}' is drawn {final:.2f} epochs over the curriculum "
                         f"(more than --max-epochs {max_epochs:g})")
    return lines
