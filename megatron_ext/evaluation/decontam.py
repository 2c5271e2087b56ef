"""Decontamination: n-gram overlap, on token ids, between training data and evaluation sets.

Why token ids. Whitespace n-grams do not exist in Chinese, Japanese or Thai; the training data
is already token ids (Megatron indexed datasets), so evaluation examples are tokenized with the
same tokenizer and compared id for id. An n-gram of ids is a span of about 3n characters of
Latin text, n-ish characters of CJK text: the default n = 13 follows GPT-3's 13-gram rule.

What is compared. An evaluation example is the text a model sees and the answer it should give
(lm-eval: doc_to_text + target delimiter + the correct target/choice; jsonl: the --text-key
fields joined by a newline). Every n-gram of its ids is hashed (a 64-bit polynomial hash;
collisions are ~n_eval x n_train / 2^64, negligible), giving a small in-memory set.

Streaming. The training data is read as its .bin token stream (np.memmap, never loaded
whole) in windows of `chunk_tokens` with n - 1 tokens of overlap; each window's n-gram hashes are
computed vectorised and looked up in the evaluation set (np.isin against a sorted array). Memory
is bounded by the chunk plus the evaluation n-grams, whatever the size of the training data.
n-grams across document boundaries are included: a packed training sequence crosses them too.
Sharding (a Slurm array): the concatenated token stream of all prefixes is cut into K equal
token ranges (+ n - 1 overlap); each shard records which evaluation n-grams it found; the merge
takes their union. The result is the same as one unsharded pass (tested).

Per example: `contaminated` (any n-gram of the example occurs in the training data: GPT-3's
rule), `coverage` (share of its tokens inside a matching n-gram: Llama 2's measure; clean
< 0.2, dirty >= 0.8) and `longest_match` (tokens in the longest run of consecutive matching
n-grams: n + run - 1). Examples shorter than n tokens cannot be checked and say so
(`checked: false`): they are counted apart (`unchecked`) and never put in the clean subset, since
nothing says they are clean. Per task: examples, checked, unchecked, contaminated, their share
of the checked examples, mean coverage, Llama-2 clean/dirty counts; and the clean subset (the
checked examples not contaminated) so the score on it can be compared with the full score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from megatron_ext.data.indexed import check_indexed_dataset

HASH_BASE = np.uint64(1_000_003)
DEFAULT_NGRAM = 13
CHUNK_TOKENS = 1 << 22   # 4M tokens (32 MiB of uint64 hashes) per window
LLAMA2_CLEAN, LLAMA2_DIRTY = 0.2, 0.8


@dataclass
class EvalExample:
    task: str
    index: int           # position in its task's evaluation split
    text: str
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    doc: Optional[dict] = None


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every window of n ids (len(ids) - n + 1 of them; none if shorter)."""
    ids = np.asarray(ids).astype(np.uint64, copy=False)
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):  # h = sum ids[j+i] * B^(n-1-i)  (mod 2^64)
            h = h * HASH_BASE + ids[i:i + m] + np.uint64(1)
    return h


def eval_ngram_set(examples: list[EvalExample], n: int) -> np.ndarray:
    """Sorted unique hashes of every n-gram of every example."""
    parts = [ngram_hashes(e.ids, n) for e in examples]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


# ------------------------------------------------------------------------------ training side
@dataclass(frozen=True)
class TokenSource:
    prefix: str
    dtype: np.dtype
    tokens: int


def open_sources(prefixes: Iterable[str], where: str) -> list[TokenSource]:
    out = []
    for prefix in prefixes:
        info = check_indexed_dataset(prefix, where)
        out.append(TokenSource(prefix, info.dtype, info.num_tokens))
    return out


def shard_ranges(sources: list[TokenSource], num_shards: int, shard_index: int) -> list[tuple[int, int, int]]:
    """(source index, start, end) token ranges of one shard of the concatenated stream."""
    total = sum(s.tokens for s in sources)
    lo, hi = total * shard_index // num_shards, total * (shard_index + 1) // num_shards
    out, offset = [], 0
    for i, s in enumerate(sources):
        start, end = max(lo, offset), min(hi, offset + s.tokens)
        if start < end:
            out.append((i, start - offset, end - offset))
        offset += s.tokens
    return out


def scan(sources: list[TokenSource], eval_set: np.ndarray, n: int, num_shards: int = 1,
         shard_index: int = 0, chunk_tokens: int = CHUNK_TOKENS, progress=None) -> tuple[np.ndarray, int]:
    """Evaluation n-gram hashes that occur in this shard of the training data, and the number
    of training tokens scanned. Windows overlap by n - 1 so no n-gram is missed, and a shard
    reads n - 1 tokens past its end (the next shard starts its own n-grams there)."""
    found: list[np.ndarray] = []
    scanned = 0
    for i, start, end in shard_ranges(sources, num_shards, shard_index):
        src = sources[i]
        tokens = np.memmap(f"{src.prefix}.bin", dtype=src.dtype, mode="r")
        stop = min(end + n - 1, src.tokens)
        pos = start
        while pos < end:
            window = np.asarray(tokens[pos:min(pos + chunk_tokens + n - 1, stop)])
            hashes = ngram_hashes(window, n)
            hits = hashes[np.isin(hashes, eval_set, assume_unique=False)]
            if hits.size:
                found.append(np.unique(hits))
            step = min(chunk_tokens, end - pos)
            scanned += step
            pos += step
            if progress is not None:
                progress(step)
        del tokens
    matched = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.uint64)
    return matched, scanned


# ------------------------------------------------------------------------------ reports
def example_report(example: EvalExample, matched: np.ndarray, n: int) -> dict:
    hashes = ngram_hashes(example.ids, n)
    base = {"task": example.task, "index": example.index, "tokens": int(len(example.ids))}
    if hashes.size == 0:
        return {**base, "checked": False, "contaminated": False, "coverage": 0.0, "longest_match": 0}
    hit = np.isin(hashes, matched)
    covered = np.zeros(len(example.ids), dtype=bool)
    for j in np.flatnonzero(hit):
        covered[j:j + n] = True
    longest, run = 0, 0
    for h in hit:
        run = run + 1 if h else 0
        longest = max(longest, run)
    return {**base, "checked": True, "contaminated": bool(hit.any()),
            "coverage": round(float(covered.mean()), 6), "longest_match": (n + longest - 1) if longest else 0}


def task_totals(rows: list[dict]) -> dict:
    out: dict = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        checked = [r for r in mine if r["checked"]]
        dirty = sum(r["contaminated"] for r in mine)
        out[task] = {
            "examples": len(mine), "checked": len(checked), "unchecked": len(mine) - len(checked),
            "contaminated": dirty,
            "contaminated_share": round(dirty / len(checked), 6) if checked else 0.0,
            "clean_examples": len(checked) - dirty,
            "mean_coverage": round(float(np.mean([r["coverage"] for r in checked])), 6) if checked else 0.0,
            "llama2_clean": sum(r["coverage"] < LLAMA2_CLEAN for r in checked),
            "llama2_dirty": sum(r["coverage"] >= LLAMA2_DIRTY for r in checked),
            "max_longest_match": max((r["longest_match"] for r in mine), default=0),
        }
    return out


def build_report(examples: list[EvalExample], matched: np.ndarray, n: int) -> tuple[list[dict], dict]:
    rows = [example_report(e, matched, n) for e in examples]
    return rows, task_totals(rows)


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
