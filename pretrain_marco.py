#!/usr/bin/env python3
"""Pre-train Marco MoE models (and their dense parents) on Megatron-Core.

    python pretrain_marco.py --preset tiny                       # CPU, bundled corpus
    python pretrain_marco.py --preset nano --describe            # parameter / FLOP counts
    torchrun --nproc-per-node 8 pretrain_marco.py --preset mini --expert-model-parallel-size 8 ...

One batch goes: arguments.py (flags -> frozen RunConfig) -> trainer.py (the loop) -> model.py /
layer_spec.py (the Megatron model) -> checkpointing.py. See README.md for the flags.
"""

from __future__ import annotations

import json
import sys

from megatron_ext.cli import entry_point


def main(argv=None) -> int:
    from megatron_ext import parallel
    from megatron_ext.arguments import parse_args

    cfg = parse_args(argv)
    if cfg.describe:
        from megatron_ext.flops import describe

        parallel.init_distributed(parallel.ParallelLayout(), cfg.batch.seed)
        if parallel.is_rank_zero():
            print(json.dumps(describe(cfg.model, cfg.batch.seq_length)))
        return 0
    from megatron_ext.trainer import Trainer

    Trainer(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(entry_point(main))
