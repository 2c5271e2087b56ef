"""The trainer's contract: what a task and its data give the one training loop (trainer.py).

A *task* says what a run trains on and how a micro-batch becomes a loss; pre-training
(trainer.PretrainTask), SFT (posttrain/sft.py) and on-policy distillation (posttrain/opd.py)
are the three. Its *data* hands out each step's micro-batches and the validation sets.

    Task                                  required / hook (no-op here)
      kind                                required: recorded in marco_model.json ("pretrain", ...)
      build_data(trainer) -> TrainData    required: called once, after the model and any load
      forward_step(data_iterator, model)  required: Megatron's forward-step function; its loss
                                          function reports {name: [sum, count]} (every name
                                          becomes a metric, the first is the run's loss)
      on_step_start(trainer, step)        hook: before a step's batches are drawn (OPD rolls
                                          out and switches cascade phases here); raising
                                          StepInterrupted (on every rank alike) stops the run
                                          as a signal does: saved before the step, exit 0
      step_metrics(step) -> dict          hook: extra scalars of the step (rollout statistics)
      evaluate(trainer, step) -> dict     hook: the evaluation; by default the trainer's
                                          validation LM loss per validation set

    TrainData
      micro_batches(step, dp_rank, dp_size, micro_batch_size) -> list[dict]   required
      summary() -> list[str]                                                   required
      validation_names() -> list[str]                  default: none
      validation_micro_batches(name, n, dp_rank, dp_size, micro_batch_size)
      validation_rows(name) -> int | None              default None: size unknown (the trainer
                                                       then evaluates --eval-iters batches)
      stage_at(step) -> int | None                     default None: no curriculum
      consumed_tokens_by_source(step) -> dict          default {}: no per-source accounting

Both are base classes rather than typing.Protocols so the optional parts have one default,
here, and the trainer calls them without asking what a task or its data can do.
"""

from __future__ import annotations

from typing import Optional


class StepInterrupted(Exception):
    """A stop signal arrived while a task prepared a step (e.g. waiting on a rollout engine):
    the step has not started, so the trainer saves the state before it (with --save) and
    exits as on a signal. Raised on every rank alike (the task agrees first)."""


class TrainData:
    """Micro-batches and validation sets of a run (see the module docstring)."""

    def micro_batches(self, step: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[dict]:
        raise NotImplementedError

    def summary(self) -> list[str]:
        raise NotImplementedError

    def validation_names(self) -> list[str]:
        return []

    def validation_micro_batches(self, name: str, num_micro_batches: int, dp_rank: int,
                                 dp_size: int, micro_batch_size: int) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} has no validation set {name!r}")

    def validation_rows(self, name: str) -> Optional[int]:
        return None

    def stage_at(self, step: int) -> Optional[int]:
        return None

    def consumed_tokens_by_source(self, step: int) -> dict[str, int]:
        return {}


class Task:
    """A run's task (see the module docstring); subclasses set `kind`, `build_data` and
    `forward_step`, and override the hooks they need."""

    kind: str = ""

    def build_data(self, trainer) -> TrainData:
        raise NotImplementedError

    def forward_step(self, data_iterator, model):
        raise NotImplementedError

    def on_step_start(self, trainer, step: int) -> None:
        return None

    def step_metrics(self, step: int) -> dict:
        return {}

    def evaluate(self, trainer, step: int) -> dict[str, float]:
        return trainer.validation_losses(step)
