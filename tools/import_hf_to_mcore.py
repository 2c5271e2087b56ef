#!/usr/bin/env python3
"""Import a Hugging Face qwen3_moe (or qwen3) model as a Marco Megatron-Core checkpoint.

    python tools/import_hf_to_mcore.py --hf-dir Marco-Mini-Base --save ckpt/mini-base
    python pretrain_marco.py --preset mini --load ckpt/mini-base ...   # continue training

For released or exported models (no upcycling: tools/upcycle_hf_to_mcore.py makes a MoE from
a dense model). The output (iteration 0, weights only) loads at any TP/PP/EP layout. Streams:
one HF layer in memory at a time. The mapping is megatron_ext/convert/mapping.py, the same one
the export uses in the other direction; see docs/export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.hf_to_mcore_parser(
        __doc__, hf_dir="HF qwen3_moe / qwen3",
        preset="record this preset (its architecture must equal the HF config's); default: the "
        "registered preset with that architecture, if any")
    cli.add_dtype_flag(p, help="checkpoint dtype (auto: that of the HF weights)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    return p


def resolve_preset(args, fields: dict, moe: bool):
    """The HF architecture as a preset: --preset or a registered one with the same shapes
    (keeping the HF context length, so a round trip rewrites the same config), else custom."""
    from megatron_ext.convert.hf_config import architecture
    from megatron_ext.presets import PRESETS, ModelPreset, get_preset

    kind = "qwen3_moe" if moe else "qwen3"
    base = ModelPreset(name=f"imported-{kind}", description=f"imported from HF {kind}",
                       seq_length=min(4096, fields["max_position_embeddings"]), **fields)
    if args.preset:
        preset = get_preset(args.preset)
        hf = architecture(base)
        mismatch = {k: (v, hf[k]) for k, v in architecture(preset).items() if hf[k] != v}
        if mismatch:
            name, (mine, theirs) = next(iter(mismatch.items()))
            raise cli.UsageError(f"--preset {args.preset} has {name} = {mine} but the HF config at "
                             f"--hf-dir {args.hf_dir} has {theirs}")
        same = [preset]
    else:
        same = [p for p in PRESETS.values() if architecture(p) == architecture(base)]
    if not same:
        return base
    return dataclasses.replace(same[0], max_position_embeddings=fields["max_position_embeddings"])


def write(args, preset, reader, dtype, info) -> None:
    """Into a temporary sibling of --save, then moved into place; says what it wrote."""
    from tqdm import tqdm

    from megatron_ext import parallel
    from megatron_ext.convert.streaming import HFCheckpointSource, save_streaming

    with tqdm(total=preset.num_layers, desc="importing", unit="layer", file=sys.stderr) as bar, \
            cli.atomic_directory(args.save, "import") as tmp, parallel.single_process(seed=0):
        source = HFCheckpointSource(reader, preset, on_layer=lambda i: bar.update(i + 1 - bar.n))
        save_streaming(tmp, preset, source.chunk, dtype, info)
        bar.update(preset.num_layers - bar.n)
    print(f"wrote {os.path.abspath(args.save)} (iteration 0, weights only, {info['imported']['dtype']})")


def run(args) -> int:
    from megatron_ext.convert import mapping as hm
    from megatron_ext.convert.hf_config import (
        hf_tokenizer_info,
        preset_fields_from_hf_config,
        read_hf_config,
    )
    from megatron_ext.convert.safetensors_io import HFSafetensors

    cli.require_single_process()
    cli.require_empty_output(os.path.abspath(args.save), "--save", args.overwrite)
    cfg = read_hf_config(args.hf_dir)
    fields = preset_fields_from_hf_config(cfg, args.hf_dir)
    moe = cfg.get("model_type") == "qwen3_moe"
    preset = resolve_preset(args, fields, moe)
    reader = HFSafetensors(args.hf_dir)
    fused = hm.hf_layer_prefix(0) + hm.HF_FUSED_GATE_UP in reader
    reader.require(hm.expected_hf_shapes(fields, moe=moe, fused_experts=fused))
    dtype = cli.torch_dtype(args.dtype, reader.dtype())
    from megatron_ext import data
    from megatron_ext.checkpointing import model_info  # imports Megatron (seconds)

    info = model_info(preset, imported={"source": os.path.abspath(args.hf_dir),
                                        "model_type": cfg["model_type"],
                                        "dtype": str(dtype).replace("torch.", "")})
    if hf_tokenizer_info(args.hf_dir):  # recorded as the trainer records its tokenizer
        info["tokenizer"] = data.tokenizer_info("HuggingFaceTokenizer", os.path.abspath(args.hf_dir))
    print(f"{cfg['model_type']} -> preset {preset.name!r}: {preset.num_layers} layers, hidden "
          f"{preset.hidden_size}" + (f", {preset.num_experts} experts x "
                                     f"{preset.moe_ffn_hidden_size}, top-{preset.moe_router_topk}"
                                     if moe else f", FFN {preset.ffn_hidden_size}"), flush=True)
    write(args, preset, reader, dtype, info)
    return 0


def main(argv=None) -> int:
    return cli.run_tool(run, build_parser(), argv, output="save")


if __name__ == "__main__":
    sys.exit(main())
