#!/usr/bin/env python3
"""Post-train Marco models into Instruct models on the pre-training trainer.

    python posttrain_marco.py sft --load runs/quickstart/moe/ckpt --save runs/sft/ckpt
    python posttrain_marco.py opd --cascade configs/posttrain/tiny_cascade.yaml --load runs/sft/ckpt ...

`sft`: supervised fine-tuning on chat data (assistant-token loss, packed conversations); with
no data flag, the bundled 19-language SFT sample (data/sft). `opd`: cascaded on-policy
distillation from ever-stronger teachers (megatron_ext/posttrain/opd.py). Both take
pretrain_marco.py's flags where they mean the same (presets, parallelism, precision,
checkpoints, TensorBoard, --log-json, signals); `--load` of a checkpoint that is not a run of
the same kind loads its weights only (fresh optimizer, iteration 0). See docs/posttraining.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_ext.cli import HelpFormatter, entry_point
from megatron_ext.recipes import flag_defaults

# Marco's SFT/OPD recipe is configs/posttrain/marco.yaml, which slurm/posttrain.sh runs too:
# its lr, min lr, decay style and warmup are the sft/opd flags' defaults (SFT lr 1e-5 cosine
# to 1e-6; OPD lr 1e-6 constant), read when the parser is built (megatron_ext/recipes.py).


def build_parser() -> argparse.ArgumentParser:
    from megatron_ext.arguments import build_parser as training_parser
    from megatron_ext.posttrain.sft_data import add_sft_data_args

    top = argparse.ArgumentParser(prog="posttrain_marco.py", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="stage", required=True, metavar="{sft,opd}")
    sft = sub.add_parser("sft", help="supervised fine-tuning on chat data",
                         description="Supervised fine-tuning on chat data: assistant-token loss, "
                                     "packed conversations; Marco's recipe defaults (lr 1e-5 "
                                     "cosine to 1e-6) are shown below.",
                         formatter_class=HelpFormatter)
    training_parser(add_data_args=add_sft_data_args, parser=sft)
    sft.set_defaults(**flag_defaults("sft"))
    try:
        from megatron_ext.posttrain.opd import add_opd_args
    except ImportError:  # on-policy distillation not installed in this checkout
        return top
    opd = sub.add_parser("opd", help="cascaded on-policy distillation",
                         description="Cascaded on-policy distillation: the student samples "
                                     "responses, teachers score them, the student learns the "
                                     "per-token gap; Marco's recipe defaults (lr 1e-6 constant) "
                                     "are shown below. --global-batch-size and --seq-length are "
                                     "derived from the rollout settings (see their help).",
                         formatter_class=HelpFormatter)
    training_parser(add_data_args=add_opd_args, parser=opd)
    opd_defaults = flag_defaults("opd")
    opd.set_defaults(**opd_defaults)
    _set_help(opd, OPD_DERIVED_HELP)
    if "lr_warmup_iters" in opd_defaults:  # the recipe's, not 10% of --lr-decay-iters
        _set_help(opd, {"--lr-warmup-iters": "warmup steps (default: "
                                             f"{opd_defaults['lr_warmup_iters']}, the recipe's)"})
    return top


# What OPD does with the batch flags (resolve_opd_args derives them from the rollout settings).
OPD_DERIVED_HELP = {
    "--global-batch-size": "rows per optimizer step; default: --rollout-batch-size x "
                           "--n-samples-per-prompt (one step per rollout); a divisor of that "
                           "product gives several steps per rollout",
    "--seq-length": "default: the longest --rollout-max-prompt-len + --rollout-max-response-len "
                    "of the cascade's phases (if given: at least that)",
    "--train-iters": "default: the cascade's total steps (with --teacher: required, the steps "
                     "of its one phase)",
}


def _set_help(parser: argparse.ArgumentParser, helps: dict) -> None:
    for action in parser._actions:
        for flag in action.option_strings:
            if flag in helps:
                action.help = helps[flag]


def _weights_only_unless_same_kind(cfg, kind: str):
    """A checkpoint of another kind (pre-trained, upcycled, imported) gives weights only."""
    from megatron_ext import checkpointing

    if not cfg.checkpoint.load or cfg.checkpoint.finetune:
        return cfg
    info = checkpointing.read_model_info(cfg.checkpoint.load)
    if (info.get("run") or {}).get("kind") == kind:
        return cfg
    return cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, finetune=True))


def main(argv=None) -> int:
    from megatron_ext.arguments import check_args

    args = build_parser().parse_args(argv)
    if args.stage == "sft":
        from megatron_ext.posttrain.sft import SFTTask
        from megatron_ext.posttrain.sft_data import SFTDataOptions

        cfg = check_args(args, data_options=SFTDataOptions.from_args)
        task = SFTTask()
    else:
        from megatron_ext.posttrain.opd import (
            OPDTask,
            opd_data_options,
            opd_options,
            resolve_opd_args,
        )

        cfg = check_args(resolve_opd_args(args), data_options=opd_data_options,
                         task_options=opd_options)
        task = OPDTask(cfg)
    cfg = _weights_only_unless_same_kind(cfg, task.kind)
    from megatron_ext.trainer import Trainer

    Trainer(cfg, task).train()
    return 0


if __name__ == "__main__":
    sys.exit(entry_point(main))
