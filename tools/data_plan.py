#!/usr/bin/env python3
"""What a curriculum draws from the data a manifest names: per source and stage, the tokens
available (counted, or estimated from a sample with its error), the tokens the stage draws and
the implied epochs.

    python tools/data_plan.py configs/data/tiny_manifest.yaml configs/curriculum/tiny.yaml
    python tools/data_plan.py MANIFEST configs/curriculum/marco_5.1T.yaml --output-dir /data/marco

A source the curriculum blends that has no data is an error (exit 2); a source drawn more than
--max-epochs times is a warning. Details: docs/data.md, megatron_ext/data/plan.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import run_tool, tool_parser  # noqa: E402


def build_parser():
    p = tool_parser(__doc__)
    p.add_argument("manifest", help="data manifest YAML (configs/data/)")
    p.add_argument("curriculum", help="curriculum YAML (configs/curriculum/)")
    p.add_argument("--max-epochs", type=float, default=4.0,
                   help="warn when a source is drawn more often than this over the curriculum")
    p.add_argument("--output-dir", default=None,
                   help="preprocessed output (tools/preprocess_data.py --manifest): a source whose "
                        "shards all finished is counted from their records")
    p.add_argument("--count-below", type=float, default=256.0, metavar="MB",
                   help="count every token of a source whose files hold at most this many MB; "
                        "estimate larger ones from a sample")
    p.add_argument("--sample-docs", type=int, default=2000, help="documents sampled per source")
    p.add_argument("--sample-files", type=int, default=16, help="files sampled per source")
    return p


def run(args) -> int:
    from megatron_ext.data.curriculum import load_curriculum
    from megatron_ext.data.errors import DataConfigError
    from megatron_ext.data.manifest import load_manifest
    from megatron_ext.data.plan import available, check_coverage, draws, plan_rows, render
    from megatron_ext.data.tokenizer import build_tokenizer

    if args.max_epochs <= 0 or args.sample_docs < 1 or args.sample_files < 1:
        raise DataConfigError("--max-epochs, --sample-docs and --sample-files must be positive")
    manifest = load_manifest(args.manifest)
    curriculum = load_curriculum(args.curriculum)
    warnings = check_coverage(manifest, curriculum)
    tok = build_tokenizer(manifest.tokenizer_type, manifest.tokenizer_model)
    avail = {name: available(manifest, name, tok, out_dir=args.output_dir,
                             count_below=int(args.count_below * 2**20), sample_docs=args.sample_docs,
                             sample_files=args.sample_files)
             for name in draws(curriculum)}
    model = os.path.normpath(manifest.tokenizer_model) if manifest.tokenizer_model else None
    print(f"# {args.manifest} -> {args.curriculum} (tokenizer {manifest.tokenizer_type} "
          f"{model or 'data/tokenizer/marco_tiny_spm.model'})")
    print("\n".join(render(curriculum, avail, plan_rows(curriculum, avail), args.max_epochs)))
    for line in warnings:
        print(line)
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
