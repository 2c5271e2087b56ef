"""Command-line flags of pretrain_marco.py (Megatron-LM names where the meaning is the same).

`parse_args` parses the flags and `check_args` turns them into the frozen `RunConfig`
(config.py): every check that needs no process group (flag ranges, the parallel layout against
WORLD_SIZE, batch arithmetic, data and curriculum syntax) happens here, before any process
group or model exists, and every context-dependent default is resolved here. Defaults follow
Megatron-LM; where they differ, docs/defaults.md says why.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

from megatron_ext import data, parallel
from megatron_ext.config import (
    BatchOptions,
    CheckpointOptions,
    LoggingOptions,
    ModelOptions,
    MoEOptions,
    OptimizerOptions,
    RunConfig,
)
from megatron_ext.errors import ConfigError, LayoutError
from megatron_ext.layer_spec import default_expert_backend, te_usable, torch_grouped_problem
from megatron_ext.parallel import ParallelLayout
from megatron_ext.presets import PRESETS, ModelPreset, get_preset, override


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
                   help="auto: te with TransformerEngine on GPU; else torch-grouped "
                        "(sequential where torch._grouped_mm cannot run: fp32 on GPU, "
                        "unaligned shapes)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--recompute-granularity", choices=["full", "selective"])

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="default: the tensor-parallel size (as in Megatron-LM)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (turned on automatically for MoE with TP > 1)")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                   default=None, help="default: on with GPUs, off on CPU")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 training (default on GPU; on CPU too when given)")
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
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR/WD schedule from these flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR/WD schedule whatever the flags say")
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
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only and start at iteration 0 with a fresh optimizer, "
                        "schedule and RNG (as Megatron-LM)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state so that it loads at any "
                        "TP/PP/EP layout (slower saves); default: reshardable over DP only")
    g.add_argument("--exit-interval", type=int,
                   help="stop (after saving) once the iteration is a multiple of this")

    data.add_data_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    return check_args(build_parser().parse_args(argv))


# Flags that must be finite numbers (NaN/inf would train to NaN weights and save them).
_FINITE = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
           "init_method_std", "moe_aux_loss_coeff", "moe_z_loss_coeff", "peak_tflops")
_POSITIVE_INTS = ("micro_batch_size", "train_iters", "log_interval", "eval_iters")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in _FINITE:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{_flag(name)} {value}: must be a finite number")
    for name in _POSITIVE_INTS:
        if getattr(args, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("global_batch_size", "save_interval", "exit_interval", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {value}")
    if args.lr < 0:
        raise ConfigError(f"--lr {args.lr} must be >= 0")
    if not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    if args.eval_interval < 0:
        raise ConfigError(f"--eval-interval must be >= 0, got {args.eval_interval}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ConfigError(f"{_flag(name)} {getattr(args, name)} must be in [0, 1)")


def _model(args: argparse.Namespace) -> ModelPreset:
    preset = get_preset(args.preset)
    if not preset.is_moe and any(
        v is not None for v in (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk)
    ):
        raise ConfigError(f"--num-experts/--moe-*: preset {preset.name!r} is dense")
    m = override(
        preset,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        seq_length=args.seq_length,
    )
    if m.is_moe and not 1 <= m.moe_router_topk <= m.num_experts:
        raise ConfigError(
            f"--moe-router-topk {m.moe_router_topk} must be between 1 and the {m.num_experts} experts"
        )
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {m.seq_length} exceeds the preset's {m.max_position_embeddings} positions"
        )
    return m


def _model_options(args: argparse.Namespace, m: ModelPreset, layout: ParallelLayout) -> ModelOptions:
    on_gpu = torch.cuda.is_available()
    if args.bf16 and args.fp32:
        raise ConfigError("--bf16 and --fp32 are exclusive")
    params_dtype = torch.bfloat16 if (args.bf16 or (on_gpu and not args.fp32)) else torch.float32
    if args.fp8_format:
        if not te_usable():
            raise ConfigError(
                f"--fp8-format {args.fp8_format}: FP8 needs TransformerEngine on a GPU, "
                "which is not available here (pip install 'marco-megatron[gpu]')"
            )
        if params_dtype != torch.bfloat16:
            raise ConfigError("--fp8-format needs bf16 training (drop --fp32)")
        if args.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
            raise ConfigError("--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10+); "
                              "use delayed, tensorwise or blockwise on H100")
    backend = (default_expert_backend(params_dtype) if args.moe_expert_backend == "auto"
               else args.moe_expert_backend)
    if m.is_moe and backend == "torch-grouped":
        problem = torch_grouped_problem(m.hidden_size, m.moe_ffn_hidden_size, layout.expert_tensor,
                                        params_dtype)
        if problem and args.moe_expert_backend == "auto":
            backend = "sequential"  # the equivalent that runs any shape
        elif problem:
            raise ConfigError(f"--moe-expert-backend torch-grouped: {problem}")
    if args.fp8_format and m.is_moe and backend != "te":
        raise ConfigError(f"--fp8-format {args.fp8_format}: FP8 runs in TransformerEngine's experts "
                          f"only; --moe-expert-backend {backend} would ignore it (use te)")
    dispatcher = args.moe_token_dispatcher_type or ("alltoall" if layout.expert > 1 else "allgather")
    return ModelOptions(
        params_dtype=params_dtype,
        expert_backend=backend,
        moe=MoEOptions(
            aux_loss_coeff=args.moe_aux_loss_coeff,
            z_loss_coeff=args.moe_z_loss_coeff,
            token_dispatcher=dispatcher,
        ),
        fp8_format=args.fp8_format,
        fp8_recipe=args.fp8_recipe,
        init_method_std=args.init_method_std,
        recompute_granularity=args.recompute_granularity,
    )


def _layout(args: argparse.Namespace, m: ModelPreset) -> ParallelLayout:
    tp = args.tensor_model_parallel_size
    return ParallelLayout(
        tensor=tp,
        pipeline=args.pipeline_model_parallel_size,
        expert=args.expert_model_parallel_size,
        expert_tensor=tp if args.expert_tensor_parallel_size is None else args.expert_tensor_parallel_size,
        # Megatron-Core requires sequence parallelism for MoE with TP > 1.
        sequence_parallel=args.sequence_parallel or (m.is_moe and tp > 1),
    )


def _batch(args: argparse.Namespace, m: ModelPreset, dp: int) -> BatchOptions:
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise LayoutError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    return BatchOptions(micro_batch_size=args.micro_batch_size, global_batch_size=gbs,
                        seq_length=m.seq_length, train_iters=args.train_iters, seed=args.seed)


def _optim(args: argparse.Namespace, on_gpu: bool) -> OptimizerOptions:
    decay_iters = args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters
    if decay_iters < 1:
        raise ConfigError(f"--lr-decay-iters must be >= 1, got {decay_iters}")
    warmup = decay_iters // 10 if args.lr_warmup_iters is None else args.lr_warmup_iters
    if not 0 <= warmup < decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {warmup} must be below --lr-decay-iters {decay_iters}"
        )
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and "
                          "--use-checkpoint-opt-param-scheduler are exclusive")
    return OptimizerOptions(
        lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=warmup, lr_decay_iters=decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style, lr_wsd_decay_iters=args.lr_wsd_decay_iters,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        use_distributed_optimizer=(on_gpu if args.use_distributed_optimizer is None
                                   else args.use_distributed_optimizer),
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
    )


def _checkpoint(args: argparse.Namespace) -> CheckpointOptions:
    if args.save_interval is not None and not args.save:
        raise ConfigError("--save-interval needs --save")
    return CheckpointOptions(
        save=args.save, save_interval=args.save_interval, load=args.load,
        no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, finetune=args.finetune,
        optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
        exit_interval=args.exit_interval,
    )


def check_args(args: argparse.Namespace) -> RunConfig:
    """The flags -> the frozen RunConfig, or a ConfigError/LayoutError naming the flag."""
    _check_numbers(args)
    m = _model(args)
    layout = _layout(args, m)
    dp = parallel.validate_layout(layout, m, parallel.world_size_from_env())
    return RunConfig(
        model=m,
        layout=layout,
        model_options=_model_options(args, m, layout),
        batch=_batch(args, m, dp),
        optim=_optim(args, torch.cuda.is_available()),
        checkpoint=_checkpoint(args),
        data=data.DataOptions.from_args(args),
        logging=LoggingOptions(
            log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
            log_json=args.log_json, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
            peak_tflops=args.peak_tflops,
        ),
        data_parallel_size=dp,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        describe=args.describe,
    )
