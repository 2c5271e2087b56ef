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
from typing import Callable, Optional, Sequence

import torch

from megatron_ext import checkpointing, data, parallel
from megatron_ext.cli import HelpFormatter, add_expert_backend_flag
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
from megatron_ext.layer_spec import resolve_expert_backend, te_usable
from megatron_ext.parallel import ParallelLayout, megatron_names
from megatron_ext.presets import PRESETS, ModelPreset, get_preset, override


def build_parser(
    prog: str = "pretrain_marco.py",
    description: str = "Pre-train Marco MoE (and dense parent) models on Megatron-Core.",
    add_data_args: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] = data.add_data_args,
    parser: Optional[argparse.ArgumentParser] = None,
) -> argparse.ArgumentParser:
    """The training flags shared by every entry point, plus the data flags of `add_data_args`
    (pre-training data by default; post-training passes its own)."""
    p = parser or argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None,
                   help=f"one of: {', '.join(PRESETS)} (default: the --load checkpoint's "
                        "architecture, else tiny)")
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
    add_expert_backend_flag(g)
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the normal initialisation of weights trained from scratch")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="activation recomputation: full layers, or selective modules "
                        "(--recompute-modules); default: none")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel size (TP)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (PP)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="expert-parallel size (EP): the experts are split over this many ranks")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="default: the tensor-parallel size (as in Megatron-LM)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (turned on automatically for MoE with TP > 1)")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                   default=None, help="default: on with GPUs, off on CPU")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduce with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next "
                        "forward (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30,
                   help="timeout of collective operations")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 training (default on GPU; on CPU too when given)")
    g.add_argument("--fp32", action="store_true", help="fp32 training (default on CPU)")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"],
                   help="FP8 through TransformerEngine (GPU only)")
    g.add_argument("--fp8-recipe", default="delayed",
                   choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
                   help="FP8 scaling recipe, with --fp8-format")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4,
                   help="sequences per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch size x data-parallel size")
    g.add_argument("--seq-length", type=int, help="default: the preset's")
    g.add_argument("--train-iters", type=int, default=100,
                   help="total optimizer steps (global batches) of the run")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-4,
                   help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["cosine", "WSD", "linear", "constant", "inverse-square-root"],
                   help="learning-rate schedule after the warmup")
    g.add_argument("--lr-warmup-iters", type=int, help="default: 10%% of --lr-decay-iters")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-style", default="linear",
                   choices=["linear", "cosine", "exponential", "minus_sqrt"],
                   help="shape of WSD's final decay")
    g.add_argument("--lr-wsd-decay-iters", type=int,
                   help="length of WSD's final decay (default: 10%% of --lr-decay-iters)")
    # Megatron-LM spells these with an underscore (--override-opt_param-scheduler): both work.
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   action="store_true",
                   help="on resume, take the LR/WD schedule from these flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true",
                   help="on resume, keep the checkpoint's LR/WD schedule whatever the flags say")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of initialisation, data order and dropout")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10,
                   help="print the log line every N steps (TensorBoard gets every step)")
    g.add_argument("--tensorboard-dir", help="write TensorBoard event files here")
    g.add_argument("--log-json", help="append one JSON object per step to this file")
    g.add_argument("--eval-interval", type=int, default=0, help="0: no periodic evaluation")
    g.add_argument("--eval-iters", type=int, default=None,
                   help="global batches per validation set (default: 2; SFT: the whole "
                        "held-out set)")
    g.add_argument("--skip-train", action="store_true",
                   help="evaluate the (loaded) model once and exit, no training step "
                        "(as Megatron-LM)")
    g.add_argument("--peak-tflops", type=float,
                   help="per-device peak for MFU (default: 989 on H100 bf16, measured on CPU)")
    g.add_argument("--wandb-project", default=None,
                   help="log to Weights & Biases under this project (beside TensorBoard; needs "
                        "`pip install wandb`; WANDB_MODE=offline writes the run locally)")
    g.add_argument("--wandb-exp-name", default=None,
                   help="the W&B run name (default: W&B's generated one)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="directory for W&B's local files (default: --tensorboard-dir's parent, "
                        "else the working directory)")
    g.add_argument("--profile", action="store_true",
                   help="torch profiler trace of steps --profile-step-start to "
                        "--profile-step-end, written to --tensorboard-dir (TensorBoard's "
                        "profiler plugin shows it)")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="first profiled step (0-based iteration, as Megatron-LM)")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="the profile stops before this step")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[0],
                   help="global ranks that write a trace")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-interval", type=int, help="save every N steps (and at the end)")
    g.add_argument("--exit-interval", type=int,
                   help="stop (after saving) once the iteration is a multiple of this")
    g.add_argument("--load", help="resume from this checkpoint directory")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (Megatron-Core's asynchronous "
                        "torch_dist save): training goes on while a forked writer saves; the "
                        "checkpoint becomes 'latest' once every rank's write is done")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="N",
                   help="after each save delete older checkpoints but the last N (default: "
                        "keep all); see --keep-checkpoint-every")
    g.add_argument("--keep-checkpoint-every", type=int, default=None, metavar="K",
                   help="with --keep-last-checkpoints, also keep every checkpoint whose "
                        "iteration is a multiple of K")
    _add_switches(g, {
        "--no-load-optim": "load model weights only",
        "--no-load-rng": "do not restore the checkpoint's RNG states",
        "--finetune": "load model weights only and start at iteration 0 with a fresh optimizer, "
                      "schedule and RNG (as Megatron-LM)",
        "--dist-ckpt-optim-fully-reshardable": "save the distributed optimizer's state so that it "
                                               "loads at any TP/PP/EP layout (slower saves); "
                                               "default: reshardable over DP only",
        "--overwrite-save": "let --save hold checkpoints this run does not resume (another run's, "
                            "or later ones than --load's): they are deleted once this run's first "
                            "checkpoint is complete (docs/reliability.md)",
    })

    _add_lever_args(p)
    add_data_args(p)
    return p


def _add_switches(group, switches: dict[str, Optional[str]]) -> None:
    """On/off flags (off unless given), flag -> help."""
    for flag, help in switches.items():
        group.add_argument(flag, action="store_true", help=help)


RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe")


def _add_lever_args(p: argparse.ArgumentParser) -> None:
    """The H100 levers for fine-grained MoE: Megatron-LM's flag names, meanings and defaults
    (docs/defaults.md lists where they differ, docs/cluster.md "Levers" how to use them)."""
    g = p.add_argument_group("MoE router and dispatch")
    g.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"],
                   help="softmax is Marco's (qwen3_moe); sigmoid is what expert-bias balancing needs")
    g.add_argument("--moe-router-dtype", default="fp32", choices=["fp32", "fp64"],
                   help="routing and the probability-weighted expert sum in this precision "
                        "(fp32; Megatron-LM's is the model's dtype: docs/defaults.md)")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                   help="aux_loss: per micro-batch (GShard); seq_aux_loss: per sequence "
                        "(DeepSeek-V2/V3); global_aux_loss: over the global batch; none")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing: a per-expert routing bias updated from each "
                        "global batch's load (needs --moe-router-score-function sigmoid)")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="step size of the expert-bias update (--moe-router-enable-expert-bias)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="token dropping: each expert takes at most factor x its even share of "
                        "tokens (default: dropless)")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert's input to its capacity (static shapes)")
    g.add_argument("--moe-token-drop-policy", default="probs", choices=["probs", "position"],
                   help="with a capacity factor, drop the lowest-probability tokens or the last ones")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="TransformerEngine's fused token permutation (TE >= 2.1)")
    g.add_argument("--overlap-moe-expert-parallel-comm", action="store_true",
                   help="overlap the expert-parallel all-to-all with another micro-batch's "
                        "compute (combined 1F1B; EP > 1, alltoall, bf16)")
    g = p.add_argument_group("memory and kernels")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="with --recompute-granularity selective (default: core_attn)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="fused vocabulary-parallel cross-entropy")
    g.add_argument("--cross-entropy-fusion-impl", default="native", choices=["native", "te"],
                   help="implementation of --cross-entropy-loss-fusion")
    g.add_argument("--tp-comm-overlap", action="store_true",
                   help="overlap tensor-parallel communication with GEMMs (TransformerEngine)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each sequence over this many ranks (TransformerEngine attention)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size",
                   dest="num_virtual_stages_per_pipeline_rank", type=int, default=None,
                   help="interleaved pipeline: model chunks per pipeline rank")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline, given as layers per model chunk")


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    return check_args(build_parser().parse_args(argv))


# Flags that must be finite numbers (NaN/inf would train to NaN weights and save them).
_FINITE = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
           "init_method_std", "moe_aux_loss_coeff", "moe_z_loss_coeff", "peak_tflops")
_POSITIVE_INTS = ("micro_batch_size", "train_iters", "log_interval")


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
    for name in ("global_batch_size", "save_interval", "exit_interval", "seq_length", "eval_iters"):
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
    if args.preset is None and args.load:
        # The checkpoint's architecture (imported/upcycled ones may match no registered preset).

        preset = checkpointing.preset_from_checkpoint(args.load)
    else:
        preset = get_preset(args.preset or "tiny")
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
    backend = resolve_expert_backend(args.moe_expert_backend, params_dtype, m, layout.expert_tensor)
    if args.fp8_format and m.is_moe and backend != "te":
        raise ConfigError(f"--fp8-format {args.fp8_format}: FP8 runs in TransformerEngine's experts "
                          f"only; --moe-expert-backend {backend} would ignore it (use te)")
    dispatcher = args.moe_token_dispatcher_type or ("alltoall" if layout.expert > 1 else "allgather")
    _check_moe_levers(args, layout, params_dtype, dispatcher)
    _check_model_levers(args, m, layout, backend)
    moe = MoEOptions(z_loss_coeff=args.moe_z_loss_coeff, token_dispatcher=dispatcher,
                     **_megatron_flags(args, MoEOptions))
    modules = args.recompute_modules
    return ModelOptions(params_dtype=params_dtype, expert_backend=backend, moe=moe,
                        fp8_format=args.fp8_format, recompute_modules=tuple(modules) if modules else None,
                        **_megatron_flags(args, ModelOptions))


def _megatron_flags(args: argparse.Namespace, options_class) -> dict:
    """The fields of `options_class` that take their Megatron-LM flag's value unchanged."""
    return {name: getattr(args, flag) for name, flag in megatron_names(options_class).items()}


def _check_moe_levers(args: argparse.Namespace, layout: ParallelLayout, params_dtype: torch.dtype,
                      dispatcher: str) -> None:
    """The router/dispatch levers against Megatron-Core's rules (one line naming the flag
    instead of an assertion at model build)."""
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function "
                          "sigmoid (Megatron-Core's aux-loss-free routing)")
    if not math.isfinite(args.moe_router_bias_update_rate) or args.moe_router_bias_update_rate < 0:
        raise ConfigError(f"--moe-router-bias-update-rate {args.moe_router_bias_update_rate}: "
                          "must be a finite number >= 0")
    capacity = args.moe_expert_capacity_factor
    if capacity is not None and not (math.isfinite(capacity) and capacity > 0):
        raise ConfigError(f"--moe-expert-capacity-factor {capacity}: must be > 0 (omit it for "
                          "dropless routing)")
    if args.moe_pad_expert_input_to_capacity and capacity is None:
        raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if args.moe_permute_fusion and not te_usable():
        raise ConfigError("--moe-permute-fusion needs TransformerEngine >= 2.1 on a GPU (its fused "
                          "permutation kernels), which is not available here")
    if args.overlap_moe_expert_parallel_comm:
        _check_ep_overlap(args, layout, params_dtype, dispatcher)


def _check_ep_overlap(args, layout: ParallelLayout, params_dtype: torch.dtype, dispatcher: str):
    """Megatron-Core 0.16's requirements of --overlap-moe-expert-parallel-comm."""
    flag = "--overlap-moe-expert-parallel-comm"
    if layout.expert < 2:
        raise ConfigError(f"{flag} needs --expert-model-parallel-size > 1")
    if dispatcher != "alltoall":
        raise ConfigError(f"{flag} needs --moe-token-dispatcher-type alltoall, got {dispatcher}")
    if params_dtype != torch.bfloat16:
        raise ConfigError(f"{flag} needs bf16 training (--bf16)")
    if args.recompute_granularity == "full":
        raise ConfigError(f"{flag} does not work with --recompute-granularity full")
    if layout.pipeline > 1 and layout.virtual_pipeline is None:
        raise ConfigError(f"{flag} with --pipeline-model-parallel-size > 1 needs "
                          "--num-virtual-stages-per-pipeline-rank")


def _check_model_levers(args: argparse.Namespace, m: ModelPreset, layout: ParallelLayout,
                        backend: str) -> None:
    """The recompute/kernel levers against Megatron-Core's rules."""
    modules = args.recompute_modules
    if modules and args.recompute_granularity != "selective":
        raise ConfigError("--recompute-modules needs --recompute-granularity selective")
    if modules and "moe_act" in modules and m.is_moe and backend == "sequential":
        raise ConfigError("--recompute-modules moe_act needs a grouped expert backend "
                          "(--moe-expert-backend torch-grouped or te), not sequential")
    if (modules and args.fp8_format and args.fp8_recipe == "delayed"
            and {"moe_act", "layernorm"} & set(modules)):
        raise ConfigError("--recompute-modules moe_act/layernorm do not work with "
                          "--fp8-recipe delayed (Megatron-Core); use tensorwise or blockwise")
    if args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te" and not te_usable():
        raise ConfigError("--cross-entropy-fusion-impl te needs TransformerEngine on a GPU; "
                          "use native")
    if args.tp_comm_overlap:
        if not te_usable():
            raise ConfigError("--tp-comm-overlap needs TransformerEngine on a GPU (its userbuffers "
                              "GEMM overlap), which is not available here")
        if layout.tensor < 2 or not layout.sequence_parallel:
            raise ConfigError("--tp-comm-overlap needs --tensor-model-parallel-size > 1 with "
                              "--sequence-parallel")


def _virtual_stages(args: argparse.Namespace, m: ModelPreset) -> Optional[int]:
    """Megatron-LM's two ways of asking for an interleaved pipeline -> chunks per rank."""
    stages, per_stage = args.num_virtual_stages_per_pipeline_rank, args.num_layers_per_virtual_pipeline_stage
    if stages is not None and per_stage is not None:
        raise ConfigError("--num-virtual-stages-per-pipeline-rank and "
                          "--num-layers-per-virtual-pipeline-stage are exclusive")
    if per_stage is not None:
        pp = args.pipeline_model_parallel_size
        if per_stage < 1 or m.num_layers % (per_stage * pp):
            raise LayoutError(f"--num-layers-per-virtual-pipeline-stage {per_stage} x "
                              f"--pipeline-model-parallel-size {pp} must divide the "
                              f"{m.num_layers} layers")
        stages = m.num_layers // (per_stage * pp)
    return None if stages == 1 else stages  # one chunk: the plain 1F1B schedule


def _refuse_cp_for_posttraining(args: argparse.Namespace) -> None:
    """SFT rows are packed (1-D cu_seqlens) and OPD rows vary in width (1-D lengths): the
    trainer's split of every batch key along the sequence cannot cut them (docs/parallelism.md)."""
    stage = getattr(args, "stage", None)  # posttrain_marco.py's sft / opd
    if stage in ("sft", "opd") and args.context_parallel_size > 1:
        raise LayoutError(f"--context-parallel-size {args.context_parallel_size}: {stage} does "
                          "not support context parallelism (packed / variable-length rows); "
                          "use 1 and scale with data, tensor or expert parallelism")
    if stage == "opd" and getattr(args, "tp_comm_overlap", False):
        # TE's userbuffers are sized once for seq_length x micro-batch tokens; OPD rows are as
        # wide as their micro-batch's longest row, and decode steps one token (SFT rows are
        # always --seq-length wide).
        raise LayoutError("--tp-comm-overlap: opd does not support it (TE's userbuffers need one "
                          "fixed sequence length; OPD rows and decode steps vary); drop the flag")


def _check_cp(args: argparse.Namespace) -> None:
    if args.context_parallel_size > 1 and not te_usable():
        raise ConfigError(f"--context-parallel-size {args.context_parallel_size} needs "
                          "TransformerEngine's attention on a GPU; the non-TE spec's attention "
                          "has no context parallelism")


def _check_schedule(cfg: RunConfig) -> None:
    """The interleaved 1F1B schedule runs micro-batches in groups of PP (Megatron-Core 0.16's
    microbatch_group_size_per_vp_stage): their number must be a multiple of PP."""
    pp = cfg.layout.pipeline
    if cfg.layout.virtual_pipeline and cfg.num_microbatches % pp:
        raise LayoutError(
            f"--num-virtual-stages-per-pipeline-rank: the interleaved schedule needs the "
            f"micro-batches per step ({cfg.num_microbatches} = --global-batch-size / "
            f"(--micro-batch-size x DP)) to be a multiple of --pipeline-model-parallel-size {pp}")


def _layout(args: argparse.Namespace, m: ModelPreset) -> ParallelLayout:
    tp = args.tensor_model_parallel_size
    return ParallelLayout(
        tensor=tp,
        pipeline=args.pipeline_model_parallel_size,
        expert=args.expert_model_parallel_size,
        expert_tensor=tp if args.expert_tensor_parallel_size is None else args.expert_tensor_parallel_size,
        # Megatron-Core requires sequence parallelism for MoE with TP > 1.
        sequence_parallel=args.sequence_parallel or (m.is_moe and tp > 1),
        context=args.context_parallel_size,
        virtual_pipeline=_virtual_stages(args, m),
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
    distributed = on_gpu if args.use_distributed_optimizer is None else args.use_distributed_optimizer
    if args.overlap_param_gather and not (distributed and args.overlap_grad_reduce):
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and "
                          "--overlap-grad-reduce (as in Megatron-LM)")
    return OptimizerOptions(
        lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=warmup, lr_decay_iters=decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style, lr_wsd_decay_iters=args.lr_wsd_decay_iters,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        use_distributed_optimizer=distributed,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
    )


def _checkpoint(args: argparse.Namespace) -> CheckpointOptions:
    if args.save_interval is not None and not args.save:
        raise ConfigError("--save-interval needs --save")
    for name in ("keep_last_checkpoints", "keep_checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {value}")
    if args.keep_checkpoint_every is not None and args.keep_last_checkpoints is None:
        raise ConfigError("--keep-checkpoint-every needs --keep-last-checkpoints (without it "
                          "every checkpoint is kept)")
    return CheckpointOptions(
        save=args.save, save_interval=args.save_interval, load=args.load,
        no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, finetune=args.finetune,
        optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
        exit_interval=args.exit_interval, overwrite_save=args.overwrite_save,
        async_save=args.async_save, keep_last=args.keep_last_checkpoints,
        keep_every=args.keep_checkpoint_every,
    )


def _logging(args: argparse.Namespace) -> LoggingOptions:
    if args.profile:
        if not args.tensorboard_dir:
            raise ConfigError("--profile writes its trace to --tensorboard-dir: give one")
        if not 0 <= args.profile_step_start < args.profile_step_end:
            raise ConfigError(f"--profile-step-start {args.profile_step_start} must be >= 0 and "
                              f"below --profile-step-end {args.profile_step_end}")
    return LoggingOptions(
        log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
        log_json=args.log_json, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        peak_tflops=args.peak_tflops, wandb_project=args.wandb_project,
        wandb_exp_name=args.wandb_exp_name, wandb_save_dir=args.wandb_save_dir,
        profile=args.profile, profile_step_start=args.profile_step_start,
        profile_step_end=args.profile_step_end, profile_ranks=tuple(args.profile_ranks),
    )


def check_args(args: argparse.Namespace, data_options: Callable = data.DataOptions.from_args,
               task_options: Optional[Callable] = None) -> RunConfig:
    """The flags -> the frozen RunConfig, or a ConfigError/LayoutError naming the flag.
    `data_options(args)` makes the data part (pre-training DataOptions by default);
    `task_options(args)`, when given, the task's own options (OPD's cascade and losses)."""
    _refuse_cp_for_posttraining(args)
    _check_numbers(args)
    m = _model(args)
    _check_cp(args)
    layout = _layout(args, m)
    dp = parallel.validate_layout(layout, m, parallel.world_size_from_env())
    cfg = RunConfig(
        model=m,
        layout=layout,
        model_options=_model_options(args, m, layout),
        batch=_batch(args, m, dp),
        optim=_optim(args, torch.cuda.is_available()),
        checkpoint=_checkpoint(args),
        data=data_options(args),
        task=task_options(args) if task_options else None,
        logging=_logging(args),
        data_parallel_size=dp,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        describe=args.describe,
        skip_train=args.skip_train,
    )
    _check_schedule(cfg)
    return cfg
