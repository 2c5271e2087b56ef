#!/usr/bin/env python3
"""Print the run configuration a checkpoint was saved with (every resolved setting of the run).

    python tools/show_run_config.py runs/tiny/ckpt              # 'section.field  value' lines
    python tools/show_run_config.py runs/tiny/ckpt/iter_0000200 --json

The trainer saves its frozen RunConfig (megatron_ext/config.py) as `marco_run_config.json`
beside `marco_model.json` in every checkpoint, and prints the same block when it starts;
`--json` prints the saved record, which `RunConfig.from_json` turns back into the run's
RunConfig. Checkpoints made by the converters (upcycle, import) have no run configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import run_tool, tool_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("checkpoint", help="checkpoint root (its latest iteration) or one iter_N directory")
    p.add_argument("--json", action="store_true", help="print the saved JSON record as it is")
    return p


def run(args: argparse.Namespace) -> int:
    from megatron_ext.checkpointing import read_run_config
    from megatron_ext.config import format_run_config

    record = read_run_config(args.checkpoint)
    print(json.dumps(record, indent=1) if args.json else format_run_config(record))
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
