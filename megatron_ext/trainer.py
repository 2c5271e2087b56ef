"""The trainer: one loop over Megatron-Core's engine, for pre-training and post-training.

setup:  process groups -> model stage -> DDP -> optimizer + scheduler -> (load) -> data
step:   get_forward_backward_func (pipeline schedule) -> finalize grads -> optimizer step
        -> scheduler step -> metrics
exit:   at --train-iters, --exit-interval, or SIGTERM/SIGUSR1 (finish the step, save, exit 0)

The trainer takes a frozen `RunConfig` (config.py; every flag was checked at parse time) and a
*task*: what the data is and how a micro-batch becomes a loss. Pre-training and SFT differ
only in their data (SFT batches carry an attention mask for packed conversations and a loss
mask over assistant tokens); on-policy distillation supplies its own task.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from megatron_ext import checkpointing, data, parallel
from megatron_ext.config import RunConfig, format_run_config
from megatron_ext.errors import CheckpointError, TrainingError
from megatron_ext.flops import (
    H100_BF16_PEAK_TFLOPS,
    analytic_model_size,
    checkpoint_bytes,
    training_flops_per_token,
)
from megatron_ext.metrics import MetricsWriter, StepClock, peak_memory_gib, start_profiler
from megatron_ext.model import build_stages, run_device  # the builder places the model there
from megatron_ext.optim import build_optimizer, build_scheduler, wrap_ddp
from megatron_ext.routing import RoutingRecorder
from megatron_ext.task import StepInterrupted, Task

log = logging.getLogger(__name__)

# Megatron's aux-loss tracker names (per --moe-router-load-balancing-type) -> the logged name.
_AUX_LOSS_NAMES = {"load_balancing_loss": "load_balancing_loss",
                   "seq_load_balancing_loss": "load_balancing_loss",
                   "global_load_balancing_loss": "load_balancing_loss",
                   "z_loss": "z_loss"}


def _initialize_tp_communicators(cfg: RunConfig) -> None:
    """--tp-comm-overlap: TransformerEngine's userbuffers for the TP GEMM overlap, sized for one
    micro-batch's sequence-parallel activations (Megatron-LM's _initialize_tp_communicators)."""
    from transformer_engine.pytorch import module as te_module

    b, layout = cfg.batch, cfg.layout
    te_module.base.initialize_ub(
        shape=[b.seq_length * b.micro_batch_size // layout.context, cfg.model.hidden_size],
        tp_size=layout.tensor, use_fp8=cfg.model_options.fp8_format is not None,
        bootstrap_backend="nccl")


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) request a save-and-exit, from
    the trainer's construction until `restore()` (the end of `train()`, or a failed set-up)
    gives the process its previous handlers back: a library caller (a notebook, a test, a tool
    that trains then forks workers) is not left with a SIGTERM that only sets a flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (collective)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=run_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def to_device(batch: dict) -> dict:
    """A micro-batch on this rank's device; with context parallelism, this rank's part of the
    sequence (Megatron's load-balanced 2 x CP chunks)."""
    device = run_device()
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    return batch


class _SchedulePlanBuilder:
    """A model chunk whose call builds Megatron's schedule plan instead of running forward:
    lets any task's forward step serve the combined 1F1B schedule of
    --overlap-moe-expert-parallel-comm (which asks `forward_step(..., return_schedule_plan=True)`)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model.build_schedule_plan(*args, **kwargs)


def _with_schedule_plan(step: Callable) -> Callable:
    def forward_step(data_iterator, model, return_schedule_plan: bool = False):
        return step(data_iterator, _SchedulePlanBuilder(model) if return_schedule_plan else model)

    return forward_step


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean cross-entropy; reports (loss sum, token count) for exact global averaging."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch: tokens -> per-token cross-entropy, masked by `loss_mask`. A batch may
    carry a boolean `attention_mask` [b, 1, s, s] (True = masked; packed conversations)."""
    batch = to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


class PretrainTask(Task):
    """Pre-training: the stages of megatron_ext.data (corpus, --data-path, curriculum),
    next-token cross-entropy (the task contract: task.py)."""

    kind = "pretrain"
    forward_step = staticmethod(forward_step)

    def build_data(self, trainer: "Trainer"):
        cfg = trainer.cfg
        return data.build_pretraining_data(
            cfg.data, trainer.tokenizer, global_batch_size=cfg.batch.global_batch_size,
            seq_length=cfg.batch.seq_length, train_iters=cfg.batch.train_iters,
            seed=cfg.batch.seed)


def _metric_name(report_name: str) -> str:
    return report_name.replace(" ", "_")


def measure_cpu_peak_tflops() -> float:
    """Achievable fp32 matmul rate of this CPU (all threads): the MFU denominator on CPU."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e12


class Trainer:
    """One training run of a task (PretrainTask by default; posttrain/ has SFT and OPD)."""

    def __init__(self, cfg: RunConfig, task: Optional[Task] = None):
        self.cfg = cfg
        self.preset = cfg.model
        self.task = task or PretrainTask()
        self.forward_step = (_with_schedule_plan(self.task.forward_step)
                             if cfg.model_options.moe.overlap_ep_comm else self.task.forward_step)
        self._report_names: Optional[list[str]] = None
        self.stop_signal = StopSignal()  # first: a signal during setup still means "save and stop"
        try:
            self._set_up(cfg)
        except BaseException:
            self.stop_signal.restore()
            raise

    def _set_up(self, cfg: RunConfig) -> None:
        self.dp_size = cfg.data_parallel_size
        self.num_microbatches = cfg.num_microbatches
        # Everything above was checked before any process group or model exists.
        self.tokenizer = data.build_tokenizer_from_options(cfg.data)
        data.check_vocab(self.tokenizer, self.preset.vocab_size)

        parallel.init_distributed(cfg.layout, cfg.batch.seed, cfg.distributed_timeout_minutes)
        self.rank = dist.get_rank()
        self.is_logging_rank = self.rank == dist.get_world_size() - 1
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.save_dir = self._check_checkpoint_paths(cfg)  # before the model: fail in seconds

        if cfg.model_options.tp_comm_overlap:
            _initialize_tp_communicators(cfg)
        # One model chunk per virtual pipeline stage (interleaved 1F1B), else one.
        models, self.config = build_stages(self.preset, cfg.model_options, cfg.layout,
                                           seq_length=cfg.batch.seq_length)
        self.model = [wrap_ddp(model, self.config, cfg.optim) for model in models]
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.model_options.params_dtype)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.batch.train_iters)
        self._wire_grad_sync()

        self.state = checkpointing.TrainState()
        if cfg.checkpoint.load:
            self._load(cfg.checkpoint)

        self.data = self.task.build_data(self)  # logs its plan

        # The local model is a shard under TP/PP/EP: count the full model by formula.
        self.size = analytic_model_size(self.preset)
        self.flops_per_token = training_flops_per_token(self.size, self.preset, cfg.batch.seq_length)
        self.peak_tflops = cfg.logging.peak_tflops or (
            H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else measure_cpu_peak_tflops()
        )
        lg = cfg.logging
        self.metrics = MetricsWriter(self.is_logging_rank, lg.tensorboard_dir, lg.log_json,
                                     lg.log_interval, cfg.batch.train_iters,
                                     wandb=self._wandb_settings(cfg))
        self.clock = StepClock(cfg.batch.train_iters)
        self.async_saves = checkpointing.AsyncSaves() if cfg.checkpoint.async_save else None
        self.routing = (
            RoutingRecorder(self.model, self.preset.num_layers, self.preset.num_experts)
            if self.preset.is_moe
            else None
        )

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _wandb_settings(cfg: RunConfig) -> Optional[dict]:
        lg = cfg.logging
        if not lg.wandb_project:
            return None
        tb = lg.tensorboard_dir
        save_dir = lg.wandb_save_dir or (os.path.dirname(os.path.abspath(tb)) if tb else None)
        return {"project": lg.wandb_project, "name": lg.wandb_exp_name, "dir": save_dir,
                "config": cfg.to_json()}

    def _check_checkpoint_paths(self, cfg: RunConfig):
        """--load complete and holding this model; --save claimed (locked, not another run's,
        writable, room for a checkpoint): one line and exit 2 now, not after hours of training."""
        ck = cfg.checkpoint
        if ck.load:
            checkpointing.check_loadable(ck.load, self.preset)
        if not ck.save:
            return None
        return checkpointing.claim_save_directory(
            ck.save, load=ck.load, finetune=ck.finetune, overwrite=ck.overwrite_save,
            needed=checkpoint_bytes(self.preset, cfg.model_options.params_dtype))

    def _load(self, opts) -> None:
        weights_only = opts.no_load_optim or opts.finetune
        loaded = checkpointing.load_checkpoint(
            opts.load,
            self.model,
            None if weights_only else self.optimizer,
            None if weights_only else self.scheduler,
            load_rng=not (opts.no_load_rng or opts.finetune),
            preset=self.preset,
        )
        self.state = loaded.state
        if loaded.model_only:
            # Weights only (an upcycled or converted checkpoint, --no-load-optim, --finetune):
            # a fresh optimizer and schedule. The optimizer was built before the load: in bf16
            # its fp32 main params are copies of the random init, and its first step would copy
            # them back over the loaded weights. Refresh them from the model (as Megatron-LM).
            self.optimizer.reload_model_params()
            if opts.finetune:
                self.state = checkpointing.TrainState()
            self.log(f"loaded model weights from {loaded.path} (iteration {loaded.state.iteration}"
                     f"; training starts at iteration {self.state.iteration})")
        else:
            self.log(f"resumed from {loaded.path} at iteration {self.state.iteration}")
        train_iters = self.cfg.batch.train_iters
        if self.state.iteration > train_iters:
            raise CheckpointError(
                f"--load {opts.load}: the checkpoint is at iteration {self.state.iteration}, "
                f"past --train-iters {train_iters}; raise --train-iters to continue training")

    def _wire_grad_sync(self) -> None:
        """Megatron-LM's wiring: one function, or one per model chunk (interleaving)."""
        cfg = self.config

        def per_chunk(name):
            funcs = [getattr(ddp, name) for ddp in self.model]
            return funcs[0] if len(funcs) == 1 else funcs

        cfg.no_sync_func = per_chunk("no_sync")
        cfg.grad_sync_func = per_chunk("start_grad_sync") if self.cfg.optim.overlap_grad_reduce else None
        cfg.finalize_model_grads_func = finalize_model_grads
        if self.cfg.optim.overlap_param_gather and self.cfg.optim.use_distributed_optimizer:
            cfg.param_sync_func = per_chunk("start_param_sync")

    def data_iterator(self, batches: list):
        """The schedule's data iterator: with several model chunks (interleaving) one per
        chunk, each yielding the same micro-batches in order."""
        if len(self.model) == 1:
            return iter(batches)
        return [iter(batches) for _ in self.model]

    def log(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        """Global batch number `step` (0-based). Returns the step's metrics."""
        b = self.cfg.batch
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.data.micro_batches(step, self.dp_rank, self.dp_size, b.micro_batch_size)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        t0 = time.perf_counter()
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=self.data_iterator(batches),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=b.seq_length,
            micro_batch_size=b.micro_batch_size,
            forward_only=False,
        )
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        return self._step_metrics(step, losses, lr, grad_norm, elapsed)

    def _step_metrics(self, step: int, losses: list, lr: float, grad_norm, elapsed: float) -> dict:
        b = self.cfg.batch
        reported = self._reduce_reports(losses)
        tokens = b.tokens_per_step
        tokens_per_sec = tokens / elapsed
        tflops = self.flops_per_token * tokens_per_sec / dist.get_world_size() / 1e12
        scalars = {
            **reported,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops,
            "peak_memory_gib": peak_memory_gib(),
            "step_time_sec": elapsed,
            "consumed_samples": (step + 1) * b.global_batch_size,
            "consumed_tokens": (step + 1) * tokens,
            "eta_sec": self.clock.eta(step + 1, elapsed),
        }
        per_layer = {}
        if self.preset.is_moe:
            aux = self._moe_losses()
            for name in ("load_balancing_loss", "z_loss"):
                values = aux.get(name)
                scalars[name] = sum(values) / len(values) if values else None
                if values:
                    per_layer[f"moe/{name}"] = values
            imbalance = self.routing.imbalance("train")
            self.routing.reset("train")
            per_layer["moe/expert_load_imbalance"] = imbalance
            scalars["expert_load_imbalance"] = max(imbalance)
        stage = self.data.stage_at(step)
        if stage is not None:
            scalars["curriculum_stage"] = stage
            for source, count in self.data.consumed_tokens_by_source(step).items():
                scalars[f"data/consumed_tokens/{source}"] = count
        return {"scalars": scalars, "per_layer": per_layer}

    def _reduce_reports(self, losses: list) -> dict[str, float]:
        """The loss function's {name: [sum, count]} reports of every micro-batch -> global
        means: summed over data-parallel ranks, then broadcast from the last pipeline stage
        (the only one with reports) to every rank. Names follow the first report's order."""
        if self._report_names is None:
            # Every rank needs the same names: the last pipeline stage's, learned once.
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, list(losses[0]) if losses else None)
            self._report_names = next(n for n in gathered if n)
        names = self._report_names
        total = torch.zeros(len(names), 2, device=run_device())
        for report in losses:  # non-empty on the last pipeline stage only
            for i, name in enumerate(names):
                total[i] += report[name].to(total.device).float()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return {_metric_name(n): (total[i, 0] / total[i, 1].clamp(min=1)).item()
                for i, n in enumerate(names)}

    def _moe_losses(self) -> dict[str, list[float]]:
        """Per-layer aux losses from Megatron's tracker (reduced across ranks), then cleared."""
        tracker = get_moe_layer_wise_logging_tracker()
        names = [n for n in _AUX_LOSS_NAMES if n in tracker]
        reduce_aux_losses_tracker_across_ranks(names)
        if "z_loss" in tracker:
            # Megatron tracks z-loss without a reduce group: each rank holds the mean over its
            # own tokens (its DP shard, its sequence-parallel slice). Average over TP x DP so
            # the logged value is that of the whole batch at every layout.
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(tracker["z_loss"]["values"], group=group)
            tracker["z_loss"]["values"] /= group.size()
        # Whichever --moe-router-load-balancing-type ran, its loss is the run's load_balancing_loss.
        out = {_AUX_LOSS_NAMES[n]: (tracker[n]["values"].float() / self.num_microbatches).tolist()
               for n in names}
        clear_aux_losses_tracker()
        return out

    # ------------------------------------------------------------------ evaluation
    def _eval_micro_batches(self, name: str) -> int:
        """--eval-iters global batches, or (by default) the whole set when the data knows its
        size (SFT held-out conversations), else 2 global batches."""
        eval_iters = self.cfg.logging.eval_iters
        rows = self.data.validation_rows(name) if eval_iters is None else None
        if rows is not None:
            per = self.cfg.batch.micro_batch_size * self.dp_size
            return max(1, -(-rows // per))
        return (eval_iters or 2) * self.num_microbatches

    def evaluate(self, step: int) -> dict[str, float]:
        """The task's evaluation (by default `validation_losses`), on current parameters."""
        self.sync_params()
        return self.task.evaluate(self, step)

    def validation_losses(self, step: int) -> dict[str, float]:
        """Validation LM loss per validation set (per language when the data has languages;
        over assistant tokens for SFT), and the routing report of an MoE."""
        b = self.cfg.batch
        results = {}
        for chunk in self.model:
            chunk.eval()
        for name in self.data.validation_names():
            batches = self.data.validation_micro_batches(
                name, self._eval_micro_batches(name), self.dp_rank, self.dp_size,
                b.micro_batch_size,
            )
            lm = torch.zeros(2, device=run_device())
            recording = self.routing.recording(name) if self.routing else contextlib.nullcontext()
            with torch.no_grad(), recording:
                losses = get_forward_backward_func()(
                    forward_step_func=self.forward_step,
                    data_iterator=self.data_iterator(batches),
                    model=self.model,
                    num_microbatches=len(batches),
                    seq_length=b.seq_length,
                    micro_batch_size=b.micro_batch_size,
                    forward_only=True,
                )
            for report in losses:
                lm += report["lm loss"].to(lm.device)
            dist.all_reduce(lm, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            dist.all_reduce(lm, group=parallel_state.get_pipeline_model_parallel_group())
            results[f"validation/lm_loss/{name}"] = (lm[0] / lm[1].clamp(min=1)).item()
        for chunk in self.model:
            chunk.train()
        if self.preset.is_moe:
            clear_aux_losses_tracker()
            results.update(self._routing_report(step))
        return results

    def _routing_report(self, step: int) -> dict[str, float]:
        """Expert load per layer over the validation data, and the language correlation
        heatmap (TensorBoard image) when there are several languages."""
        from megatron_ext import routing_analysis  # SciPy + matplotlib: MoE evaluations only

        names = self.data.validation_names()
        totals = {name: self.routing.totals(name).numpy() for name in names}
        self.routing.reset()
        scalars = {}
        combined = sum(totals.values())
        for layer in range(self.preset.num_layers):
            mean = combined[layer].mean()
            if mean > 0:
                scalars[f"validation/expert_load_imbalance/layer_{layer:02d}"] = float(
                    combined[layer].max() / mean
                )
        routed = {n: c for n, c in totals.items() if (c.sum(axis=1) > 0).all()}
        if len(routed) >= 2 and self.is_logging_rank and self.metrics.tb is not None:
            k = self.preset.moe_router_topk
            tokens = {n: int(c[0].sum() // k) for n, c in routed.items()}
            result = routing_analysis.analyse(routed, tokens, list(range(self.preset.num_layers)))
            figure = routing_analysis.correlation_figure(result, title=f"step {step + 1}")
            self.metrics.add_image(
                "routing/language_correlation", routing_analysis.figure_to_rgb(figure), step + 1
            )
        return scalars

    # ------------------------------------------------------------------ checkpoints
    def sync_params(self) -> None:
        """Make every rank's parameters current before anything reads them (a save, an
        evaluation, a caller exporting the model). With --overlap-param-gather the distributed
        optimizer's all-gather of the updated parameters is deferred to the next forward's
        pre-hooks, so until then each rank holds only its own shard updated and the others one
        step stale. Megatron-LM's force_param_sync; a no-op otherwise."""
        o = self.cfg.optim
        if o.overlap_param_gather and o.use_distributed_optimizer:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)

    def _params_finite(self) -> bool:
        """True on every rank iff every parameter of every rank is finite (collective)."""
        bad = torch.zeros(1, device=run_device())
        for chunk in self.model:
            for p in chunk.parameters():
                if not torch.isfinite(p).all():
                    bad.fill_(1.0)
                    break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        self.sync_params()
        if not self._params_finite():
            raise TrainingError(
                f"iteration {self.state.iteration}: the model weights are not finite (NaN/inf); "
                f"not saving to --save {ck.save} (its last checkpoint is kept)")
        path = checkpointing.save_checkpoint(
            ck.save,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            model_info=checkpointing.model_info(
                self.preset,
                tokenizer=data.tokenizer_info(self.cfg.data.tokenizer_type,
                                              self.cfg.data.tokenizer_model),
                run={"kind": self.task.kind,
                     # Routing that Hugging Face's qwen3_moe cannot express (exporters check).
                     "moe_router": {"score_function": self.cfg.model_options.moe.router_score_function,
                                    "expert_bias": self.cfg.model_options.moe.enable_expert_bias}},
            ),
            optimizer_fully_reshardable=ck.optim_fully_reshardable,
            directory=self.save_dir,
            run_config=self.cfg.to_json(),
            retention=(ck.keep_last, ck.keep_every),
            async_saves=self.async_saves,
        )
        self.log(f"{'writing (async)' if self.async_saves else 'saved'} checkpoint {path}")

    def _check_finite(self, step: int, scalars: dict) -> None:
        """Megatron-LM's --check-for-nan-in-loss-and-grad: stop before anything is saved."""
        for name in (_metric_name(self._report_names[0]), "grad_norm"):
            value = scalars.get(name)
            if value is not None and not math.isfinite(value):
                raise TrainingError(
                    f"step {step + 1}: {name.replace('_', ' ')} is {value}; stopping without "
                    "saving (lower --lr, check the data, or resume from the last checkpoint)")

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[float]:
        """Steps from the loaded iteration to --train-iters (or a stop); the loss per step."""
        try:
            losses = self._train()
            if self.async_saves is not None:
                self.async_saves.wait()  # the last checkpoint committed before returning
            return losses
        finally:
            self.stop_signal.restore()

    def _train(self) -> list[float]:
        cfg, b, ck = self.cfg, self.cfg.batch, self.cfg.checkpoint
        losses = []
        start = self.state.iteration
        layout = cfg.layout
        self.log(
            f"training {self.preset.name}: {self.size.total_params / 1e6:,.1f}M params "
            f"({self.size.active_params / 1e6:,.1f}M active), world {dist.get_world_size()} "
            f"(TP {layout.tensor} PP {layout.pipeline} EP {layout.expert} DP {self.dp_size}), "
            f"global batch {b.global_batch_size} x {b.seq_length} tokens, "
            f"steps {start} -> {b.train_iters}"
        )
        self.log("run configuration (saved with every checkpoint as "
                 f"{checkpointing.RUN_CONFIG_FILE}):\n{format_run_config(cfg.to_json())}")
        if cfg.skip_train:
            self.metrics.log_scalars(start, self.evaluate(max(start - 1, 0)))
            self.metrics.close()
            return losses
        if start == b.train_iters:
            log.warning(f"nothing to train: the checkpoint is at iteration {start} = "
                        f"--train-iters {b.train_iters}")
        profiler = start_profiler(cfg.logging, self.rank, start)
        for step in range(start, b.train_iters):
            try:
                self.task.on_step_start(self, step)
            except StepInterrupted as e:  # nothing of the step done: save the state before it
                just_saved = step > start and ck.save_interval and step % ck.save_interval == 0
                if ck.save and not just_saved:
                    self.save()
                self.log(f"{e}; " + (f"saved at iteration {step}, exiting" if ck.save else
                                     "exiting (no --save)"))
                break
            result = self.train_step(step)
            if profiler is not None:
                profiler.step()
            if self.async_saves is not None:
                self.async_saves.poll()  # commits a finished background save
            result["scalars"].update(self.task.step_metrics(step))
            self._check_finite(step, result["scalars"])
            self.state.iteration = step + 1
            self.state.consumed_samples = (step + 1) * b.global_batch_size
            losses.append(result["scalars"][_metric_name(self._report_names[0])])
            self.metrics.log_step(step + 1, result["scalars"], result["per_layer"])
            it = self.state.iteration
            if cfg.logging.eval_interval and it % cfg.logging.eval_interval == 0:
                self.metrics.log_scalars(it, self.evaluate(step))
            stop = self.stop_signal.agreed()
            exit_now = bool(ck.exit_interval and it % ck.exit_interval == 0)
            if stop or exit_now or (ck.save_interval and it % ck.save_interval == 0):
                self.save()
            if stop:
                self.log(f"signal {self.stop_signal.received or 'on another rank'}: saved at "
                         f"iteration {it}, exiting")
                break
            if exit_now:
                break
        else:
            if ck.save and start < b.train_iters and not (
                    ck.save_interval and self.state.iteration % ck.save_interval == 0):
                self.save()
        if profiler is not None:
            profiler.stop()
        self.metrics.close()
        return losses
