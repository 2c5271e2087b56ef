#!/usr/bin/env python3
"""Per-GPU memory estimate of a Marco MoE training layout (TP = PP = 1, bf16, dropless MoE).

    python slurm/memory_estimate.py --preset mini --ep 8 --dp 64 --micro-batch-size 1

The arithmetic quoted in slurm/config/*.sh and docs/cluster.md. Model state per GPU, with
Megatron's DDP (`grad_reduce_in_fp32`) and the distributed optimizer:
  bf16 weights 2 B + fp32 gradient buffer 4 B for every parameter on the GPU, and
  fp32 master weight + Adam m + v = 12 B per parameter, sharded over the data-parallel ranks
  that hold a replica (all DP ranks for the dense part, DP / EP for the experts).
Activations kept for backward, per token per layer (bf16 unless noted; no recomputation,
fused attention that keeps q, k, v, output and the log-sum-exp rather than the scores):
  attention  input norm in, QKV GEMM in, q/k before QK-norm, q/k/v after it, attention out, lse
  router     post-attention norm in, router input, fp32 logits / probabilities / top-k weights
  experts    top-k copies of the token (FC1 in), FC1 out (gate + up), SwiGLU out (FC2 in),
             FC2 out (needed for the probability-weighted unpermute)
plus the logits (bf16) and their fp32 copy in the cross-entropy. With dropless routing one
GPU can receive more than its share of tokens; `imbalance` scales the expert activations.
Not counted: CUDA context and NCCL buffers (~1-2 GiB), allocator fragmentation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GIB = 2 ** 30


def estimate(preset_name: str, ep: int, dp: int, micro_batch_size: int,
             seq_length: int | None = None, imbalance: float = 1.0) -> dict:
    from megatron_ext.presets import get_preset

    m = get_preset(preset_name)
    h, L, V = m.hidden_size, m.num_layers, m.vocab_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    seq = seq_length or m.seq_length
    E, F, k = (m.num_experts, m.moe_ffn_hidden_size, m.moe_router_topk) if m.is_moe else (0, 0, 0)
    if not m.is_moe:
        raise ValueError("the estimate covers MoE presets")
    if dp % ep:
        raise ValueError(f"EP {ep} must divide DP {dp} (TP = PP = 1)")

    attention = h * q + 2 * h * kv + q * h + 2 * m.kv_channels
    dense = L * (attention + 2 * h + E * h) + V * h + h  # + final norm; embedding tied
    experts = L * E * 3 * h * F / ep
    params = dense + experts
    state = {
        "weights_bf16": 2 * params,
        "grads_fp32": 4 * params,
        "optimizer": 12 * dense / dp + 12 * experts / (dp // ep),
    }
    per_token_layer = {
        "attention": 2 * h + 2 * h + 2 * (q + kv) + 2 * (q + 2 * kv) + 2 * q + 4 * m.num_attention_heads,
        "router": 2 * h + 2 * h + 3 * 4 * E,
        "experts": k * (2 * h + 2 * 2 * F + 2 * F + 2 * h),
    }
    tokens = micro_batch_size * seq
    act = {
        "activations_dense": tokens * L * (per_token_layer["attention"] + per_token_layer["router"]),
        "activations_experts": tokens * L * per_token_layer["experts"] * imbalance,
        "logits": tokens * V * (2 + 4),
    }
    total = sum(state.values()) + sum(act.values())
    return {
        "preset": m.name, "layers": L, "vocab": V, "ep": ep, "dp": dp, "micro_batch_size": micro_batch_size,
        "seq_length": seq, "imbalance": imbalance,
        "params_per_gpu": params, "dense_params": dense, "expert_params_per_gpu": experts,
        "bytes_per_token_layer": per_token_layer,
        **{f"{k}_gib": v / GIB for k, v in {**state, **act}.items()},
        "total_gib": total / GIB,
    }


def report(r: dict) -> str:
    b = r["bytes_per_token_layer"]
    tokens = r["micro_batch_size"] * r["seq_length"]
    rows = [
        ("bf16 weights", "2 B x params", r["weights_bf16_gib"]),
        ("fp32 gradients", "4 B x params", r["grads_fp32_gib"]),
        ("optimizer", f"12 B x (dense / {r['dp']} + experts / {r['dp'] // r['ep']})",
         r["optimizer_gib"]),
        ("activations",
         f"{tokens} tok x {r['layers']} x {b['attention'] + b['router']} B (attention, router)",
         r["activations_dense_gib"]),
        ("", f"{tokens} tok x {r['layers']} x {b['experts']} B (experts) x {r['imbalance']:g}",
         r["activations_experts_gib"]),
        ("logits", f"{tokens} tok x {r['vocab']} x (2 + 4) B", r["logits_gib"]),
        ("total", "", r["total_gib"]),
    ]
    head = (f"{r['preset']}: EP {r['ep']}, DP {r['dp']}, micro batch {r['micro_batch_size']} x "
            f"{r['seq_length']} tokens; parameters per GPU: dense {r['dense_params'] / 1e9:.3f}B "
            f"(replicated) + experts {r['expert_params_per_gpu'] / 1e9:.3f}B (1/{r['ep']}) = "
            f"{r['params_per_gpu'] / 1e9:.3f}B")
    return "\n".join([head] + [f"  {a:<15}{b_:<52}{g:6.1f} GiB" for a, b_, g in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--ep", type=int, required=True, help="expert-parallel size")
    p.add_argument("--dp", type=int, required=True, help="data-parallel size (= GPUs, TP=PP=1)")
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="tokens on the busiest GPU's experts / the even share")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = estimate(a.preset, a.ep, a.dp, a.micro_batch_size, a.seq_length, a.imbalance)
    print(json.dumps(r) if a.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
