"""Data flags, named as in Megatron-LM, and `DataOptions`, what they mean once checked.

The trainer's parser owns batch sizes, --seq-length, --train-iters, --seed and the evaluation
flags. `DataOptions.from_args` makes the frozen options the data layer takes (no module reads
an argparse Namespace it did not parse).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.curriculum import load_curriculum
from megatron_ext.data.errors import DataConfigError

TOKENIZER_TYPES = ["SentencePieceTokenizer", "HuggingFaceTokenizer"]
TOKENIZER_MODEL_HELP = ("SentencePiece .model file or local Hugging Face tokenizer directory "
                        "(default: data/tokenizer/marco_tiny_spm.model)")


@dataclass(frozen=True)
class DataOptions:
    """Where the training data comes from and how it is tokenised."""

    data_path: Optional[tuple[str, ...]] = None
    split: str = "98,2,0"
    valid_data_path: Optional[tuple[str, ...]] = None
    curriculum: Optional[str] = None
    mock_data: bool = False
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, check: bool = True) -> "DataOptions":
        """The options of the flags `add_data_args` defines (checked unless told not to)."""
        opts = cls(
            data_path=tuple(args.data_path) if args.data_path else None,
            split=args.split,
            valid_data_path=tuple(args.valid_data_path) if args.valid_data_path else None,
            curriculum=args.curriculum,
            mock_data=args.mock_data,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            data_cache_path=args.data_cache_path,
        )
        if check:
            check_data_options(opts)
        return opts


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
                        "(configs/curriculum/)")
    g.add_argument("--mock-data", action="store_true",
                   help="Megatron-Core's MockGPTDataset instead of real data")
    add_tokenizer_args(g, cache_help="where dataset indices and the prepared sample corpus are cached "
                                     "(default: $MARCO_CACHE or ~/.cache/marco-megatron)")
    return parser


def add_tokenizer_args(group, *, model_help: str = TOKENIZER_MODEL_HELP, cache_help: Optional[str] = None,
                       if_missing: bool = False) -> None:
    """--tokenizer-type and --tokenizer-model, and --data-cache-path when `cache_help` is given.
    `if_missing`: leave out the flags the parser already defines (e.g. through add_data_args),
    for flag sets that also stand alone (SFT data, OPD)."""
    have = set(group._option_string_actions) if if_missing else set()
    if "--tokenizer-type" not in have:
        group.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES,
                           help="tokenizer kind: SentencePiece .model or Hugging Face directory")
    if "--tokenizer-model" not in have:
        group.add_argument("--tokenizer-model", default=None, help=model_help)
    if cache_help is not None and "--data-cache-path" not in have:
        group.add_argument("--data-cache-path", default=None, help=cache_help)


def check_data_options(args: DataOptions) -> None:
    """Parse-time checks that read no data: flag conflicts, --data-path / --split syntax and
    the curriculum file. build_pretraining_data repeats them and checks the datasets."""
    if args.mock_data and (args.data_path or args.curriculum):
        raise DataConfigError("--mock-data: not with --data-path or --curriculum")
    if args.curriculum and args.data_path:
        raise DataConfigError("--curriculum: the file names the data; drop --data-path")
    if args.data_path:
        parse_data_path(args.data_path, "--data-path")
        parse_split(args.split)
    if args.valid_data_path:
        parse_data_path(args.valid_data_path, "--valid-data-path")
    if args.curriculum:
        load_curriculum(args.curriculum)


def parse_data_path(values, flag: str) -> tuple[list[str], Optional[list[float]]]:
    """Megatron-LM's blend list: 'prefix1 prefix2 ...' (weights None: blended by dataset size)
    or 'w1 prefix1 w2 prefix2 ...'."""
    values = list(values)
    pairs = len(values) % 2 == 0 and len(values) >= 2
    if pairs:
        parsed = [_weight(w) for w in values[::2]]
        if all(w is None for w in parsed):
            pairs = False
        elif any(w is None for w in parsed):
            bad = values[::2][parsed.index(None)]
            raise DataConfigError(f"{flag}: '{bad}' is not a weight; give either prefixes only "
                                  f"or 'w1 prefix1 w2 prefix2 ...'")
    if not pairs:
        numbers = [v for v in values if _weight(v) is not None]
        if numbers:  # an odd list with weights in it: a weight or a prefix is missing
            raise DataConfigError(f"{flag}: expected prefixes only or 'weight prefix' pairs, got "
                                  f"{len(values)} values with weight '{numbers[0]}'")
        return values, None
    prefixes, weights = [], []
    for w, p in zip(values[::2], values[1::2]):
        weight = _weight(w)
        if not math.isfinite(weight) or weight < 0:
            raise DataConfigError(f"{flag}: weight {w} of {p} must be >= 0")
        if weight > 0:
            prefixes.append(p)
            weights.append(weight)
    if not prefixes:
        raise DataConfigError(f"{flag}: all weights are zero")
    return prefixes, weights


def _weight(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in re.split(r"[,/]", split)]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(x < 0 or not math.isfinite(x) for x in parts) or parts[0] <= 0:
        raise DataConfigError(f"--split {split}: expected 'train,valid,test' weights with train > 0")
    parts += [0.0] * (3 - len(parts))
    return [x / sum(parts) for x in parts]
