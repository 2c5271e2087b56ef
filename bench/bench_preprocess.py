#!/usr/bin/env python3
"""Preprocessing throughput (MB/s of JSON input, tokens/s) on the bundled sample corpus.

    python bench/bench_preprocess.py [--workers 1 2] [--repeats 3]

Runs tools/preprocess_data.py's engine in-process, best of --repeats per worker count, and
prints a Markdown table with the date, machine and package versions.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment_lines  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from megatron_ext.data.preprocess import preprocess

    inputs = sorted((ROOT / "data" / "corpus").glob("*.jsonl.gz"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            best = None
            for r in range(args.repeats):
                stats = preprocess(inputs, os.path.join(tmp, f"w{workers}_{r}"), append_eod=True,
                                   tokenizer_type=args.tokenizer_type,
                                   tokenizer_model=args.tokenizer_model, workers=workers,
                                   progress=False)
                if best is None or stats.seconds < best.seconds:
                    best = stats
            rows.append((workers, best))

    print("\n".join(environment_lines()))
    print(f"input: {len(inputs)} files of data/corpus ({rows[0][1].documents} documents, "
          f"{rows[0][1].input_bytes / 1e6:.2f} MB of JSON), tokenizer "
          f"{args.tokenizer_type} {args.tokenizer_model or 'data/tokenizer/marco_tiny_spm.model'}"
          f", best of {args.repeats}")
    print()
    print("| workers | seconds | MB/s | tokens/s | tokens |")
    print("|---:|---:|---:|---:|---:|")
    for workers, s in rows:
        print(f"| {workers} | {s.seconds:.2f} | {s.input_bytes / 1e6 / s.seconds:.2f} | "
              f"{s.tokens / s.seconds:,.0f} | {s.tokens:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
