"""Training metrics: the log line, TensorBoard scalars and the per-step JSON log.

Only the last rank writes (it holds the loss under pipeline parallelism); values that live on
other ranks are reduced to it by the trainer before `log_step` is called.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Optional

import torch


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
    ):
        self.enabled = enabled
        self.log_interval = log_interval
        self.tb = None
        self.json_file = None
        if not enabled:
            return
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
        if step % self.log_interval == 0 or step == 1:
            print(format_log_line(step, scalars), flush=True)

    def log_scalars(self, step: int, scalars: dict[str, float], echo: bool = True) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.json_file is not None:
            self.json_file.write(json.dumps({"step": step, **scalars}) + "\n")
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


def format_log_line(step: int, s: dict[str, float]) -> str:
    parts = [
        f"[{time.strftime('%H:%M:%S')}] step {step:6d}",
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
