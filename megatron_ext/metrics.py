"""Training metrics: the log line, TensorBoard scalars, the per-step JSON log, Weights & Biases,
and the torch profiler.

Only the last rank writes (it holds the loss under pipeline parallelism); values that live on
other ranks are reduced to it by the trainer before `log_step` is called.

The log line shows step/total, the tokens consumed and an ETA (the mean time of this run's
steps so far, its first step left out as warm-up, times the steps left). W&B
(`--wandb-project`, Megatron-LM's flags) is optional: `wandb` is imported only when asked
for, gets the same scalars as TensorBoard and the run configuration as its config;
WANDB_MODE=offline writes the run under --wandb-save-dir for a later `wandb sync`.
`--profile` records steps [--profile-step-start, --profile-step-end) with torch.profiler on
the --profile-ranks, as a TensorBoard trace in --tensorboard-dir (Megatron-LM's
--use-pytorch-profiler path; `tensorboard --logdir DIR` with the torch-tb-profiler plugin, or
chrome://tracing / Perfetto on the .pt.trace.json file).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Optional

import torch

from megatron_ext.errors import ConfigError


def peak_memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB


class MetricsWriter:
    def __init__(
        self,
        enabled: bool,
        tensorboard_dir: Optional[str] = None,
        json_path: Optional[str] = None,
        log_interval: int = 10,
        total_iters: Optional[int] = None,
        wandb: Optional[dict] = None,
    ):
        """`wandb`: {project, name, dir, config} to log to Weights & Biases too."""
        self.enabled = enabled
        self.log_interval = log_interval
        self.total_iters = total_iters
        self.tb = None
        self.json_file = None
        self.wandb = None
        if not enabled:
            return
        if wandb:
            self.wandb = start_wandb(**wandb)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            self.json_file = open(json_path, "a", buffering=1)

    def log_step(self, step: int, scalars: dict[str, float], per_layer: dict[str, list[float]]) -> None:
        """`step` is 1-based (iterations completed). Scalars go to TB and JSON every step."""
        if not self.enabled:
            return
        if self.tb is not None:
            for name, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(name, value, step)
            for name, values in per_layer.items():
                for layer, value in enumerate(values):
                    self.tb.add_scalar(f"{name}/layer_{layer:02d}", value, step)
        if self.json_file is not None:
            record = {"step": step, **{k: v for k, v in scalars.items()}}
            for name, values in per_layer.items():
                record[name] = values
            self.json_file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in scalars.items() if v is not None}, step=step)
        if step % self.log_interval == 0 or step == 1:
            print(format_log_line(step, scalars, self.total_iters), flush=True)

    def log_scalars(self, step: int, scalars: dict[str, float], echo: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.json_file is not None:
            self.json_file.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)
        if echo:
            print(format_validation_line(step, scalars), flush=True)

    def add_image(self, tag: str, image, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.json_file is not None:
            self.json_file.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # waits for W&B's writer process to flush the run's file
            self.wandb = None


def start_wandb(project: str, name: Optional[str], dir: Optional[str], config: dict):
    """A W&B run (optional dependency: a clear error when `wandb` is not installed)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb-project needs the wandb package (pip install wandb)") from None
    if dir:
        os.makedirs(dir, exist_ok=True)
    return wandb.init(project=project, name=name or None, dir=dir or None, config=config)


def format_duration(seconds: float) -> str:
    """ETA as '3d 04:05:06' / '04:05:06'."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h:02d}:{m:02d}:{s:02d}"


def format_log_line(step: int, s: dict[str, float], total_iters: Optional[int] = None) -> str:
    progress = f"step {step:6d}" + (f"/{total_iters}" if total_iters else "")
    parts = [f"[{time.strftime('%H:%M:%S')}] {progress}"]
    if s.get("consumed_tokens") is not None:
        parts.append(f"{_tokens(s['consumed_tokens'])} tokens")
    if s.get("eta_sec") is not None and math.isfinite(s["eta_sec"]):
        parts.append(f"ETA {format_duration(s['eta_sec'])}")
    parts += [
        # The run's loss: lm loss, or the first loss a post-training task reports.
        f"{_loss_name(s).replace('_', ' ')} {s[_loss_name(s)]:.4f}",
    ]
    if s.get("load_balancing_loss") is not None:
        parts.append(f"lb loss {s['load_balancing_loss']:.4f}")
    if s.get("z_loss") is not None:
        parts.append(f"z loss {s['z_loss']:.4f}")
    if s.get("expert_load_imbalance") is not None:
        parts.append(f"imbalance {s['expert_load_imbalance']:.2f}")
    parts += [
        f"lr {s['lr']:.3e}",
        f"grad norm {s['grad_norm']:.3f}",
        f"{s['tokens_per_sec']:,.0f} tok/s",
        f"{s['tflops_per_device']:.2f} TFLOP/s/dev",
        f"MFU {100 * s['mfu']:.1f}%",
        f"mem {s['peak_memory_gib']:.2f} GiB",
    ]
    if s.get("curriculum_stage") is not None:
        parts.append(f"stage {int(s['curriculum_stage']) + 1}")  # 1-based, as slurm/ and the docs count
    return " | ".join(parts)


def _tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


class StepClock:
    """The ETA: the mean wall time between this run's steps (saves and evaluations included;
    the first step, warm-up, left out once there are others) times the steps left to
    --train-iters."""

    def __init__(self, total_iters: int):
        self.total_iters = total_iters
        self.times: list[float] = []
        self.last: Optional[float] = None

    def eta(self, step: int, elapsed: float) -> float:
        """`step`: iterations completed; `elapsed`: seconds the step's compute took (the
        first interval, before there is a previous step to measure from)."""
        now = time.perf_counter()
        self.times.append(elapsed if self.last is None else now - self.last)
        self.last = now
        timed = self.times[1:] or self.times
        return sum(timed) / len(timed) * max(self.total_iters - step, 0)


def start_profiler(logging_options, rank: int, start_iteration: int):
    """--profile: a started torch.profiler covering iterations [--profile-step-start,
    --profile-step-end) (0-based, as Megatron-LM; the trainer calls `.step()` after each
    iteration and `.stop()` at the end), or None on ranks not in --profile-ranks or when the
    window is already past."""
    lg = logging_options
    if not lg.profile or rank not in lg.profile_ranks:
        return None
    first = max(lg.profile_step_start - start_iteration, 0)
    last = lg.profile_step_end - start_iteration
    if last <= first:
        return None
    warmup = 1 if first > 0 else 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=first - warmup, warmup=warmup,
                                         active=last - first, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(lg.tensorboard_dir,
                                                                worker_name=f"rank{rank}"),
        record_shapes=True)
    profiler.start()
    return profiler


def _loss_name(s: dict) -> str:
    return "lm_loss" if "lm_loss" in s else next(iter(s))


def format_validation_line(step: int, scalars: dict[str, float]) -> str:
    """Mean validation loss over the sets, plus the best and worst set by name."""
    losses = {k.rsplit("/", 1)[-1]: v for k, v in scalars.items() if k.startswith("validation/lm_loss/")}
    line = f"[{time.strftime('%H:%M:%S')}] step {step:6d} | validation"
    if not losses:  # a task's own evaluation (e.g. on-policy distillation's held-out KL)
        shown = [f"{k} {v:.4f}" for k, v in scalars.items() if isinstance(v, (int, float))][:4]
        return line + (" | " + " | ".join(shown) if shown else " | no validation data")
    best, worst = min(losses, key=losses.get), max(losses, key=losses.get)
    return (
        f"{line} lm loss {sum(losses.values()) / len(losses):.4f} over {len(losses)} sets"
        f" | best {best} {losses[best]:.4f} | worst {worst} {losses[worst]:.4f}"
    )
