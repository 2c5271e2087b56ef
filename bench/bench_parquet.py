"""Parquet preprocessing: peak memory on one large row group, and tokens/s per core.

    python bench/bench_parquet.py [--row-group-mb 200] [--jsonl] [--tokenizer-type T --tokenizer-model M]

Writes a parquet file whose single row group holds --row-group-mb MB of text (the bundled
corpus' documents, repeated with a counter), then preprocesses it with one worker (one core:
reading, tokenizing and writing in one process) in a fresh interpreter, and prints that
process' peak RSS (VmHWM; getrusage's ru_maxrss would carry the parent's over the exec) beside
the peak RSS of the same run on a one-document parquet file (the interpreter, Megatron-Core and
the tokenizer: what any run costs), and the throughput per core: tokens per CPU-second of that
process (its wall time too; on a shared machine only the CPU time is a per-core rate). --jsonl
also runs the same documents as JSON lines, for comparison. Measured once for docs/data.md; not
a test.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment_lines  # noqa: E402

CHILD = """
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer import build_tokenizer
import megatron.core.datasets.indexed_dataset, pyarrow.parquet  # imported before the clock starts
build_tokenizer(sys.argv[3], sys.argv[4] or None)
before = resource.getrusage(resource.RUSAGE_SELF)
s = preprocess([sys.argv[1]], sys.argv[2], append_eod=True, workers=1, progress=False,
               tokenizer_type=sys.argv[3], tokenizer_model=sys.argv[4] or None)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"documents": s.documents, "tokens": s.tokens, "seconds": s.seconds, "cpu": cpu,
                  "peak_rss_kib": int(next(x for x in open("/proc/self/status")
                                           if x.startswith("VmHWM")).split()[1])}))
"""


def corpus_texts() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data" / "corpus").glob("*.train.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return texts


def write_inputs(d: Path, megabytes: float, jsonl: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, rows, size = corpus_texts(), [], 0
    while size < megabytes * 1e6:
        text = f"{len(rows)} {texts[len(rows) % len(texts)]}"
        rows.append(text)
        size += len(text.encode())
    table = pa.table({"text": rows})
    big = d / "big.parquet"
    pq.write_table(table, big, row_group_size=len(rows))
    pq.write_table(table.slice(0, 1), d / "one.parquet")
    meta = pq.ParquetFile(big).metadata
    info = {"rows": len(rows), "text_mb": size / 1e6, "row_groups": meta.num_row_groups,
            "row_group_mb": meta.row_group(0).total_byte_size / 1e6,
            "file_mb": big.stat().st_size / 1e6}
    if jsonl:
        with open(d / "big.jsonl", "w", encoding="utf-8") as f:
            for text in rows:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return info


def run_child(path: Path, out: Path, tokenizer: tuple[str, str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), *tokenizer], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-group-mb", type=float, default=200.0)
    p.add_argument("--jsonl", action="store_true", help="also time the same documents as JSON lines")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default="", help="default: the tiny SentencePiece model")
    args = p.parse_args(argv)
    tok = (args.tokenizer_type, args.tokenizer_model)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        info = write_inputs(d, args.row_group_mb, args.jsonl)
        base = run_child(d / "one.parquet", d / "one", tok)
        big = run_child(d / "big.parquet", d / "big", tok)
        rows = [("parquet, 1 row group", big)]
        if args.jsonl:
            rows.append(("JSON lines, same documents", run_child(d / "big.jsonl", d / "js", tok)))
    print("\n".join(environment_lines()))
    print(f"input: {info['rows']:,} documents, {info['text_mb']:.0f} MB of text; parquet file "
          f"{info['file_mb']:.0f} MB with {info['row_groups']} row group of {info['row_group_mb']:.0f} MB "
          f"(uncompressed); {args.tokenizer_type} "
          f"{args.tokenizer_model or 'data/tokenizer/marco_tiny_spm.model'}, --append-eod, 1 worker")
    print()
    print("| input | documents | tokens | wall s | CPU s | tokens per CPU-second (one core) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| parquet, 1 document (baseline) | {base['documents']} | {base['tokens']:,} | "
          f"{base['seconds']:.2f} | {base['cpu']:.2f} | | {base['peak_rss_kib'] / 1024:.0f} MiB |")
    for name, r in rows:
        print(f"| {name} | {r['documents']:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
              f"{r['tokens'] / r['cpu']:,.0f} | {r['peak_rss_kib'] / 1024:.0f} MiB |")
    print(f"\npeak RSS above the baseline on the {info['row_group_mb']:.0f} MB row group: "
          f"{(big['peak_rss_kib'] - base['peak_rss_kib']) / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
