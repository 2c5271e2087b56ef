#!/usr/bin/env python3
"""GPU throughput on a Nano-width slice: Nano's exact layer shapes (232 experts x 384, top-8,
hidden 1024, GQA 16/8 x 128, vocab 151,936), a few layers, sequence 4096, bf16.

    python bench/bench_gpu_nano_slice.py [--num-layers 8] [--steps 10] [--profile]

Rows: our trainer with SequentialMLP experts, with our torch._grouped_mm experts, with
TransformerEngine's grouped GEMM (and FP8) when TE is installed, and Hugging Face
`Qwen3MoeForCausalLM` of the same slice (its fastest experts implementation). Tokens/s,
TFLOP/s per GPU and MFU use the trainer's FLOP formula (megatron_ext/flops.py); peak memory is
torch's max allocated. Each configuration runs in a fresh subprocess so memory and Megatron's
global state never leak between rows. Without a GPU it prints one line and exits 0.
With --profile, one torch-grouped step is profiled and the top CUDA kernels printed.
A row whose child run exceeds --timeout seconds is killed and reported as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trainer_args(backend: str, num_layers: int, seq: int, mbs: int, fp8: bool) -> list[str]:
    args = ["--preset", "nano", "--num-layers", str(num_layers), "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--mock-data", "--bf16", "--train-iters", "100000",
            "--lr", "1e-4", "--min-lr", "1e-5", "--log-interval", "1000000",
            "--moe-expert-backend", backend]
    return args + (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"] if fp8 else [])


def run_ours(backend: str, opts, fp8: bool = False) -> dict:
    import torch

    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer

    trainer = Trainer(parse_args(trainer_args(backend, opts.num_layers, opts.seq_length,
                                              opts.micro_batch_size, fp8)))
    for step in range(opts.warmup):
        trainer.train_step(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(opts.warmup, opts.warmup + opts.steps):
        trainer.train_step(step)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / opts.steps
    if opts.profile and backend == "torch-grouped":
        _profile(lambda: trainer.train_step(opts.warmup + opts.steps))
    return {"seconds": seconds, "flops_per_token": trainer.flops_per_token,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_hf(opts) -> dict:
    import torch
    from transformers.integrations import moe as hf_moe

    from bench.common import hf_qwen3_moe
    from megatron_ext.flops import analytic_model_size, training_flops_per_token
    from megatron_ext.presets import get_preset, override

    preset = override(get_preset("nano"), num_layers=opts.num_layers)
    impl = "grouped_mm" if "grouped_mm" in hf_moe.ALL_EXPERTS_FUNCTIONS else "eager"
    model = hf_qwen3_moe(preset, impl).to("cuda", torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, preset.vocab_size, (opts.micro_batch_size, opts.seq_length), device="cuda")

    def step():
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(opts.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        step()
    torch.cuda.synchronize()
    size = analytic_model_size(preset)
    return {"seconds": (time.perf_counter() - t0) / opts.steps, "experts": impl,
            "flops_per_token": training_flops_per_token(size, preset, opts.seq_length),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _profile(step) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print("# top CUDA kernels of one torch-grouped training step (share of GPU time):", file=sys.stderr)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"#   {100 * e.self_device_time_total / total:5.1f}%  {e.key[:110]}", file=sys.stderr)


def child(row: str, opts) -> None:
    warnings.filterwarnings("ignore")
    if row == "hf":
        result = run_hf(opts)
    else:
        backend, _, fp8 = row.partition("+")
        result = run_ours(backend, opts, fp8=bool(fp8))
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rows", nargs="+", help="subset of: sequential torch-grouped te te+fp8 hf")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds one row's child run may take before it is killed and reported")
    p.add_argument("--child", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        child(opts.child, opts)
        return 0

    import torch

    from bench.common import environment_lines

    if not torch.cuda.is_available():
        print("bench_gpu_nano_slice: no CUDA device here; skipped (run it on an H100)")
        return 0
    from megatron_ext.layer_spec import te_usable

    rows = opts.rows or ["sequential", "torch-grouped", *(["te", "te+fp8"] if te_usable() else []), "hf"]
    names = {"sequential": "ours, SequentialMLP", "torch-grouped": "ours, torch._grouped_mm",
             "te": "ours, TE grouped GEMM", "te+fp8": "ours, TE grouped GEMM + FP8", "hf": "HF Qwen3MoE"}
    tokens = opts.micro_batch_size * opts.seq_length
    results = {}
    for row in rows:
        passed = [a for a in (argv or sys.argv[1:]) if a != "--profile"]
        cmd = [sys.executable, __file__, "--child", row, *passed,
               *(["--profile"] if opts.profile and row == "torch-grouped" else [])]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "WORLD_SIZE": "1"}, timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            results[row] = {"error": f"timed out after {opts.timeout:g} s (--timeout)"}
            continue
        sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines() if l.startswith("#")))
        found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[row] = {"error": tail[:150]}
        else:
            results[row] = json.loads(found[0][7:])

    print("\n".join(environment_lines()))
    print(f"# Nano slice: {opts.num_layers} layers of Nano (232 x 384 experts, top-8), sequence "
          f"{opts.seq_length}, micro batch {opts.micro_batch_size}, bf16, 1 GPU, "
          f"mean of {opts.steps} steps after {opts.warmup} warm-up")
    print("| stack | step (ms) | tokens/s | TFLOP/s | MFU | peak mem (GiB) | vs SequentialMLP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get("sequential", {}).get("seconds")
    for row in rows:
        r = results[row]
        label = names[row] + (f" (experts {r['experts']})" if "experts" in r else "")
        if "error" in r:
            print(f"| {label} | failed: {r['error']} | | | | | |")
            continue
        tflops = r["flops_per_token"] * tokens / r["seconds"] / 1e12
        print(f"| {label} | {1000 * r['seconds']:.0f} | {tokens / r['seconds']:,.0f} | {tflops:.0f} | "
              f"{100 * tflops / opts.peak_tflops:.1f}% | {r['peak_gib']:.1f} | "
              f"{(base / r['seconds']) if base else float('nan'):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
