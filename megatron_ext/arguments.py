"""Command-line flags of pretrain_marco.py (Megatron-LM names where the meaning is the same).

`parse_args` parses and checks everything that can be checked without starting processes;
the parallel layout is checked against the world size in `parallel.validate_layout`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from megatron_ext import data
from megatron_ext.errors import ConfigError
from megatron_ext.presets import PRESETS, get_preset, override


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_marco.py",
        description="Pre-train Marco MoE (and dense parent) models on Megatron-Core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    g.add_argument("--describe", action="store_true",
                   help="print parameter counts and FLOPs per token as one JSON line and exit")
    g.add_argument("--num-layers", type=int, help="override the preset's layer count")
    g.add_argument("--num-experts", type=int, help="override the preset's expert count")
    g.add_argument("--moe-ffn-hidden-size", type=int, help="override the expert FFN size")
    g.add_argument("--moe-router-topk", type=int, help="override the router top-k")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-3,
                   help="load-balancing loss coefficient (Marco's is not published)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=1e-3,
                   help="router z-loss coefficient (0 disables)")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"],
                   help="default: alltoall when expert parallel size > 1, else allgather")
    g.add_argument("--moe-expert-backend", default="auto",
                   choices=["auto", "te", "torch-grouped", "sequential"],
                   help="auto: te with TransformerEngine on GPU, torch-grouped on GPU without "
                        "it, sequential on CPU")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--recompute-granularity", choices=["full", "selective"])

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (turned on automatically for MoE with TP > 1)")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                   default=None, help="default: on with GPUs, off on CPU")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 training (default on GPU)")
    g.add_argument("--fp32", action="store_true", help="fp32 training (default on CPU)")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"],
                   help="FP8 through TransformerEngine (GPU only)")
    g.add_argument("--fp8-recipe", default="delayed",
                   choices=["delayed", "tensorwise", "blockwise", "mxfp8"])

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch size x data-parallel size")
    g.add_argument("--seq-length", type=int, help="default: the preset's")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["cosine", "WSD", "linear", "constant", "inverse-square-root"])
    g.add_argument("--lr-warmup-iters", type=int, help="default: 10%% of --lr-decay-iters")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-style", default="linear",
                   choices=["linear", "cosine", "exponential", "minus_sqrt"])
    g.add_argument("--lr-wsd-decay-iters", type=int,
                   help="length of WSD's final decay (default: 10%% of --lr-decay-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", help="write TensorBoard event files here")
    g.add_argument("--log-json", help="append one JSON object per step to this file")
    g.add_argument("--eval-interval", type=int, default=0, help="0: no periodic evaluation")
    g.add_argument("--eval-iters", type=int, default=2)
    g.add_argument("--peak-tflops", type=float,
                   help="per-device peak for MFU (default: 989 on H100 bf16, measured on CPU)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-interval", type=int, help="save every N steps (and at the end)")
    g.add_argument("--load", help="resume from this checkpoint directory")
    g.add_argument("--no-load-optim", action="store_true", help="load model weights only")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state so that it loads at any "
                        "TP/PP/EP layout (slower saves); default: reshardable over DP only")
    g.add_argument("--exit-interval", type=int,
                   help="stop (after saving) once the iteration is a multiple of this")

    data.add_data_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Turn preset + overrides into `args.model` and fill the context-dependent defaults."""
    try:
        preset = get_preset(args.preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not preset.is_moe and any(
        v is not None for v in (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk)
    ):
        raise ConfigError(f"--num-experts/--moe-*: preset {preset.name!r} is dense")
    args.model = override(
        preset,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        seq_length=args.seq_length,
    )
    args.seq_length = args.model.seq_length
    m = args.model
    if m.is_moe and not 1 <= m.moe_router_topk <= m.num_experts:
        raise ConfigError(
            f"--moe-router-topk {m.moe_router_topk} must be between 1 and the {m.num_experts} experts"
        )
    if args.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {args.seq_length} exceeds the preset's {m.max_position_embeddings} positions"
        )

    on_gpu = torch.cuda.is_available()
    if args.bf16 and args.fp32:
        raise ConfigError("--bf16 and --fp32 are exclusive")
    args.params_dtype = torch.bfloat16 if (args.bf16 or (on_gpu and not args.fp32)) else torch.float32
    if args.fp8_format:
        from megatron_ext.layer_spec import te_usable

        if not te_usable():
            raise ConfigError(
                f"--fp8-format {args.fp8_format}: FP8 needs TransformerEngine on a GPU, "
                "which is not available here (pip install 'marco-megatron[gpu]')"
            )
        if args.params_dtype != torch.bfloat16:
            raise ConfigError("--fp8-format needs bf16 training (drop --fp32)")
    from megatron_ext.layer_spec import default_expert_backend

    args.expert_backend = (
        default_expert_backend() if args.moe_expert_backend == "auto" else args.moe_expert_backend
    )
    if args.use_distributed_optimizer is None:
        args.use_distributed_optimizer = on_gpu
    if args.moe_token_dispatcher_type is None:
        args.moe_token_dispatcher_type = "alltoall" if args.expert_model_parallel_size > 1 else "allgather"
    if m.is_moe and args.tensor_model_parallel_size > 1:
        args.sequence_parallel = True
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    for flag in ("micro_batch_size", "train_iters", "log_interval"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = args.lr_decay_iters // 10
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
            f"{args.lr_decay_iters}"
        )
    if args.save_interval is not None and not args.save:
        raise ConfigError("--save-interval needs --save")
    data.check_data_args(args)
