#!/usr/bin/env python3
"""Per-GPU memory estimate of a Marco MoE training layout (TP = 1, bf16).

    python slurm/memory_estimate.py --preset mini --ep 8 --dp 64 --micro-batch-size 1
    python slurm/memory_estimate.py --preset mini --ep 8 --dp 32 --cp 2 --micro-batch-size 1 \
        --seq-length 8192 --recompute selective --recompute-modules moe_act layernorm

    python slurm/memory_estimate.py             # the shipped Nano and Mini OPD layouts
    python slurm/memory_estimate.py opd --preset mini --ep 8 --dp 64 --decode-rows 16 [--check]

The arithmetic quoted in configs/recipes/*.yaml and docs/cluster.md. On-policy distillation
(`estimate_opd`) adds an in-process teacher's weights and the step's phases (rollout KV cache
and prefill, teacher scoring, the training micro-batch), of which the largest counts;
slurm/posttrain.sh refuses an OPD layout that does not fit (`opd --check`). Model state per GPU, with
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

The levers that change memory (docs/cluster.md "Levers"):
  --cp N           context parallelism: each GPU holds 1/N of every sequence's tokens (their
                   activations and logits); GPUs = DP x CP x PP, optimizer state sharded over
                   DP x CP (experts: DP x CP / EP)
  --pp N, --vpp V  pipeline stages: the layers (and their parameters) split N ways; with 1F1B
                   the first stage keeps N micro-batches of its L/N layers in flight (L layers'
                   worth), x (1 + (N-1)/(N V)) with V interleaved chunks (Megatron's estimate);
                   the last stage holds the logits and the (tied) output layer; the estimate
                   adds the first stage's activations to the last stage's logits (an upper
                   bound of either stage)
  --recompute      full: each layer keeps only its input (2 B x hidden per token), plus one
                   layer's activations being recomputed; selective: --recompute-modules drop
                   what they recompute (core_attn: attention output and LSE; layernorm: the two
                   norm outputs; moe_act: the SwiGLU output; moe: the router and expert
                   activations, keeping the layer's input)
  --capacity-factor C  token dropping caps an expert's tokens at C x its even share: the expert
                   activations scale by min(imbalance, C), or by C exactly with
                   --pad-to-capacity
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


RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe_act", "moe")


def _recompute_savings(h: int, q: int, heads: int, k: int, F: int, modules) -> dict:
    """Bytes per token per layer that selective recompute of `modules` does not keep."""
    return {
        "attention": (2 * q + 4 * heads if "core_attn" in modules else 0)
        + (2 * h if "layernorm" in modules else 0),
        "router": 2 * h if "layernorm" in modules else 0,
        "experts": k * 2 * F if "moe_act" in modules else 0,
    }


def estimate(preset_name: str, ep: int, dp: int, micro_batch_size: int,
             seq_length: int | None = None, imbalance: float = 1.0, *, pp: int = 1,
             vpp: int | None = None, cp: int = 1, recompute: str | None = None,
             recompute_modules=("core_attn",), capacity_factor: float | None = None,
             pad_to_capacity: bool = False) -> dict:
    from megatron_ext.presets import get_preset

    m = get_preset(preset_name)
    h, L, V = m.hidden_size, m.num_layers, m.vocab_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    seq = seq_length or m.seq_length
    E, F, k = (m.num_experts, m.moe_ffn_hidden_size, m.moe_router_topk) if m.is_moe else (0, 0, 0)
    if not m.is_moe:
        raise ValueError("the estimate covers MoE presets")
    if (dp * cp) % ep:
        raise ValueError(f"EP {ep} must divide DP {dp} x CP {cp} (TP = 1)")
    if L % (pp * (vpp or 1)):
        raise ValueError(f"PP {pp} x VPP {vpp or 1} must divide the {L} layers")
    if seq % cp:
        raise ValueError(f"CP {cp} must divide the sequence length {seq}")
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute must be selective or full, not {recompute!r}")
    modules = tuple(recompute_modules or ()) if recompute == "selective" else ()
    stage_layers = L // pp

    attention = h * q + 2 * h * kv + q * h + 2 * m.kv_channels
    layer_dense = attention + 2 * h + E * h
    # Tied embedding: on the first stage, and (as the output layer) on the last; one copy if PP=1.
    dense = stage_layers * layer_dense + V * h + h  # + final norm
    experts = stage_layers * E * 3 * h * F / ep
    params = dense + experts
    state = {
        "weights_bf16": 2 * params,
        "grads_fp32": 4 * params,
        "optimizer": 12 * dense / (dp * cp) + 12 * experts / (dp * cp // ep),
    }
    per_token_layer = {
        "attention": 2 * h + 2 * h + 2 * (q + kv) + 2 * (q + 2 * kv) + 2 * q + 4 * m.num_attention_heads,
        "router": 2 * h + 2 * h + 3 * 4 * E,
        "experts": k * (2 * h + 2 * 2 * F + 2 * F + 2 * h),
    }
    saved = _recompute_savings(h, q, m.num_attention_heads, k, F, modules)
    kept = {part: per_token_layer[part] - saved[part] for part in per_token_layer}
    if "moe" in modules:  # the whole MoE layer is recomputed from its (kept) input
        kept["router"], kept["experts"] = 2 * h + 2 * h, 0
    load = imbalance if capacity_factor is None else (
        capacity_factor if pad_to_capacity else min(imbalance, capacity_factor))
    tokens = micro_batch_size * seq // cp
    # Layers' worth of one micro-batch in flight on the first stage (1F1B: PP micro-batches of
    # L/PP layers); the interleaved schedule's extra in-flight chunks (Megatron's factor).
    in_flight = L * (1 + (pp - 1) / (pp * vpp) if vpp else 1)
    if recompute == "full":
        one_layer = (per_token_layer["attention"] + per_token_layer["router"]
                     + per_token_layer["experts"] * load)
        act = {"activations_dense": tokens * (in_flight * 2 * h + one_layer), "activations_experts": 0}
    else:
        act = {
            "activations_dense": tokens * in_flight * (kept["attention"] + kept["router"]),
            "activations_experts": tokens * in_flight * kept["experts"] * load,
        }
    act["logits"] = tokens * V * (2 + 4)  # the last stage's (with PP: an upper bound, see above)
    total = sum(state.values()) + sum(act.values())
    return {
        "preset": m.name, "layers": L, "vocab": V, "ep": ep, "dp": dp, "micro_batch_size": micro_batch_size,
        "seq_length": seq, "imbalance": imbalance, "pp": pp, "vpp": vpp, "cp": cp,
        "recompute": recompute, "recompute_modules": list(modules), "capacity_factor": capacity_factor,
        "pad_to_capacity": pad_to_capacity, "expert_load": load,
        "params_per_gpu": params, "dense_params": dense, "expert_params_per_gpu": experts,
        "bytes_per_token_layer": per_token_layer, "kept_bytes_per_token_layer": kept,
        **{f"{k}_gib": v / GIB for k, v in {**state, **act}.items()},
        "total_gib": total / GIB,
    }


def report(r: dict) -> str:
    b = r["kept_bytes_per_token_layer"]
    tokens = r["micro_batch_size"] * r["seq_length"] // r["cp"]
    shard = r["dp"] * r["cp"]
    factor = 1 + (r["pp"] - 1) / (r["pp"] * r["vpp"]) if r["vpp"] else 1
    layers = r["layers"] if not r["vpp"] else f"{r['layers']} x {factor:.3g}"
    if r["recompute"] == "full":
        activations = [("activations", f"{tokens} tok x ({layers} x 2 B x hidden + one layer)",
                        r["activations_dense_gib"])]
    else:
        activations = [
            ("activations",
             f"{tokens} tok x {layers} x {b['attention'] + b['router']} B (attention, router)",
             r["activations_dense_gib"]),
            ("", f"{tokens} tok x {layers} x {b['experts']} B (experts) x {r['expert_load']:g}",
             r["activations_experts_gib"]),
        ]
    rows = [
        ("bf16 weights", "2 B x params", r["weights_bf16_gib"]),
        ("fp32 gradients", "4 B x params", r["grads_fp32_gib"]),
        ("optimizer", f"12 B x (dense / {shard} + experts / {shard // r['ep']})", r["optimizer_gib"]),
        *activations,
        ("logits", f"{tokens} tok x {r['vocab']} x (2 + 4) B", r["logits_gib"]),
        ("total", "", r["total_gib"]),
    ]
    levers = ", ".join(filter(None, [
        f"PP {r['pp']}" + (f" x {r['vpp']} virtual" if r["vpp"] else "") if r["pp"] > 1 else "",
        f"CP {r['cp']}" if r["cp"] > 1 else "",
        f"recompute {r['recompute']}" + (f" ({' '.join(r['recompute_modules'])})"
                                         if r["recompute_modules"] else "") if r["recompute"] else "",
        f"capacity factor {r['capacity_factor']:g}" + (" padded" if r["pad_to_capacity"] else "")
        if r["capacity_factor"] else "",
    ]))
    head = (f"{r['preset']}: EP {r['ep']}, DP {r['dp']}, micro batch {r['micro_batch_size']} x "
            f"{r['seq_length']} tokens; parameters per GPU: dense {r['dense_params'] / 1e9:.3f}B "
            f"(replicated) + experts {r['expert_params_per_gpu'] / 1e9:.3f}B (1/{r['ep']}) = "
            f"{r['params_per_gpu'] / 1e9:.3f}B" + (f"; {levers}" if levers else ""))
    return "\n".join([head] + [f"  {a:<15}{b_:<52}{g:6.1f} GiB" for a, b_, g in rows])


# --------------------------------------------------------------------------------- OPD
# In-process Megatron teachers the estimate knows (their published shapes), bf16, no gradients.
TEACHERS = {
    "qwen3-30b-a3b": dict(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128,
                          moe_ffn=768, topk=8, vocab=151936, tied=False),
}
H100_GIB = 79.6  # an H100 80 GB
CONTEXT_GIB = 2.0  # CUDA context and NCCL buffers
MARGIN = 0.9  # a layout fits when estimate + context <= 90% of the GPU
CHUNK_TOKENS = 1024  # --opd-chunk-tokens: the fp32 [tokens, vocabulary] pieces of the loss


def _teacher_bytes(t: dict, ep: int) -> float:
    """The teacher's bf16 weights on one GPU: dense part replicated, experts split over EP."""
    h, q, kv = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 2 * t["head_dim"] + 2 * h + t["experts"] * h
    dense = t["layers"] * layer + t["vocab"] * h * (1 if t["tied"] else 2) + h
    experts = t["layers"] * t["experts"] * 3 * h * t["moe_ffn"] / ep
    return 2 * (dense + experts)


def _layer_bytes_per_token(h: int, q: int, kv: int, heads: int, experts: int, topk: int,
                           ffn: int) -> int:
    """One layer's activations per token (module docstring's list): a no-grad forward holds
    about one layer's worth at a time."""
    return (2 * h + 2 * h + 2 * (q + kv) + 2 * (q + 2 * kv) + 2 * q + 4 * heads
            + 2 * h + 2 * h + 3 * 4 * experts + topk * (2 * h + 2 * 2 * ffn + 2 * ffn + 2 * h))


def estimate_opd(preset_name: str, ep: int, dp: int, *, micro_batch_size: int = 1,
                 prompt_len: int = 2048, response_len: int = 8192, decode_rows: int = 16,
                 teacher: str | None = "qwen3-30b-a3b", loss: str = "sampled-rkl",
                 recompute: str | None = "full", imbalance: float = 1.0) -> dict:
    """Per-GPU peak of an OPD step (TP 1, bf16, distributed optimizer). The step's phases run
    one after another, so the peak is what stays (the student's state, an in-process teacher's
    weights) plus the largest phase:
      rollout   the KV cache of `decode_rows` rows of prompt + response tokens, one layer's
                kept rows while finished rows are dropped (in place), and the prefill: one
                layer of decode_rows x prompt tokens, with [rows, heads, P, P] bf16 scores
                where attention materialises them (SDPA with a mask)
      scoring   (sampled-rkl) the teacher's logits of one micro-batch (bf16) and one fp32
                chunk, plus one teacher layer's activations
      training  the student's training micro-batch of prompt + response tokens (the
                pre-training arithmetic, `estimate`), plus the teacher's logits and one chunk
                beside it for the full-vocabulary losses (rkl, fkl, jsd)"""
    from megatron_ext.presets import get_preset

    seq = prompt_len + response_len
    train = estimate(preset_name, ep, dp, micro_batch_size, seq, imbalance, recompute=recompute)
    m = get_preset(preset_name)
    h, V, L = m.hidden_size, m.vocab_size, m.num_layers
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    state = (train["weights_bf16_gib"] + train["grads_fp32_gib"] + train["optimizer_gib"]) * GIB
    t = TEACHERS[teacher] if teacher else None
    teacher_weights = _teacher_bytes(t, ep) if t else 0.0
    kv_position = L * 2 * kv * 2  # bytes of cache per row per position, all layers
    cache = decode_rows * seq * kv_position
    rollout = {
        "kv_cache": cache,
        "compaction": cache / L * 0.75 / 2,  # one buffer of one layer, 3/4 of the rows kept
        "prefill": decode_rows * prompt_len * _layer_bytes_per_token(
            h, q, kv, m.num_attention_heads, m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size)
        + decode_rows * m.num_attention_heads * prompt_len ** 2 * 2,
    }
    tokens = micro_batch_size * seq
    chunk = CHUNK_TOKENS * V * 4 * 2  # fp32 chunk and its log-softmax
    scoring = {}
    if t and loss == "sampled-rkl":
        scoring = {"teacher_logits": tokens * t["vocab"] * 2 + chunk,
                   "teacher_layer": tokens * _layer_bytes_per_token(
                       t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"],
                       t["heads"], t["experts"], t["topk"], t["moe_ffn"])}
    training = {"activations": (train["activations_dense_gib"] + train["activations_experts_gib"]) * GIB,
                "logits": train["logits_gib"] * GIB + chunk}
    if t and loss != "sampled-rkl":
        training["teacher_logits"] = tokens * t["vocab"] * 2 + chunk
    phases = {"rollout": sum(rollout.values()), "scoring": sum(scoring.values()),
              "training": sum(training.values())}
    largest = max(phases, key=phases.get)
    total = state + teacher_weights + phases[largest]
    return {
        "preset": m.name, "ep": ep, "dp": dp, "micro_batch_size": micro_batch_size,
        "prompt_len": prompt_len, "response_len": response_len, "decode_rows": decode_rows,
        "teacher": teacher, "loss": loss, "recompute": recompute, "imbalance": imbalance,
        "student_state_gib": state / GIB, "teacher_weights_gib": teacher_weights / GIB,
        **{f"rollout_{k}_gib": v / GIB for k, v in rollout.items()},
        **{f"scoring_{k}_gib": v / GIB for k, v in scoring.items()},
        **{f"training_{k}_gib": v / GIB for k, v in training.items()},
        **{f"{k}_phase_gib": v / GIB for k, v in phases.items()},
        "largest_phase": largest, "total_gib": total / GIB,
        "with_context_gib": total / GIB + CONTEXT_GIB,
        "fits": total / GIB + CONTEXT_GIB <= MARGIN * H100_GIB,
    }


def opd_line(r: dict, name: str = "") -> str:
    """One line: the OPD layout, its parts, the peak per GPU and whether it fits."""
    verdict = "fits" if r["fits"] else "does NOT fit"
    return (f"{name or r['preset']} OPD: EP {r['ep']}, DP {r['dp']}, {r['decode_rows']} rows x "
            f"{r['prompt_len'] + r['response_len']} tokens, teacher {r['teacher'] or 'apart'}: "
            f"student state {r['student_state_gib']:.1f} + teacher {r['teacher_weights_gib']:.1f} + "
            f"{r['largest_phase']} {r[r['largest_phase'] + '_phase_gib']:.1f} (rollout "
            f"{r['rollout_phase_gib']:.1f}, scoring {r['scoring_phase_gib']:.1f}, training "
            f"{r['training_phase_gib']:.1f}) = {r['total_gib']:.1f} GiB per GPU, "
            f"{r['with_context_gib']:.1f} with CUDA/NCCL: {verdict} in {MARGIN:.0%} of an H100's "
            f"{H100_GIB} GiB")


def shipped_opd(model: str) -> dict:
    """The OPD estimate of slurm/{model}_opd.sbatch as shipped: the layout and opd settings of
    its recipe configs/recipes/{model}.yaml (Marco's configs/posttrain/marco.yaml), the rollout
    lengths and loss of its cascade file, phase 1's in-process Qwen3-30B-A3B teacher."""
    import yaml

    from megatron_ext.recipes import load_recipe

    recipe = load_recipe(model)
    opd = recipe["opd"]
    with open(os.path.join(REPO, opd["cascade"]), encoding="utf-8") as f:
        settings = yaml.safe_load(f).get("settings", {})
    world = int(recipe["nodes"]) * int(recipe["gpus_per_node"])
    return estimate_opd(recipe["preset"], int(recipe["ep"]), world // int(recipe["tp"]),
                        micro_batch_size=int(opd["micro_batch"]),
                        prompt_len=int(settings.get("rollout-max-prompt-len", 2048)),
                        response_len=int(settings.get("rollout-max-response-len", 8192)),
                        decode_rows=int(opd["decode_batch"]),
                        loss=settings.get("opd-loss", "sampled-rkl"))


SHIPPED_OPD = ("nano", "mini")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the shipped post-training layouts
        for model in SHIPPED_OPD:
            print(opd_line(shipped_opd(model), model))
        return 0
    if argv[0] == "opd":
        return opd_main(argv[1:])
    from megatron_ext.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", required=True, help="model preset (nano, mini, ...)")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel size")
    p.add_argument("--dp", type=int, required=True,
                   help="data-parallel size (GPUs = DP x CP x PP; TP = 1)")
    p.add_argument("--micro-batch-size", type=int, required=True, help="sequences per micro-batch")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="tokens on the busiest GPU's experts / the even share")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--vpp", type=int, default=None, help="virtual stages per pipeline rank")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--recompute", choices=["selective", "full"], default=None,
                   help="--recompute-granularity (default: none)")
    p.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=["core_attn"],
                   help="with --recompute selective (Megatron's default: core_attn)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="--moe-expert-capacity-factor (token dropping)")
    p.add_argument("--pad-to-capacity", action="store_true",
                   help="--moe-pad-expert-input-to-capacity")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    a = p.parse_args(argv)
    r = estimate(a.preset, a.ep, a.dp, a.micro_batch_size, a.seq_length, a.imbalance, pp=a.pp,
                 vpp=a.vpp, cp=a.cp, recompute=a.recompute, recompute_modules=a.recompute_modules,
                 capacity_factor=a.capacity_factor, pad_to_capacity=a.pad_to_capacity)
    print(json.dumps(r) if a.json else report(r))
    return 0


def opd_main(argv) -> int:
    """`memory_estimate.py opd ...`: one OPD layout; --check exits 2 with the one line when it
    does not fit (slurm/posttrain.sh refuses such a layout before it starts)."""
    from megatron_ext.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="memory_estimate.py opd", formatter_class=HelpFormatter,
                                description=estimate_opd.__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, help="the student's preset")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel size")
    p.add_argument("--dp", type=int, required=True, help="data-parallel size")
    p.add_argument("--micro-batch-size", type=int, default=1, help="rows per training micro-batch")
    p.add_argument("--prompt-len", type=int, default=2048, help="--rollout-max-prompt-len")
    p.add_argument("--response-len", type=int, default=8192, help="--rollout-max-response-len")
    p.add_argument("--decode-rows", type=int, default=16, help="--rollout-decode-batch-size")
    p.add_argument("--teacher", choices=[*TEACHERS, "apart"], default="qwen3-30b-a3b",
                   help="the in-process teacher, or 'apart' (served: no weights on the GPU)")
    p.add_argument("--loss", default="sampled-rkl",
                   help="--opd-loss (full-vocabulary losses hold the teacher's logits too)")
    p.add_argument("--cascade", help="a cascade file: its rollout lengths and loss win")
    p.add_argument("--check", action="store_true", help="exit 2 if the layout does not fit")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    a = p.parse_args(argv)
    if a.cascade:
        import yaml

        with open(a.cascade, encoding="utf-8") as f:
            settings = (yaml.safe_load(f) or {}).get("settings") or {}
        a.prompt_len = int(settings.get("rollout-max-prompt-len", a.prompt_len))
        a.response_len = int(settings.get("rollout-max-response-len", a.response_len))
        a.loss = settings.get("opd-loss", a.loss)
    r = estimate_opd(a.preset, a.ep, a.dp, micro_batch_size=a.micro_batch_size,
                     prompt_len=a.prompt_len, response_len=a.response_len,
                     decode_rows=a.decode_rows, teacher=None if a.teacher == "apart" else a.teacher,
                     loss=a.loss)
    line = json.dumps(r) if a.json else opd_line(r)
    if a.check and not r["fits"]:
        print(f"error: {line}; lower --rollout-decode-batch-size (MARCO_OPD_DECODE_BATCH) or raise EP",
              file=sys.stderr)
        return 2
    print(line)
    return 0


def _main_one_line(argv=None) -> int:
    """main() with a layout the estimate cannot take (EP not dividing DP x CP, an unknown or
    dense preset, ...) as one `error:` line and exit 2, as every tool here."""
    try:
        return main(argv)
    except ValueError as e:  # MarcoError included (an unknown preset)
        print(f"memory_estimate.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main_one_line())
