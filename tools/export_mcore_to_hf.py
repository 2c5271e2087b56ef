#!/usr/bin/env python3
"""Export a Marco Megatron-Core checkpoint to a Hugging Face directory (qwen3_moe or qwen3).

    python tools/export_mcore_to_hf.py --load runs/tiny/ckpt --out runs/tiny/hf
    python tools/export_mcore_to_hf.py --load ckpt/nano --out Marco-Nano-hf --dtype bf16 \\
        --tokenizer-dir /models/Qwen3-0.6B-Base --max-shard-size 2GB

The checkpoint may have been saved at any TP/PP/EP/DP layout. Writes config.json,
generation_config.json, safetensors shards (+ index) and the tokenizer (the one the checkpoint
records, or --tokenizer-dir). Streams: one layer in memory at a time. A checkpoint whose files
are damaged, or whose weights hold NaN/inf (a diverged run), is refused with one line naming
the file or tensor (--allow-non-finite exports non-finite weights anyway). See docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.tool_parser(__doc__)
    p.add_argument("--load", required=True, help="checkpoint root (latest iteration) or iter_N dir")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    cli.add_dtype_flag(p, help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard (bytes, or with KB/MB/GB/KiB/MiB/GiB)")
    p.add_argument("--tokenizer-dir", help="tokenizer to ship instead of the one the checkpoint "
                   "records: a Hugging Face tokenizer directory, or a directory with one "
                   "SentencePiece .model (or the .model file)")
    p.add_argument("--no-tokenizer", action="store_true", help="ship no tokenizer files")
    p.add_argument("--router-aux-loss-coef", type=float, default=1e-3,
                   help="written to config.json (MoE): the trainer's --moe-aux-loss-coeff")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="export weights that hold NaN/inf values (refused by default: a diverged "
                   "run's checkpoint is not a usable model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise cli.UsageError(f"--max-shard-size {text}: expected bytes or e.g. 500MB, 5GB, 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise cli.UsageError(f"--max-shard-size {text} must be positive")
    return size


def resolve_tokenizer(args, info: dict):
    """('hf'|'spm', path) to ship, or None; fails early on a bad --tokenizer-dir."""
    from megatron_ext.convert.tokenizer_export import find_tokenizer

    if args.no_tokenizer:
        return None
    if args.tokenizer_dir:
        return find_tokenizer(args.tokenizer_dir, "--tokenizer-dir")
    recorded = info.get("tokenizer") or {}
    # The trainer records tokenizer_model (+ sha256); the upcycler an HF directory as `model`.
    path = recorded.get("tokenizer_model") or recorded.get("model")
    if not path:
        return None
    if not os.path.exists(path):
        print(f"warning: the checkpoint's tokenizer {path} is not there; exporting without "
              "tokenizer files (give --tokenizer-dir)", file=sys.stderr, flush=True)
        return None
    cli.require_recorded_sha256(path, recorded.get("sha256"), "give --tokenizer-dir or --no-tokenizer")
    return find_tokenizer(path, "tokenizer recorded in marco_model.json:")


def write_export(tmp: str, reader, preset, dtype, tokenizer, args) -> dict:
    """Everything into `tmp` (an empty directory). Returns a summary for the final message."""
    import dataclasses
    import json

    import torch
    from tqdm import tqdm

    from megatron_ext.convert.hf_config import hf_config_dict
    from megatron_ext.convert.mapping import expected_hf_shapes
    from megatron_ext.convert.mcore_reader import export_tensors
    from megatron_ext.convert.safetensors_io import SafetensorsWriter
    from megatron_ext.convert.tokenizer_export import (
        copy_tokenizer_files,
        sentencepiece_to_hf,
        special_token_ids,
    )

    files, ids = [], {}
    if tokenizer is not None:
        kind, path = tokenizer
        files = (copy_tokenizer_files(path, tmp) if kind == "hf"
                 else sentencepiece_to_hf(path, tmp, preset.max_position_embeddings))
        ids = special_token_ids(tmp)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    config = hf_config_dict(preset, dtype_name, args.router_aux_loss_coef, ids)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    from transformers import GenerationConfig

    GenerationConfig(**ids).save_pretrained(tmp)

    plan = list(expected_hf_shapes(dataclasses.asdict(preset), moe=preset.is_moe).items())
    writer = SafetensorsWriter(tmp, plan, dtype, parse_size(args.max_shard_size))
    bar = tqdm(total=preset.num_layers, desc="exporting", unit="layer", file=sys.stderr)
    try:
        for tensors in export_tensors(reader, on_layer=lambda i: bar.update(1)):
            writer.add(tensors)
        writer.close()
    finally:
        bar.close()
    return {"config": config["model_type"], "shards": len(writer.files),
            "bytes": writer.total_bytes, "tokenizer": files}


def run(args) -> int:
    out = os.path.abspath(args.out)
    parse_size(args.max_shard_size)
    cli.require_single_process("it reads any checkpoint layout by itself")
    if os.path.exists(out) and not args.overwrite:
        raise cli.UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.UsageError(f"--out {args.out} exists and is not a directory")
    from megatron_ext import checkpointing
    from megatron_ext.convert.mcore_reader import McoreCheckpointReader

    ckpt = checkpointing.resolve_checkpoint_dir(args.load)
    info = checkpointing.read_model_info(ckpt)
    preset = checkpointing.preset_from_checkpoint(ckpt)
    tokenizer = resolve_tokenizer(args, info)
    reader = McoreCheckpointReader(ckpt, preset, allow_non_finite=args.allow_non_finite)
    dtype = cli.torch_dtype(args.dtype, reader.dtype)
    with cli.atomic_directory(out, "export") as tmp:
        summary = write_export(tmp, reader, preset, dtype, tokenizer, args)
    tok = ", tokenizer " + " ".join(summary["tokenizer"]) if summary["tokenizer"] else ", no tokenizer"
    print(f"wrote {out}: {summary['config']} ({preset.name}), {summary['shards']} shard(s), "
          f"{cli.human_bytes(summary['bytes'])} {str(dtype).replace('torch.', '')}{tok}", flush=True)
    return 0


def main(argv=None) -> int:
    return cli.run_tool(run, build_parser(), argv, output="out")


if __name__ == "__main__":
    sys.exit(main())
