#!/usr/bin/env python3
"""Tokenize chat data (JSON lines {"messages": [{"role", "content"}, ...]}) for SFT.

Each conversation is rendered with Qwen3's ChatML template and written as one document of two
parallel Megatron indexed datasets, PREFIX_tokens_document (token ids) and
PREFIX_loss_mask_document (1 on assistant content and its <|im_end|>, else 0), plus
PREFIX_chat.json (counts and the tokenizer's identity). Train with `posttrain_marco.py sft
--data-path PREFIX` (same tokenizer). Byte-identical output for any --workers.

Errors and skips: a line that is not JSON, a message without role or content, an unknown role
or a conversation without an assistant turn stops the tool with "error: FILE:LINE: ..." (exit
2, nothing written), and so does text with a lone surrogate ("\\ud800"); a conversation longer
than --max-length tokens is skipped and counted (listed at the end). Outputs of an earlier run
at --output-prefix are replaced only with --overwrite.

    python tools/preprocess_chat_data.py --input chats.jsonl.gz --output-prefix /data/sft/chats \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen3-0.6B \\
        --workers 8 --max-length 8192
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.cli import RawDescriptionHelpFormatter  # noqa: E402
from megatron_ext.data.args import TOKENIZER_MODEL_HELP, add_tokenizer_args  # noqa: E402
from megatron_ext.data.jsonl import add_output_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="chat JSON-lines file(s) (.jsonl or .jsonl.gz), read in order")
    g.add_argument("--max-length", type=int, default=8192,
                   help="skip (and count) conversations longer than this many tokens; a "
                        "conversation of N tokens fits --seq-length N (default 8192)")
    add_tokenizer_args(p.add_argument_group("tokenizer"), model_help=TOKENIZER_MODEL_HELP
                       + "; needs <|im_start|> and <|im_end|> as single tokens")
    add_output_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run at --output-prefix")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from megatron_ext.errors import MarcoError, report
    from megatron_ext.posttrain.sft_data import INFO, LOSS_MASK, TOKENS, preprocess_chat

    try:
        stats = preprocess_chat(args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
                                tokenizer_model=args.tokenizer_model, max_length=args.max_length,
                                workers=args.workers, progress=not args.no_progress,
                                overwrite=args.overwrite)
    except MarcoError as e:
        return report(e, rank=0)
    for where in stats.skipped_long[:20]:
        print(f"skipped {where}: longer than --max-length {args.max_length}", file=sys.stderr)
    if len(stats.skipped_long) > 20:
        print(f"skipped {len(stats.skipped_long) - 20} more conversation(s) longer than --max-length",
              file=sys.stderr)
    for suffix in (TOKENS, LOSS_MASK):
        print(f"wrote {args.output_prefix}{suffix}.bin/.idx")
    print(f"wrote {args.output_prefix}{INFO}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
