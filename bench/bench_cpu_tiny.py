#!/usr/bin/env python3
"""CPU training-step throughput: our trainer on the `tiny` preset vs Hugging Face
`Qwen3MoeForCausalLM` of the same shape, same batch, same data, in the same process.

    python bench/bench_cpu_tiny.py [--rounds 5 --steps-per-round 5]

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

from bench.common import environment_lines  # noqa: E402


def hf_model(preset, experts_implementation: str | None):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size,
        moe_intermediate_size=preset.moe_ffn_hidden_size,
        num_experts=preset.num_experts,
        num_experts_per_tok=preset.moe_router_topk,
        norm_topk_prob=True,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups,
        head_dim=preset.kv_channels,
        rope_theta=preset.rotary_base,
        rms_norm_eps=preset.norm_epsilon,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        output_router_logits=True,  # include the load-balancing loss, as ours does
        router_aux_loss_coef=1e-3,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    if experts_implementation:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


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
    args, preset = trainer.args, trainer.preset
    batches = [trainer.data.micro_batches(s, 0, 1, opts.micro_batch_size)[0] for s in range(8)]
    tokens_per_step = opts.micro_batch_size * args.seq_length

    from transformers.integrations import moe as hf_moe

    reference = "ours: Megatron-Core, SequentialMLP (CPU default)"
    contenders = {reference: ours_sequential, "ours: Megatron-Core, torch._grouped_mm experts": ours_grouped}
    for impl in ["eager", *[k for k in ("grouped_mm", "batched_mm") if k in hf_moe.ALL_EXPERTS_FUNCTIONS]]:
        try:
            step = hf_step_fn(hf_model(preset, impl))
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
          f"batch {opts.micro_batch_size} x {args.seq_length} tokens, fp32, "
          f"{torch.get_num_threads()} threads; median of {opts.rounds} x {opts.steps_per_round} steps")
    print("| stack | step (ms) | steps/s | tokens/s | step rate vs ours (SequentialMLP) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {1 / median:.2f} | {tokens_per_step / median:,.0f} | "
              f"{base / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
