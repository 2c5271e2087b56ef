#!/usr/bin/env python3
"""Upcycle a dense Hugging Face Qwen3 into a Marco MoE Megatron-Core checkpoint.

    python tools/upcycle_hf_to_mcore.py --hf-dir Qwen3-0.6B-Base --save ckpt/nano-init --preset nano
    python tools/upcycle_hf_to_mcore.py --hf-dir DIR --save OUT --num-experts 16 \\
        --moe-ffn-hidden-size 128 --moe-router-topk 4 --scale exact --drop-ratio 0

The output (iteration 0, weights only) is what `pretrain_marco.py --load OUT` starts from, at
any TP/PP/EP layout. Streams: one dense layer and one expert matrix in memory at a time.
The math is in megatron_ext/convert/upcycling.py; see docs/upcycling.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.hf_to_mcore_parser(
        __doc__, hf_dir="dense HF qwen3",
        preset="target MoE preset (nano, mini, tiny, ...); its shapes must match the HF config")
    p.add_argument("--num-experts", type=int, help="E = N x M (overrides the preset)")
    p.add_argument("--moe-ffn-hidden-size", type=int, help="expert FFN size F_e")
    p.add_argument("--moe-router-topk", type=int, help="router top-k")
    p.add_argument("--scale", default="marco", choices=["marco", "exact", "none"],
                   help="marco: W_gate, W_up, W_down x N^(1/3) (the paper's); exact: W_up, "
                   "W_down x sqrt(N) (dense output preserved exactly); none")
    p.add_argument("--router-init", default="virtual-group", choices=["virtual-group", "random"],
                   help="virtual-group: the M replicas of a slice share router rows (the paper's); "
                        "random: a fresh router")
    p.add_argument("--drop-ratio", type=float, default=0.5,
                   help="Drop-Upcycling ratio r in [0, 1) (Marco's is not published; 0.5 is the "
                   "Drop-Upcycling paper's best; 0 disables)")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the random router and of Drop-Upcycling's re-initialisation")
    cli.add_dtype_flag(p, help="checkpoint dtype (auto: that of the HF weights); the math runs in fp32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    return p


def resolve_preset(args, fields: dict):
    """The MoE architecture: HF shapes plus expert settings (from --preset and/or flags)."""
    from megatron_ext.convert.hf_config import architecture
    from megatron_ext.presets import PRESETS, ModelPreset, get_preset, override

    experts = dict(num_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                   moe_router_topk=args.moe_router_topk)
    if args.preset:
        preset = get_preset(args.preset)
        if not preset.is_moe:
            raise cli.UsageError(f"--preset {args.preset} is a dense preset; name a MoE one")
        # Shapes must match; RoPE base, norm eps and tying too, or the MoE would not start
        # from the dense model's function. The context length is the preset's.
        for name, hf_value in fields.items():
            if name != "max_position_embeddings" and getattr(preset, name) != hf_value:
                raise cli.UsageError(f"--preset {args.preset} has {name} = {getattr(preset, name)} "
                                 f"but the HF config at --hf-dir {args.hf_dir} has {hf_value}")
        return override(preset, **experts)
    missing = [f"--{k.replace('_', '-')}" for k, v in experts.items() if v is None]
    if missing:
        raise cli.UsageError(f"give --preset or all of --num-experts, --moe-ffn-hidden-size, "
                         f"--moe-router-topk (missing {', '.join(missing)})")
    base = ModelPreset(name="upcycled", description="upcycled from a dense HF Qwen3",
                       seq_length=min(4096, fields["max_position_embeddings"]), **fields, **experts)
    same = [p for p in PRESETS.values() if p.is_moe and architecture(p) == architecture(base)]
    # A registered preset with this architecture: record it as is (what `--preset` builds).
    return same[0] if same else base


def plan_lines(preset, spec, dense_dtype, out_dtype) -> list[str]:
    from dataclasses import replace

    from megatron_ext.convert.upcycling import num_dropped, scale_factors
    from megatron_ext.flops import analytic_model_size

    s = scale_factors(spec.scale, spec.n)
    size = analytic_model_size(preset)
    dense = analytic_model_size(replace(preset, num_experts=None, moe_ffn_hidden_size=None,
                                        moe_router_topk=None))
    h = preset.hidden_size
    return [
        f"dense: {preset.num_layers} layers, hidden {h}, FFN {spec.dense_ffn}, "
        f"{preset.num_attention_heads}/{preset.num_query_groups} heads x {preset.kv_channels}, "
        f"vocab {preset.vocab_size}, {dense.total_params / 1e9:.3f}B params ({dense_dtype})",
        f"N = {spec.n} slices of {spec.expert_ffn} (dense FFN {spec.dense_ffn} / expert FFN "
        f"{spec.expert_ffn}), M = {spec.m} replicas -> {spec.num_experts} experts, "
        f"top-{spec.topk}",
        f"scale: {spec.scale} (W_gate x {s['gate']:.4f}, W_up x {s['up']:.4f}, "
        f"W_down x {s['down']:.4f})",
        f"router init: {spec.router_init} (std {spec.router_std}); drop ratio {spec.drop_ratio} "
        f"({num_dropped(spec.expert_ffn, spec.drop_ratio)} of {spec.expert_ffn} per expert); "
        f"seed {spec.seed}",
        f"per layer: router ({spec.num_experts}, {h}), experts fc1 ({spec.num_experts}, "
        f"{2 * spec.expert_ffn}, {h}), fc2 ({spec.num_experts}, {h}, {spec.expert_ffn})",
        f"MoE preset {preset.name!r}: {size.total_params / 1e9:.3f}B total, "
        f"{size.active_params / 1e9:.3f}B active params; checkpoint {out_dtype}, about "
        f"{cli.human_bytes(checkpoint_bytes(preset, out_dtype))}",
    ]


def checkpoint_bytes(preset, out_dtype: str) -> int:
    from megatron_ext.flops import analytic_model_size

    return analytic_model_size(preset).total_params * (4 if out_dtype == "fp32" else 2)


def _check_space(save: str, tmp: str, needed: int) -> None:
    free = shutil.disk_usage(tmp).free
    if free < needed * 1.02:
        raise cli.UsageError(f"--save {save}: the checkpoint needs about {cli.human_bytes(needed)}, "
                         f"{cli.human_bytes(free)} free there")


def write(args, preset, spec, reader, out_dtype, info) -> None:
    """Write into a temporary sibling of --save (after the free-space check, which counts the
    space that temporaries of killed runs held), then move it into place; say what it wrote."""
    import torch
    from tqdm import tqdm

    from megatron_ext import parallel
    from megatron_ext.convert.streaming import save_streaming
    from megatron_ext.convert.upcycling import UpcycledCheckpoint

    # One intra-op thread: the work is a stream of small tensors (one expert matrix at a time),
    # where OpenMP threads gain little and, on a busy machine, spin-wait: 50x slower measured
    # on 2 shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cli.atomic_directory(args.save, "upcycle") as tmp:
            _check_space(args.save, tmp, checkpoint_bytes(preset, out_dtype))
            with tqdm(total=preset.num_layers, desc="upcycling", unit="layer", file=sys.stderr) as bar, \
                    parallel.single_process(args.seed):
                source = UpcycledCheckpoint(reader, spec, preset,
                                            on_layer=lambda i: bar.update(i - bar.n))
                save_streaming(tmp, preset, source.chunk, getattr(torch, cli.DTYPES[out_dtype]), info)
                bar.update(preset.num_layers - bar.n)
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {os.path.abspath(args.save)} (iteration 0, weights only)")


def checkpoint_info(args, preset, spec, out_dtype: str) -> dict:
    """What marco_model.json records: the preset, the upcycling settings, the HF tokenizer."""
    from megatron_ext.checkpointing import model_info  # imports Megatron (seconds)
    from megatron_ext.convert.hf_config import hf_tokenizer_info

    info = model_info(preset, upcycling={
        "source": os.path.abspath(args.hf_dir), "n": spec.n, "m": spec.m,
        "scale": spec.scale, "router_init": spec.router_init,
        "drop_ratio": spec.drop_ratio, "seed": spec.seed, "dtype": out_dtype,
    })
    tokenizer = hf_tokenizer_info(args.hf_dir)
    if tokenizer:
        info["tokenizer"] = tokenizer
    return info


def run(args) -> int:
    from megatron_ext.convert.hf_config import preset_fields_from_hf_config, read_hf_config
    from megatron_ext.convert.mapping import expected_hf_shapes
    from megatron_ext.convert.safetensors_io import HFSafetensors
    from megatron_ext.convert.upcycling import UpcycleSpec

    cli.require_single_process()
    if not (0.0 <= args.drop_ratio < 1.0):
        raise cli.UsageError(f"--drop-ratio {args.drop_ratio} must be in [0, 1)")
    if not args.dry_run:
        cli.require_empty_output(os.path.abspath(args.save), "--save", args.overwrite)
    cfg = read_hf_config(args.hf_dir)
    if cfg.get("model_type") == "qwen3_moe":
        raise cli.UsageError(f"--hf-dir {args.hf_dir}: already a MoE (qwen3_moe); upcycling "
                         "takes a dense qwen3")
    fields = preset_fields_from_hf_config(cfg, args.hf_dir)
    preset = resolve_preset(args, fields)
    spec = UpcycleSpec(
        dense_ffn=fields["ffn_hidden_size"], expert_ffn=preset.moe_ffn_hidden_size,
        num_experts=preset.num_experts, topk=preset.moe_router_topk, scale=args.scale,
        router_init=args.router_init, drop_ratio=args.drop_ratio, seed=args.seed,
    ).validate()
    reader = HFSafetensors(args.hf_dir)
    reader.require(expected_hf_shapes(fields))
    dense_dtype = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(
        str(reader.dtype()), "fp32")
    out_dtype = dense_dtype if args.dtype == "auto" else args.dtype
    for line in plan_lines(preset, spec, dense_dtype, out_dtype):
        print(line, flush=True)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    write(args, preset, spec, reader, out_dtype, checkpoint_info(args, preset, spec, out_dtype))
    return 0


def main(argv=None) -> int:
    return cli.run_tool(run, build_parser(), argv, output="save")


if __name__ == "__main__":
    sys.exit(main())
