"""Data flags, named as in Megatron-LM. The trainer's parser owns batch sizes, --seq-length,
--train-iters, --seed and the evaluation flags."""
from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed-dataset prefix, or weighted list 'w1 prefix1 w2 prefix2 ...' "
                        "(default: the bundled multilingual sample corpus)")
    g.add_argument("--split", default="98,2,0",
                   help="train,valid,test document split of each --data-path prefix")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="prefixes evaluated as separate validation sets (replaces the --split "
                        "valid part)")
    g.add_argument("--curriculum", default=None, metavar="FILE",
                   help="YAML curriculum: stages with token boundaries and blends "
                        "(examples/curriculum/)")
    g.add_argument("--mock-data", action="store_true",
                   help="Megatron-Core's MockGPTDataset instead of real data")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file or local Hugging Face tokenizer directory "
                        "(default: data/tokenizer/marco_tiny_spm.model)")
    g.add_argument("--data-cache-path", default=None,
                   help="where dataset indices and the prepared sample corpus are cached "
                        "(default: $MARCO_CACHE or ~/.cache/marco-megatron)")
    return parser
