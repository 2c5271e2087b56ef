#!/usr/bin/env python3
"""Benchmark: OPD rollout time per step with each engine, and the weight sync's cost.

    python bench/bench_opd_engines.py              # the CPU demo's shape, 4 steps per engine
    python bench/bench_opd_engines.py --steps 2    # quicker

The demo's shape (examples/opd_demo.py, configs/posttrain/tiny_cascade.yaml): a `tiny` student
(4 layers, hidden 128, 16 experts x 128, top-4), 8 prompts x 2 samples per step, prompts up to
128 tokens, responses up to 48, temperature 1. Random weights (HF -> our checkpoint -> HF
export, as bench/bench_generate.py makes them); the teacher is the same checkpoint in process
(the rollout is what is timed). Engines: `megatron` (the in-process generator) and `sglang`
(tools/serve_teacher.py in a thread of this process, serving the student's HF export, its
weights synced from disk before every step: --rollout-sync-interval 1). Reported per engine:
the mean of time/rollout_sec over the steps after the first; for sglang also the weight sync's
seconds and bytes per step (Megatron save + streaming HF export + /update_weights_from_disk).
Then, by calculation, the bytes one sync writes for Nano and Mini in bf16 (their HF tensors),
and the seconds at an assumed shared-file-system bandwidth (--fs-gbps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import environment_lines  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="OPD steps per engine")
    p.add_argument("--fs-gbps", type=float, default=2.0,
                   help="assumed shared-file-system write+read bandwidth, GB/s, for Nano/Mini")
    return p


def hf_bytes(preset_name: str, itemsize: int = 2) -> int:
    import dataclasses

    import torch

    from megatron_ext.convert.mapping import expected_hf_shapes
    from megatron_ext.presets import get_preset

    preset = get_preset(preset_name)
    shapes = expected_hf_shapes(dataclasses.asdict(preset), moe=preset.is_moe)
    return itemsize * sum(int(torch.Size(s).numel()) for s in shapes.values())


def run_opd(args, ckpt, workdir, engine, url=None) -> list[dict]:
    import posttrain_marco

    log = os.path.join(workdir, f"{engine}.jsonl")
    argv = ["opd", "--load", ckpt, "--teacher", ckpt, "--teacher-tokenizer",
            os.path.join(REPO, "data/tokenizer/marco_tiny_spm.model"), "--train-iters", str(args.steps),
            "--rollout-batch-size", "8", "--n-samples-per-prompt", "2",
            "--rollout-max-prompt-len", "128", "--rollout-max-response-len", "48",
            "--micro-batch-size", "8", "--seq-length", "256", "--lr", "3e-4", "--seed", "1234",
            "--log-interval", "100", "--log-json", log]
    if engine == "sglang":
        argv += ["--rollout-engine", "sglang", "--rollout-url", url,
                 "--rollout-sync-dir", os.path.join(workdir, "sync")]
    assert posttrain_marco.main(argv) == 0
    return [r for r in map(json.loads, open(log)) if "opd_loss" in r]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bench.bench_generate import _tool, make_models
    from megatron_ext.convert.tokenizer_export import sentencepiece_to_hf
    from megatron_ext.logs import setup_logging
    from megatron_ext.presets import get_preset

    setup_logging()
    with tempfile.TemporaryDirectory() as workdir:
        ckpt, hf = make_models(get_preset("tiny"), workdir)
        sentencepiece_to_hf(os.path.join(REPO, "data/tokenizer/marco_tiny_spm.model"), hf)
        serve = _tool("serve_teacher")
        server = serve.make_server(serve.Model(hf, dtype="fp32", batch_size=16), "127.0.0.1", 0,
                                   update_root=workdir)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        results = {engine: run_opd(args, ckpt, workdir, engine, url) for engine in ("megatron", "sglang")}
        server.shutdown()
        server.server_close()
    for line in environment_lines():
        print(line)
    print(f"\nOPD at the demo's shape (tiny student, 8 prompts x 2, <= 128 + 48 tokens), "
          f"{args.steps} steps per engine, mean over steps 2..{args.steps}\n")
    print("| engine | rollout s/step | response length | weight sync s/step | sync GB/step |")
    print("|---|---|---|---|---|")
    for engine, steps in results.items():
        later = steps[1:] or steps
        sync = [r.get("time/weight_sync_sec") for r in later if "time/weight_sync_sec" in r]
        gb = [r.get("rollout/weight_sync_gb") for r in later if "rollout/weight_sync_gb" in r]
        print(f"| {engine} | {statistics.mean(r['time/rollout_sec'] for r in later):.2f} | "
              f"{statistics.mean(r['rollout/response_length'] for r in later):.1f} | "
              + (f"{statistics.mean(sync):.2f} | {statistics.mean(gb):.4f} |" if sync else "- | - |"))
    print(f"\nWeight sync by calculation (bf16 HF tensors; written once, read by each engine "
          f"node; at {args.fs_gbps:g} GB/s per pass, 3 passes: save, export, load):\n")
    print("| model | GB per sync | seconds per sync (estimate) |")
    print("|---|---|---|")
    for name in ("nano", "mini"):
        gb = hf_bytes(name) / 1e9
        print(f"| {name} | {gb:.1f} | {3 * gb / args.fs_gbps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
