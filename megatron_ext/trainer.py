"""The trainer: one loop over Megatron-Core's engine.

setup:  validate layout -> process groups -> model stage -> DDP -> optimizer + scheduler
        -> (resume) -> data
step:   get_forward_backward_func (pipeline schedule) -> finalize grads -> optimizer step
        -> scheduler step -> metrics
exit:   at --train-iters, --exit-interval, or SIGTERM/SIGUSR1 (finish the step, save, exit 0)
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from functools import partial
from typing import Optional

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
from megatron_ext.flops import H100_BF16_PEAK_TFLOPS, analytic_model_size, training_flops_per_token
from megatron_ext.metrics import MetricsWriter, peak_memory_gib
from megatron_ext.model import MoEOptions, build_model, marco_config
from megatron_ext.optim import build_optimizer, build_scheduler, wrap_ddp
from megatron_ext.parallel import ParallelLayout
from megatron_ext.routing import RoutingRecorder


def layout_from_args(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(
        tensor=args.tensor_model_parallel_size,
        pipeline=args.pipeline_model_parallel_size,
        expert=args.expert_model_parallel_size,
        expert_tensor=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )


def config_from_args(args: argparse.Namespace):
    return marco_config(
        args.model,
        layout_from_args(args),
        params_dtype=args.params_dtype,
        moe=MoEOptions(
            aux_loss_coeff=args.moe_aux_loss_coeff,
            z_loss_coeff=args.moe_z_loss_coeff,
            token_dispatcher=args.moe_token_dispatcher_type,
        ),
        expert_backend=args.expert_backend,
        fp8_format=args.fp8_format,
        fp8_recipe=args.fp8_recipe,
        init_method_std=args.init_method_std,
        recompute_granularity=args.recompute_granularity,
    )


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) request a save-and-exit."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (collective)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to_device(batch: dict) -> dict:
    device = _device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean cross-entropy; reports (loss sum, token count) for exact global averaging."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = _to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


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
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.preset = args.model
        self.stop_signal = StopSignal()  # first: a signal during setup still means "save and stop"
        world = parallel.world_size_from_env()
        self.dp_size = parallel.validate_layout(layout_from_args(args), self.preset, world)
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * self.dp_size
        per_step = args.micro_batch_size * self.dp_size
        if args.global_batch_size % per_step:
            raise parallel.LayoutError(
                f"--global-batch-size {args.global_batch_size} is not divisible by "
                f"--micro-batch-size {args.micro_batch_size} x data-parallel size {self.dp_size}"
            )
        self.num_microbatches = args.global_batch_size // per_step
        # Everything above is checked before any process group or model exists.
        self.tokenizer = data.build_tokenizer_from_args(args)
        data.check_vocab(self.tokenizer, self.preset.vocab_size)

        parallel.init_distributed(layout_from_args(args), args.seed, args.distributed_timeout_minutes)
        self.rank = dist.get_rank()
        self.is_logging_rank = self.rank == dist.get_world_size() - 1
        self.dp_rank = parallel_state.get_data_parallel_rank()

        self.config = config_from_args(args)
        model = build_model(
            self.preset,
            self.config,
            args.expert_backend,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            seq_length=args.seq_length,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        self.model = [wrap_ddp(model, self.config, args)]
        self.optimizer = build_optimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        self._wire_grad_sync()

        self.state = checkpointing.TrainState()
        if args.load:
            self.state = checkpointing.load_checkpoint(
                args.load,
                self.model,
                None if args.no_load_optim else self.optimizer,
                None if args.no_load_optim else self.scheduler,
                load_rng=not args.no_load_rng,
            )
            if self.state.extra.get("model_only"):
                # Weights only (an upcycled or converted checkpoint, or --no-load-optim):
                # a fresh optimizer and schedule start from this checkpoint's iteration. The
                # optimizer was built before the load: in bf16 its fp32 main params are copies
                # of the random init, and its first step would copy them back over the loaded
                # weights. Refresh them from the model (Megatron-LM does the same).
                self.optimizer.reload_model_params()
                self.log(f"loaded model weights from {args.load} (iteration {self.state.iteration})")
            else:
                self.log(f"resumed from {args.load} at iteration {self.state.iteration}")

        self.data = data.build_pretraining_data(
            args,
            self.tokenizer,
            global_batch_size=args.global_batch_size,
            seq_length=args.seq_length,
            train_iters=args.train_iters,
            seed=args.seed,
        )

        # The local model is a shard under TP/PP/EP: count the full model by formula.
        self.size = analytic_model_size(self.preset)
        self.flops_per_token = training_flops_per_token(self.size, self.preset, args.seq_length)
        self.peak_tflops = args.peak_tflops or (
            H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else measure_cpu_peak_tflops()
        )
        self.metrics = MetricsWriter(
            self.is_logging_rank, args.tensorboard_dir, args.log_json, args.log_interval
        )
        self.routing = (
            RoutingRecorder(self.model, self.preset.num_layers, self.preset.num_experts)
            if self.preset.is_moe
            else None
        )

    # ------------------------------------------------------------------ setup helpers
    def _wire_grad_sync(self) -> None:
        cfg = self.config
        ddp = self.model[0]
        cfg.no_sync_func = ddp.no_sync
        cfg.grad_sync_func = ddp.start_grad_sync if self.args.overlap_grad_reduce else None
        cfg.finalize_model_grads_func = finalize_model_grads
        if self.args.overlap_param_gather and self.args.use_distributed_optimizer:
            cfg.param_sync_func = ddp.start_param_sync

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        """Global batch number `step` (0-based). Returns the step's metrics."""
        args = self.args
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.data.micro_batches(step, self.dp_rank, self.dp_size, args.micro_batch_size)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        t0 = time.perf_counter()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
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
        args = self.args
        lm = torch.zeros(2, device=_device())
        for report in losses:  # non-empty on the last pipeline stage only
            lm += report["lm loss"].to(lm.device)
        # Sum over data-parallel ranks, then broadcast from the last stage to everyone.
        dist.all_reduce(lm, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(lm, group=parallel_state.get_pipeline_model_parallel_group())
        lm_loss = (lm[0] / lm[1].clamp(min=1)).item()

        tokens = args.global_batch_size * args.seq_length
        tokens_per_sec = tokens / elapsed
        tflops = self.flops_per_token * tokens_per_sec / dist.get_world_size() / 1e12
        scalars = {
            "lm_loss": lm_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops,
            "peak_memory_gib": peak_memory_gib(),
            "step_time_sec": elapsed,
            "consumed_samples": (step + 1) * args.global_batch_size,
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

    def _moe_losses(self) -> dict[str, list[float]]:
        """Per-layer aux losses from Megatron's tracker (reduced across ranks), then cleared."""
        tracker = get_moe_layer_wise_logging_tracker()
        names = [n for n in ("load_balancing_loss", "z_loss") if n in tracker]
        reduce_aux_losses_tracker_across_ranks(names)
        if "z_loss" in tracker:
            # Megatron tracks z-loss without a reduce group: each rank holds the mean over its
            # own tokens (its DP shard, its sequence-parallel slice). Average over TP x DP so
            # the logged value is that of the whole batch at every layout.
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(tracker["z_loss"]["values"], group=group)
            tracker["z_loss"]["values"] /= group.size()
        out = {n: (tracker[n]["values"].float() / self.num_microbatches).tolist() for n in names}
        clear_aux_losses_tracker()
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation loss per validation set (per language when the data has languages)."""
        args = self.args
        results = {}
        for chunk in self.model:
            chunk.eval()
        for name in self.data.validation_names():
            batches = self.data.validation_micro_batches(
                name, args.eval_iters * self.num_microbatches, self.dp_rank, self.dp_size,
                args.micro_batch_size,
            )
            lm = torch.zeros(2, device=_device())
            recording = self.routing.recording(name) if self.routing else contextlib.nullcontext()
            with torch.no_grad(), recording:
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter(batches),
                    model=self.model,
                    num_microbatches=len(batches),
                    seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size,
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
        from megatron_ext import routing_analysis

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
    def save(self) -> None:
        if not self.args.save:
            return
        path = checkpointing.save_checkpoint(
            self.args.save,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            model_info=checkpointing.model_info(
                self.preset, tokenizer=data.tokenizer_info(self.args)
            ),
            optimizer_fully_reshardable=self.args.dist_ckpt_optim_fully_reshardable,
        )
        self.log(f"saved checkpoint {path}")

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[float]:
        args = self.args
        losses = []
        start = self.state.iteration
        self.log(
            f"training {self.preset.name}: {self.size.total_params / 1e6:,.1f}M params "
            f"({self.size.active_params / 1e6:,.1f}M active), world {dist.get_world_size()} "
            f"(TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
            f"EP {args.expert_model_parallel_size} DP {self.dp_size}), global batch "
            f"{args.global_batch_size} x {args.seq_length} tokens, steps {start} -> {args.train_iters}"
        )
        for step in range(start, args.train_iters):
            result = self.train_step(step)
            self.state.iteration = step + 1
            self.state.consumed_samples = (step + 1) * args.global_batch_size
            losses.append(result["scalars"]["lm_loss"])
            self.metrics.log_step(step + 1, result["scalars"], result["per_layer"])
            it = self.state.iteration
            if args.eval_interval and it % args.eval_interval == 0:
                self.metrics.log_scalars(it, self.evaluate(step))
            stop = self.stop_signal.agreed()
            exit_now = bool(args.exit_interval and it % args.exit_interval == 0)
            if stop or exit_now or (args.save_interval and it % args.save_interval == 0):
                self.save()
            if stop:
                self.log(f"signal {self.stop_signal.received or 'on another rank'}: saved at iteration {it}, exiting")
                break
            if exit_now:
                break
        else:
            if args.save and not (args.save_interval and self.state.iteration % args.save_interval == 0):
                self.save()
        self.metrics.close()
        return losses

