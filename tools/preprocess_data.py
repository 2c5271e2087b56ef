#!/usr/bin/env python3
"""Tokenize JSON lines (.jsonl or .jsonl.gz) into Megatron indexed datasets (.bin/.idx).

Flags follow Megatron-LM's tools/preprocess_data.py. Output: {output_prefix}_{key}_document
per --json-keys key, or with --lang-key one dataset per language value,
{output_prefix}_{lang}_{key}_document. Tokens are uint16 when the vocabulary fits, else int32.
Byte-identical output for any --workers.

    python tools/preprocess_data.py --input data/corpus/de.train.jsonl.gz \\
        --output-prefix /tmp/de_train --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tokenizer/marco_tiny_spm.model --append-eod --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import run_tool  # noqa: E402
from megatron_ext.data.args import add_tokenizer_args  # noqa: E402
from megatron_ext.data.jsonl import add_output_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSON-lines file(s), read in order")
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
    add_output_args(p)
    return p


def run(args) -> int:
    from megatron_ext.data.preprocess import preprocess

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
