#!/usr/bin/env python3
"""Held-out loss of Megatron checkpoints on the same tokens, e.g. a dense parent and its
upcycled MoE at step 0 (training losses come from different batches; these do not).

    python examples/eval_loss.py --load runs/dense/ckpt runs/moe/init \\
        --data runs/data/valid_de_text_document runs/data/valid_fr_text_document --json gap.json

Per dataset: the first --sequences-per-dataset windows of --seq-length + 1 tokens of its
concatenated documents. Prints the token-mean loss of each checkpoint and the relative gap of
every later one to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import HelpFormatter, run_tool  # noqa: E402


def windows(prefixes: list[str], seq_length: int, per_dataset: int):
    """(tokens, labels) int64 tensors of shape (n, seq_length)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data import check_indexed_dataset

    rows = []
    need = per_dataset * seq_length + 1
    for prefix in prefixes:
        check_indexed_dataset(prefix, f"--data {prefix}")  # missing, corrupt or empty
        dataset, parts, have = IndexedDataset(prefix), [], 0
        for i in range(len(dataset)):
            parts.append(np.asarray(dataset[i], dtype=np.int64))
            have += len(parts[-1])
            if have >= need:
                break
        flat = np.concatenate(parts)[:need]
        n = (len(flat) - 1) // seq_length
        rows += [flat[k * seq_length:(k + 1) * seq_length + 1] for k in range(n)]
    data = torch.from_numpy(np.stack(rows))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def checkpoint_loss(path: str, tokens, labels, batch: int = 8) -> float:
    import torch
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_ext.inference.loading import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(path)  # a damaged checkpoint: one CheckpointError line
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), batch):
            ids = tokens[s:s + batch]
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            losses = model(ids, positions, None, labels=labels[s:s + batch])  # per token
            total += losses.double().sum().item()
            count += losses.numel()
    clear_aux_losses_tracker()
    return total / count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--load", nargs="+", required=True, help="checkpoints (roots or iter dirs)")
    p.add_argument("--data", nargs="+", required=True, help="indexed dataset prefixes")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per evaluated sequence")
    p.add_argument("--sequences-per-dataset", type=int, default=4,
                   help="sequences evaluated from each --data prefix")
    p.add_argument("--json", help="also write the results here")
    return p


def run(args) -> int:
    from megatron_ext import parallel

    tokens, labels = windows(args.data, args.seq_length, args.sequences_per_dataset)
    with parallel.single_process(seed=0):
        losses = {path: checkpoint_loss(path, tokens, labels) for path in args.load}
    first = losses[args.load[0]]
    result = {"tokens": int(labels.numel()), "losses": losses,
              "relative_gap_to_first": {k: (v - first) / first for k, v in losses.items()}}
    for path, loss in losses.items():
        gap = result["relative_gap_to_first"][path]
        print(f"held-out loss {loss:.4f}  ({gap:+.3%} vs first)  {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
