#!/usr/bin/env python3
"""CPU training-step throughput: our trainer on the `tiny` preset vs Hugging Face
`Qwen3MoeForCausalLM` of the same shape, same batch, same data, in the same process.

    python bench/bench_cpu_tiny.py [--rounds 5 --steps-per-round 5] [--profile]

Both do a full training step: forward, backward, grad clipping to 1.0, Adam(W) update. Ours is
Megatron-Core (SequentialMLP experts, local attention, Megatron DDP + optimizer, fp32); HF runs
its default attention (sdpa) and each available experts implementation. Rounds alternate
between the two so machine noise hits both; the table reports the median step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment_lines, hf_qwen3_moe  # noqa: E402


def hf_step_fn(model):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch):
        out = model(input_ids=batch["tokens"], labels=None)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        )
        if out.aux_loss is not None:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm"],
                   help="transformers experts implementations to run (batched_mm: about 7 s a "
                        "step on 2 CPU cores, index-bound)")
    p.add_argument("--profile", action="store_true",
                   help="also print the top operators of one step of each stack (torch profiler)")
    opts = p.parse_args(argv)

    import torch

    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer

    def ours(backend: str):
        args = parse_args(["--preset", "tiny", "--micro-batch-size", str(opts.micro_batch_size),
                           "--train-iters", "100000", "--lr", "1e-4", "--min-lr", "1e-5",
                           "--log-interval", "1000000", "--moe-expert-backend", backend])
        trainer = Trainer(args)
        steps = iter(range(100000))
        trainer.train_step(next(steps))  # warm up
        return trainer, lambda batch: trainer.train_step(next(steps))

    trainer, ours_sequential = ours("sequential")
    _, ours_grouped = ours("torch-grouped")
    args, preset = trainer.cfg, trainer.preset
    batches = [trainer.data.micro_batches(s, 0, 1, opts.micro_batch_size)[0] for s in range(8)]
    tokens_per_step = opts.micro_batch_size * args.batch.seq_length

    from transformers.integrations import moe as hf_moe

    reference = "ours: Megatron-Core, SequentialMLP (reference path)"
    contenders = {reference: ours_sequential, "ours: Megatron-Core, torch._grouped_mm experts": ours_grouped}
    for impl in opts.hf_experts:
        if impl != "eager" and impl not in hf_moe.ALL_EXPERTS_FUNCTIONS:
            print(f"# HF experts implementation {impl!r} is not in this transformers")
            continue
        try:
            step = hf_step_fn(hf_qwen3_moe(preset, impl))
            step(batches[0])  # warm up; also proves the implementation runs on CPU
            contenders[f"HF Qwen3MoeForCausalLM, experts {impl}"] = step
        except Exception as e:  # noqa: BLE001 - report implementations that cannot run here
            print(f"# HF experts implementation {impl!r} does not run here: {type(e).__name__}: {e}")

    times = {name: [] for name in contenders}
    for _ in range(opts.rounds):
        for name, step in contenders.items():
            for i in range(opts.steps_per_round):
                t0 = time.perf_counter()
                step(batches[i % len(batches)])
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times[reference])
    print("\n".join(environment_lines()))
    print(f"# tiny preset: {preset.num_layers} layers, hidden {preset.hidden_size}, "
          f"{preset.num_experts} experts x {preset.moe_ffn_hidden_size}, top-{preset.moe_router_topk}; "
          f"batch {opts.micro_batch_size} x {args.batch.seq_length} tokens, fp32, "
          f"{torch.get_num_threads()} threads; median of {opts.rounds} x {opts.steps_per_round} steps")
    print("| stack | step (ms) | steps/s | tokens/s | step rate vs ours (SequentialMLP) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {1 / median:.2f} | {tokens_per_step / median:,.0f} | "
              f"{base / median:.2f}x |")
    best = {side: min(statistics.median(v) for k, v in times.items() if k.startswith(side))
            for side in ("ours", "HF")}
    print(f"# ours (faster backend) vs HF (faster experts implementation): "
          f"{best['HF'] / best['ours']:.2f}x the step rate (issue target: 1.5x)")
    if opts.profile:
        for name, step in contenders.items():
            print_profile(name, lambda step=step: step(batches[0]))
    return 0


def print_profile(name: str, step, top: int = 8) -> None:
    """Where one training step's CPU time goes: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"\n# {name}: {total / 3e3:.1f} ms of operator self time per step, "
          f"{100 * matmul / total:.0f}% in matrix multiplies ({', '.join(sorted(MATMUL_OPS))})")
    print("| operator | self time share | calls per step |")
    print("|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count // 3} |")


MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


if __name__ == "__main__":
    sys.exit(main())
