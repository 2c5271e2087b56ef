#!/usr/bin/env python3
"""Tokenize documents (JSON lines, parquet, Arrow) into Megatron indexed datasets (.bin/.idx).

Flags follow Megatron-LM's tools/preprocess_data.py. Inputs: JSON lines (.jsonl, .gz, .zst),
.parquet, .arrow, or a `datasets` save_to_disk directory; --json-keys / --lang-key name JSON
keys or columns. Output: {output_prefix}_{key}_document per --json-keys key, or with --lang-key
one dataset per language value, {output_prefix}_{lang}_{key}_document. Tokens are uint16 when
the vocabulary fits, else int32. Byte-identical output for any --workers and any input form.

    python tools/preprocess_data.py --input data/corpus/de.train.jsonl.gz \\
        --output-prefix /tmp/de_train --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tokenizer/marco_tiny_spm.model --append-eod --workers 2

A manifest (configs/data/, docs/data.md) instead of --input: its files as shards, one task of
slurm/preprocess.sbatch's job array each, then one final step that merges each source:
    python tools/preprocess_data.py --manifest M --output-dir D --pending      # task ids to run
    python tools/preprocess_data.py --manifest M --output-dir D --task K       # or --task all
    python tools/preprocess_data.py --manifest M --output-dir D --finalize
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import HelpFormatter, run_tool  # noqa: E402
from megatron_ext.data.args import add_tokenizer_args  # noqa: E402
from megatron_ext.data.jsonl import add_output_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", default=None,
                   help="input file(s), read in order: JSON lines (.jsonl, .gz, .zst), .parquet, "
                        ".arrow, or a datasets save_to_disk directory")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys of the text fields to tokenize (one output each)")
    g.add_argument("--lang-key", default=None,
                   help="key of a language field: write one dataset per language")
    g.add_argument("--on-bad-line", choices=["stop", "skip"], default="stop",
                   help="a line that is not JSON or lacks a key: stop with its file:line, or "
                        "skip it (and list it)")
    g = p.add_argument_group("tokenizer")
    add_tokenizer_args(g)
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    add_output_args(p, required=False)
    g = p.add_argument_group("manifest (sharded preprocessing: slurm/preprocess.sbatch)")
    g.add_argument("--manifest", default=None, help="data manifest YAML, instead of --input")
    g.add_argument("--output-dir", default=None, help="where the manifest's datasets go (the "
                   "curriculum's data root)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--task", default=None, metavar="K|all",
                      help="run array task K (0-based; default $SLURM_ARRAY_TASK_ID), or all "
                           "tasks in turn; a finished shard is skipped")
    mode.add_argument("--pending", action="store_true",
                      help="print the unfinished task ids as an sbatch --array list")
    mode.add_argument("--finalize", action="store_true",
                      help="merge each source's shards and write OUTPUT_DIR/prefixes.yaml")
    g.add_argument("--no-merge", action="store_true",
                   help="with --finalize: list the shards only (a --data-path list per source)")
    return p


def run_manifest(args) -> int:
    from megatron_ext.data.errors import DataConfigError
    from megatron_ext.data.manifest import load_manifest
    from megatron_ext.data.shards import array_spec, finalize, pending, run_task

    if args.input or args.output_prefix:
        raise DataConfigError("--manifest: names the inputs and outputs; drop --input/--output-prefix")
    if not args.output_dir:
        raise DataConfigError("--manifest: --output-dir is required")
    if not os.path.isdir(args.output_dir):
        raise DataConfigError(f"--output-dir {args.output_dir}: no such directory")
    manifest = load_manifest(args.manifest)
    manifest.check_files()
    if args.pending:
        print(array_spec(pending(manifest, args.output_dir)))
    elif args.finalize:
        finalize(manifest, args.output_dir, merge=not args.no_merge)
    else:
        task = args.task if args.task is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if task == "all":
            tasks = range(len(manifest.shards()))
        elif task is not None and task.isdigit():
            tasks = [int(task)]
        else:
            raise DataConfigError(f"--task {task}: expected a task id or 'all' (or run as a Slurm "
                                  "array task)")
        for k in tasks:
            run_task(manifest, args.output_dir, k, workers=args.workers,
                     progress=not args.no_progress, log=lambda line: print(line, flush=True))
    return 0


def run(args) -> int:
    from megatron_ext.data.errors import DataConfigError
    from megatron_ext.data.preprocess import preprocess

    if args.manifest:
        return run_manifest(args)
    if not args.input or not args.output_prefix:
        raise DataConfigError("--input and --output-prefix are required (or --manifest)")

    stats = preprocess(
        args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, json_keys=args.json_keys,
        lang_key=args.lang_key, append_eod=args.append_eod, workers=args.workers,
        on_bad_line=args.on_bad_line, progress=not args.no_progress)
    for where in stats.skipped[:20]:
        print(f"skipped {where}", file=sys.stderr)
    if len(stats.skipped) > 20:
        print(f"skipped {len(stats.skipped) - 20} more bad line(s)", file=sys.stderr)
    for name, prefix in stats.outputs.items():
        print(f"wrote {prefix}.bin/.idx ({stats.tokens_by_output[name]} tokens)")
    print(stats.summary())
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv, output="output_prefix")


if __name__ == "__main__":
    sys.exit(main())
