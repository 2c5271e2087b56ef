"""Megatron DDP wrapping, the Megatron optimizer and its LR/WD scheduler, from OptimizerOptions.

Resuming with schedule flags that differ from the checkpoint's is an error naming both values
(Megatron-LM's behaviour), unless `--override-opt-param-scheduler` (take the flags) or
`--use-checkpoint-opt-param-scheduler` (take the checkpoint) says which wins.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import OptimizerOptions
from megatron_ext.errors import ConfigError

# The scheduler's settings taken from the flags: its argument (and state key) -> the
# OptimizerOptions field (flag --lr, --min-lr, ...). On resume these are compared with the
# checkpoint's; weight decay is constant here, so its increment horizon is not compared.
_SCHEDULE_FIELDS = {
    "max_lr": "lr",
    "min_lr": "min_lr",
    "lr_warmup_steps": "lr_warmup_iters",
    "lr_decay_steps": "lr_decay_iters",
    "lr_decay_style": "lr_decay_style",
    "start_wd": "weight_decay",
    "end_wd": "weight_decay",
}

# OptimizerOptions fields that Megatron's OptimizerConfig takes under the same name.
_OPTIMIZER_CONFIG_FIELDS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                            "clip_grad", "use_distributed_optimizer", "overlap_param_gather")


def wrap_ddp(model, config: TransformerConfig, opts: OptimizerOptions) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opts.overlap_grad_reduce,
        overlap_param_gather=opts.overlap_param_gather,
        # Megatron-LM's pairing: the interleaved schedule (the only one that calls the
        # trainer's `param_sync_func`) dispatches the param all-gathers of every model chunk
        # itself, so the forward hooks must not (align_param_gather); without it each chunk's
        # gathers waited for its own forward (the overlap lost).
        align_param_gather=bool(opts.overlap_param_gather and opts.use_distributed_optimizer
                                and config.virtual_pipeline_model_parallel_size),
        use_distributed_optimizer=opts.use_distributed_optimizer,
        # Megatron's check raises a RuntimeError (a traceback) on the one rank that sees the
        # NaN, before the collective the others wait in; the trainer's check of the all-reduced
        # loss and grad norm (Trainer._check_finite) stops every rank, in one line.
        check_for_nan_in_grad=False,
        # Sum over data-parallel ranks then divide: the loss is a mean over global tokens.
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, opts: OptimizerOptions,
                    params_dtype: torch.dtype) -> MegatronOptimizer:
    config = OptimizerConfig(
        optimizer="adam",
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        **{name: getattr(opts, name) for name in _OPTIMIZER_CONFIG_FIELDS},
    )
    return get_megatron_optimizer(config, model_chunks)


class MarcoScheduler(OptimizerParamScheduler):
    """Megatron's scheduler whose resume check names the flag and both values."""

    def load_state_dict(self, state_dict: dict) -> None:
        if not (self.override_opt_param_scheduler or self.use_checkpoint_opt_param_scheduler):
            mine = self.state_dict()
            for key, field in _SCHEDULE_FIELDS.items():
                if key in state_dict and state_dict[key] != mine[key]:
                    flag = "--" + field.replace("_", "-")
                    raise ConfigError(
                        f"{flag} {mine[key]} differs from the checkpoint's {state_dict[key]} "
                        f"({key}); pass --override-opt-param-scheduler to take the flags or "
                        "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
                    )
            # Everything compared is equal; the rest (weight-decay horizon) follows the flags.
            self.override_opt_param_scheduler = True
            try:
                super().load_state_dict(state_dict)
            finally:
                self.override_opt_param_scheduler = False
            return
        super().load_state_dict(state_dict)


def build_scheduler(optimizer: MegatronOptimizer, opts: OptimizerOptions,
                    train_iters: int) -> OptimizerParamScheduler:
    """Warmup, then cosine / linear / WSD decay to --min-lr, stepped once per iteration."""
    wsd_decay = None
    if opts.lr_decay_style == "WSD":
        wsd_decay = opts.lr_wsd_decay_iters or max(1, opts.lr_decay_iters // 10)
    return MarcoScheduler(
        optimizer,
        init_lr=0.0,
        **{key: getattr(opts, field) for key, field in _SCHEDULE_FIELDS.items()},
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=opts.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=opts.override_opt_param_scheduler,
        wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style=opts.lr_wsd_decay_style,
    )
