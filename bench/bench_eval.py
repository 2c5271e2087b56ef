#!/usr/bin/env python3
"""Evaluation throughput: our Megatron-backed lm-eval model vs lm-eval's `hf` model on the same
checkpoint (exported), the same requests and batch size.

    python bench/bench_eval.py --load runs/quickstart/moe/ckpt --hf-dir runs/quickstart/moe/hf

Requests: every multiple-choice request of the bundled `marco_continuation_*` tasks (context +
each of four continuations: lm-eval's `loglikelihood`), and the `marco_manqa_*` prompts
(`generate_until`, stop at a newline, at most 48 tokens). Prints requests/s and scored
tokens/s per model (best of --repeats), and the largest per-request log-likelihood gap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def requests(task_dir: str, limit_gen: int):
    from lm_eval.api.instance import Instance

    ll, gen = [], []
    for name in sorted(os.listdir(task_dir)):
        path = os.path.join(task_dir, name)
        if name.startswith("marco_continuation_") and name.endswith(".jsonl"):
            for line in open(path, encoding="utf-8"):
                row = json.loads(line)
                ll += [Instance("loglikelihood", {}, (row["context"], c), 0) for c in row["choices"]]
        elif name.startswith("marco_manqa_") and name.endswith(".jsonl"):
            for line in open(path, encoding="utf-8"):
                row = json.loads(line)
                gen.append(Instance("generate_until", {}, (f"Question: {row['question']}\nAnswer:",
                                                           {"until": ["\n"], "max_gen_toks": 48}), 0))
    return ll, gen[:limit_gen]


def timed(fn, repeats: int):
    """(best wall seconds, best process CPU seconds, result): CPU time is the steadier figure
    on a shared machine (wall time counts other processes' turns too)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best, best_cpu, out


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint")
    p.add_argument("--hf-dir", required=True, help="the same checkpoint exported to HF")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--generations", type=int, default=40, help="generate_until requests")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import torch
    from lm_eval.models.huggingface import HFLM

    from bench.common import environment_lines
    from megatron_ext.evaluation import tasks
    from megatron_ext.evaluation.lm import MarcoLM

    ll, gen = requests(tasks.ensure_bundled_tasks(), args.generations)
    ours = MarcoLM(load=args.load, batch_size=args.batch_size)
    theirs = HFLM(pretrained=os.path.abspath(args.hf_dir), batch_size=args.batch_size, dtype="float32",
                  device="cuda" if torch.cuda.is_available() else "cpu")
    tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in ll)
    print("\n".join(environment_lines()))
    print(f"threads: {torch.get_num_threads()}; batch size {args.batch_size}; {len(ll)} loglikelihood "
          f"requests ({tokens:,} tokens), {len(gen)} generate_until requests")
    print(f"{'model':<22} {'loglik req/s':>13} {'tok/s':>9} {'tok/CPU-s':>10} {'gen req/s':>10} "
          f"{'gen req/CPU-s':>14}")
    results = {}
    for name, lm in (("ours (Megatron)", ours), ("lm-eval hf", theirs)):
        t_ll, c_ll, scores = timed(lambda lm=lm: lm.loglikelihood(ll, disable_tqdm=True), args.repeats)
        t_gen, c_gen, texts = timed(lambda lm=lm: lm.generate_until(gen, disable_tqdm=True), 1)
        results[name] = (scores, texts)
        print(f"{name:<22} {len(ll) / t_ll:>13.1f} {tokens / t_ll:>9.0f} {tokens / c_ll:>10.0f} "
              f"{len(gen) / t_gen:>10.2f} {len(gen) / c_gen:>14.2f}")
    (a, ga), (b, gb) = results.values()
    gap = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    print(f"max |loglik ours - hf| {gap:.2e}; generations identical: {ga == gb} "
          f"({sum(x == y for x, y in zip(ga, gb))}/{len(ga)})")
    ours.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
