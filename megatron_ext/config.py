"""The run configuration: what the flags mean once checked, frozen, and passed explicitly.

`arguments.check_args` turns the parsed flags into one `RunConfig`; nothing downstream reads
an argparse Namespace. Each component takes the part it needs:

  RunConfig
    model: ModelPreset            presets.py (the architecture, after --num-layers etc.)
    layout: ParallelLayout        parallel.py (TP / PP / EP / expert-TP / SP)
    model_options: ModelOptions   model.py (precision, expert backend, MoE router options)
    batch: BatchOptions           trainer.py (micro/global batch, sequence, iterations)
    optim: OptimizerOptions       optim.py (Adam, clipping, LR schedule, DDP overlap)
    checkpoint: CheckpointOptions checkpointing.py / trainer.py (--save, --load, ...)
    data: DataOptions             data/ (sources, tokenizer, cache)
    task: task options or None    the task's own (posttrain/opd.py OPDOptions: cascade, losses)
    logging: LoggingOptions       metrics.py / trainer.py (log line, TensorBoard, evaluation)

Every default that depends on context (bf16 on GPU, the distributed optimizer on GPU, the token
dispatcher for EP > 1, expert-TP = TP, the global batch = micro-batch x DP) is resolved in
`check_args`, so a `RunConfig` holds only final values and can be printed or compared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_ext.data.args import DataOptions
from megatron_ext.parallel import ParallelLayout, megatron_field
from megatron_ext.presets import ModelPreset


@dataclass(frozen=True)
class MoEOptions:
    """Router and dispatcher settings (Megatron-LM flag meanings; docs/defaults.md). The
    `megatron_field`s pass through unchanged: check_args copies them from their flags,
    marco_config into the TransformerConfig fields of the same name."""

    aux_loss_coeff: float = megatron_field("moe_aux_loss_coeff", 1e-3)
    z_loss_coeff: float = 1e-3                      # --moe-z-loss-coeff (0: off)
    token_dispatcher: str = "allgather"             # --moe-token-dispatcher-type, resolved
    router_score_function: str = megatron_field("moe_router_score_function", "softmax")
    router_dtype: Optional[str] = megatron_field("moe_router_dtype", "fp32")
    load_balancing_type: str = megatron_field("moe_router_load_balancing_type", "aux_loss")
    enable_expert_bias: bool = megatron_field("moe_router_enable_expert_bias", False)
    bias_update_rate: float = megatron_field("moe_router_bias_update_rate", 1e-3)
    # None: dropless
    expert_capacity_factor: Optional[float] = megatron_field("moe_expert_capacity_factor", None)
    pad_expert_input_to_capacity: bool = megatron_field("moe_pad_expert_input_to_capacity", False)
    token_drop_policy: str = megatron_field("moe_token_drop_policy", "probs")
    permute_fusion: bool = megatron_field("moe_permute_fusion", False)  # TE
    overlap_ep_comm: bool = megatron_field("overlap_moe_expert_parallel_comm", False)


@dataclass(frozen=True)
class ModelOptions:
    """How the preset's architecture is built: precision, kernels, initialisation."""

    params_dtype: torch.dtype = torch.float32
    expert_backend: str = "sequential"
    moe: MoEOptions = MoEOptions()
    fp8_format: Optional[str] = None               # --fp8-format (TransformerConfig: fp8)
    fp8_recipe: str = megatron_field("fp8_recipe", "delayed")
    init_method_std: float = megatron_field("init_method_std", 0.02)
    recompute_granularity: Optional[str] = megatron_field("recompute_granularity", None)
    recompute_modules: Optional[tuple] = None  # --recompute-modules (selective; None: core_attn)
    cross_entropy_loss_fusion: bool = megatron_field("cross_entropy_loss_fusion", False)
    cross_entropy_fusion_impl: str = megatron_field("cross_entropy_fusion_impl", "native")
    tp_comm_overlap: bool = megatron_field("tp_comm_overlap", False)  # TE


@dataclass(frozen=True)
class BatchOptions:
    micro_batch_size: int = 4
    global_batch_size: int = 4
    seq_length: int = 256
    train_iters: int = 100
    seed: int = 1234

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class OptimizerOptions:
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 100
    lr_wsd_decay_style: str = "linear"
    lr_wsd_decay_iters: Optional[int] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass(frozen=True)
class CheckpointOptions:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # weights only, iteration 0, fresh optimizer/schedule/RNG
    optim_fully_reshardable: bool = False
    exit_interval: Optional[int] = None
    overwrite_save: bool = False  # --save may hold another run's checkpoints: replace them
    async_save: bool = False  # --async-save: Megatron-Core's asynchronous torch_dist write
    keep_last: Optional[int] = None  # --keep-last-checkpoints N (None: keep every checkpoint)
    keep_every: Optional[int] = None  # --keep-checkpoint-every K: iterations kept whatever N says


@dataclass(frozen=True)
class LoggingOptions:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    log_json: Optional[str] = None
    eval_interval: int = 0
    eval_iters: Optional[int] = None  # None: the data's whole validation set if it knows it, else 2
    peak_tflops: Optional[float] = None
    wandb_project: Optional[str] = None  # --wandb-project (None: no W&B)
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    profile: bool = False  # --profile: torch profiler trace of steps [start, end)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple = (0,)


@dataclass(frozen=True)
class RunConfig:
    model: ModelPreset
    layout: ParallelLayout = ParallelLayout()
    model_options: ModelOptions = ModelOptions()
    batch: BatchOptions = BatchOptions()
    optim: OptimizerOptions = OptimizerOptions()
    checkpoint: CheckpointOptions = CheckpointOptions()
    data: DataOptions = field(default_factory=DataOptions)
    logging: LoggingOptions = LoggingOptions()
    task: Optional[Any] = None  # a task's own frozen options (OPDOptions), None for pretrain/SFT
    data_parallel_size: int = 1
    distributed_timeout_minutes: int = 30
    describe: bool = False
    skip_train: bool = False

    @property
    def num_microbatches(self) -> int:
        b = self.batch
        return b.global_batch_size // (b.micro_batch_size * self.data_parallel_size)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """The whole configuration as JSON-able data (`from_json` rebuilds an equal RunConfig):
        what the trainer prints at start and saves with every checkpoint."""
        return _encode(self)

    @staticmethod
    def from_json(record: dict) -> "RunConfig":
        cfg = _decode(record)
        if not isinstance(cfg, RunConfig):
            raise ValueError(f"not a run configuration: {type(cfg).__name__}")
        return cfg


def format_run_config(record: dict) -> str:
    """A `RunConfig.to_json()` record as 'section.field  value' lines, in field order (as
    Megatron-LM prints its arguments at start): the trainer's start-up block and
    tools/show_run_config.py's output."""
    lines = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and "__dtype__" in value:
            lines.append((prefix, value["__dtype__"]))
        elif isinstance(value, dict) and "__tuple__" in value:
            lines.append((prefix, " ".join(str(_decode(v)) for v in value["__tuple__"])))
        elif isinstance(value, dict) and value:
            for k, v in value.items():
                if k != "__class__":
                    walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            lines.append((prefix, value))

    walk("", record)
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


# JSON form: a dataclass is {"__class__": "module:Qualname", field: value...}, a tuple
# {"__tuple__": [...]}, a torch dtype {"__dtype__": "bfloat16"}; the rest is JSON as is.
def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__class__": f"{cls.__module__}:{cls.__qualname__}",
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__class__" in value:
        import importlib

        module, _, qualname = value["__class__"].partition(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**{k: _decode(v) for k, v in value.items() if k != "__class__"})
    return {k: _decode(v) for k, v in value.items()}
