#!/usr/bin/env python3
"""Benchmark: upcycle Qwen3-0.6B-shaped random weights into full Marco-Nano (232 x 384, top-8).

    python bench/bench_upcycle.py                 # full: 28 layers, ~1.2 GB in, ~16 GB out
    python bench/bench_upcycle.py --layers 2      # quick look

Writes a random dense Qwen3-0.6B safetensors directory (bf16, like the released weights)
straight to disk tensor by tensor, then runs tools/upcycle_hf_to_mcore.py in a subprocess and
prints a table: wall time and peak RSS of that process (target for the full model on 2 cores:
under 5 minutes and 4 GiB). Temporary files are removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import environment_lines  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936)


def dense_tensors(layers: int):
    """(name, shape) of a tied Qwen3-0.6B checkpoint, as `save_pretrained` names them."""
    h, f, d = QWEN3_06B["hidden_size"], QWEN3_06B["intermediate_size"], QWEN3_06B["head_dim"]
    q, kv = QWEN3_06B["num_attention_heads"] * d, QWEN3_06B["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (QWEN3_06B["vocab_size"], h)
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm": (h,), "post_attention_layernorm": (h,),
                 "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                 "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
                 "self_attn.q_norm": (d,), "self_attn.k_norm": (d,),
                 "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
        yield from ((f"{p}{name}.weight", shape) for name, shape in layer.items())
    yield "model.norm.weight", (h,)


def write_dense(directory: str, layers: int, seed: int = 0) -> int:
    """A bf16 model.safetensors written one tensor at a time (format: u64 header size, JSON
    header with byte offsets, raw little-endian data); returns the parameter count."""
    import torch

    specs = list(dense_tensors(layers))
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape in specs:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    config = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=layers,
                  max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                  torch_dtype="bfloat16", **QWEN3_06B)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sum(int(torch.Size(s).numel()) for _, s in specs)



def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, files in os.walk(path) for n in files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28, help="28 = the full Qwen3-0.6B / nano depth")
    p.add_argument("--workdir", default=None, help="where the dense and MoE checkpoints go")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--scale", default="marco")
    p.add_argument("--drop-ratio", default="0.5")
    p.add_argument("--write-dense", metavar="DIR", help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.write_dense:
        print(write_dense(args.write_dense, args.layers))
        return 0

    work = tempfile.mkdtemp(prefix="bench_upcycle_", dir=args.workdir)
    dense, out = os.path.join(work, "qwen3-0.6b"), os.path.join(work, "nano")
    os.makedirs(dense)
    try:
        # The dense weights are made in a child process: this one stays small, so the tool's
        # peak RSS (read with wait4 for its pid alone) is the tool's own.
        t = time.time()
        made = subprocess.run([sys.executable, os.path.abspath(__file__), "--layers",
                               str(args.layers), "--write-dense", dense],
                              capture_output=True, text=True, check=True)
        params = int(made.stdout.split()[-1])
        write_s = time.time() - t
        cmd = [sys.executable, os.path.join(REPO, "tools", "upcycle_hf_to_mcore.py"), "--hf-dir",
               dense, "--save", out, "--num-experts", "232", "--moe-ffn-hidden-size", "384",
               "--moe-router-topk", "8", "--scale", args.scale, "--drop-ratio", args.drop_ratio]
        if args.layers == 28:
            cmd[cmd.index("--num-experts"):] = ["--preset", "nano", "--scale", args.scale,
                                                "--drop-ratio", args.drop_ratio]
        log = os.path.join(work, "tool.log")
        t = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t
        if os.waitstatus_to_exitcode(status):
            print(open(log).read()[-3000:], file=sys.stderr)
            return 1
        rss = usage.ru_maxrss / 2**20  # KiB -> GiB
        size = du(out)
        rows = [
            ("input", f"random Qwen3-0.6B shape, {args.layers} layers, {params / 1e9:.3f}B params "
                      f"bf16 ({du(dense) / 2**30:.2f} GiB, written in {write_s:.0f} s)"),
            ("output", f"nano 232 x 384 top-8 (N=8, M=29), {args.layers} layers, scale "
                       f"{args.scale}, drop ratio {args.drop_ratio}: {size / 2**30:.2f} GiB bf16"),
            ("wall time", f"{wall:.1f} s ({size / 2**20 / wall:.0f} MiB/s written)"),
            ("peak RSS", f"{rss:.2f} GiB"),
        ]
        print("\n".join(environment_lines()))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
