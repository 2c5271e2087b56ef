#!/usr/bin/env python3
"""Pre-train Marco MoE models (and their dense parents) on Megatron-Core.

    python pretrain_marco.py --preset tiny                       # CPU, bundled corpus
    python pretrain_marco.py --preset nano --describe            # parameter / FLOP counts
    torchrun --nproc-per-node 8 pretrain_marco.py --preset mini --expert-model-parallel-size 8 ...

See README.md for the flags; megatron_ext/trainer.py for the loop.
"""

from __future__ import annotations

import json
import os
import sys
import warnings


def _quiet_known_warnings() -> None:
    # Megatron-Core warns at import about optional CUDA extras (apex, TE, nvidia-resiliency);
    # their absence is expected on CPU and documented in README.
    for pattern in (".*[Aa]pex.*", ".*Transformer Engine.*", ".*transformer_engine.*",
                    ".*nvidia_resiliency.*", ".*deprecated.*", ".*torch.distributed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


def main(argv=None) -> int:
    _quiet_known_warnings()
    from megatron_ext import parallel
    from megatron_ext.arguments import parse_args
    from megatron_ext.errors import MarcoError, report

    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)
        if args.describe:
            from megatron_ext.flops import describe
            from megatron_ext.parallel import ParallelLayout

            parallel.init_distributed(ParallelLayout(), args.seed)
            if rank == 0:
                print(json.dumps(describe(args.model, args.seq_length)))
            return 0
        from megatron_ext.trainer import Trainer

        Trainer(args).train()
        return 0
    except MarcoError as e:
        return report(e, rank)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
