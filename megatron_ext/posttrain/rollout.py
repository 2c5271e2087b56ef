"""Rollouts for on-policy distillation: prompts by step, student samples, training rows.

Prompts come from chat jsonl files (the SFT data format): each conversation up to and including
its last user turn, then the generation prompt (`chat.render_prompt`); prompts longer than
--rollout-max-prompt-len tokens are left out and counted. Step k reads prompts k*P .. k*P+P-1
of an endless stream (P = --rollout-batch-size), each epoch a fresh permutation seeded by
(--seed, epoch), and row g of the step's global batch is sample g % n of prompt g // n
(n = --n-samples-per-prompt). Row g is sampled with the generator's stream (seed(step), g):
the prompts, the samples and so the whole step are a pure function of (--seed, step), whatever
the parallel layout, and a resumed run rolls out exactly what an uninterrupted one would.

A sample ends at its first stop token (<|im_end|> or EOS), which is kept (the student must
learn to stop) and nothing after it counts; a sample that reaches --rollout-max-response-len
without one is truncated ("length") and counted. A training row is prompt + response:
`tokens`, `labels` (tokens shifted left), `loss_mask` (1 exactly where the label is a response
token), `loss_weights` (the reduction's per-token weights, losses.response_weights; 1 on the
response tokens until the step sets them), `position_ids`, and per response token the
student's sampling log-prob (`rollout_logprobs`) and, once scored, the teacher's
(`teacher_logprobs`) and, with several optimizer steps per rollout, the student's at the start
of the rollout (`old_logprobs`, the clipped surrogate's); with --routing-replay, `routing`
[b, s, MoE layers, k], the experts the generator chose (-1 where none). Rows are right-padded
to the longest row of their micro-batch (rounded up to a multiple of `multiple`, e.g. the
tensor-parallel size for sequence parallelism); padding carries no loss whatever its id.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ext.errors import ConfigError, DataConfigError
from megatron_ext.inference.chat import ChatTokenizer, read_chat_jsonl, render_prompt
from megatron_ext.inference.generation import SamplingParams, generate

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sft"
DEFAULT_PROMPTS = (str(SAMPLE_DIR / "train.jsonl.gz"),)
DEFAULT_EVAL_PROMPTS = (str(SAMPLE_DIR / "valid.jsonl.gz"),)


@dataclass(frozen=True)
class RolloutSettings:
    """How a step's samples are drawn (slime's flag names)."""

    rollout_batch_size: int = 8  # prompts per step
    n_samples_per_prompt: int = 2
    max_prompt_len: int = 2048
    max_response_len: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    decode_batch_size: Optional[int] = None  # rows decoded together per rank (None: all)

    @property
    def global_batch_size(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    def check(self, where: str) -> None:
        for name in ("rollout_batch_size", "n_samples_per_prompt", "max_prompt_len",
                     "max_response_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}--{_dash(name)} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"{where}--rollout-temperature must be > 0 (on-policy sampling and "
                              f"scoring use it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}--rollout-top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"{where}--rollout-top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.decode_batch_size is not None and self.decode_batch_size < 1:
            raise ConfigError(f"{where}--rollout-decode-batch-size must be >= 1, got "
                              f"{self.decode_batch_size}")

    def sampling(self, stop_ids: Sequence[int]):
        return SamplingParams(max_new_tokens=self.max_response_len, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, stop_ids=tuple(stop_ids))


def _dash(name: str) -> str:
    return {"max_prompt_len": "rollout-max-prompt-len",
            "max_response_len": "rollout-max-response-len"}.get(name, name.replace("_", "-"))


# ------------------------------------------------------------------------------ prompts
class PromptSet:
    """Rendered prompts of chat jsonl files, in file order; over-long ones counted, left out."""

    def __init__(self, files: Sequence[str], tok: ChatTokenizer, max_prompt_len: int, flag: str):
        self.files = [str(f) for f in files]
        self.prompts: list[list[int]] = []
        self.where: list[str] = []
        self.too_long = 0
        for f in self.files:
            for line, messages in read_chat_jsonl(f, require_assistant=False):
                if not any(m["role"] == "user" for m in messages):
                    raise DataConfigError(f"{f}:{line}: no user turn to answer ({flag})")
                ids = render_prompt(messages, tok)
                if len(ids) > max_prompt_len:
                    self.too_long += 1
                    continue
                self.prompts.append(ids)
                self.where.append(f"{f}:{line}")
        if not self.prompts:
            raise DataConfigError(f"{flag} {' '.join(self.files)}: no prompt of at most "
                                  f"--rollout-max-prompt-len {max_prompt_len} tokens")

    def __len__(self) -> int:
        return len(self.prompts)

    def stream(self, start: int, count: int, seed: int) -> list[int]:
        """Prompt indices at positions start .. start+count-1 of the endless stream: epoch e is
        a permutation seeded by (seed, e)."""
        n, out, perms = len(self.prompts), [], {}
        for k in range(start, start + count):
            epoch = k // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([seed & (2**63 - 1), epoch]).permutation(n)
            out.append(int(perms[epoch][k % n]))
        return out

    def fixed_subset(self, count: int) -> list[int]:
        """`count` prompts in a fixed pseudo-random order (independent of --seed): the held-out
        set evaluated every --eval-interval."""
        perm = np.random.default_rng(20240607).permutation(len(self.prompts))
        return [int(i) for i in perm[:count]]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step (the generator then seeds each row with (this, row))."""
    state = np.random.SeedSequence([seed & (2**63 - 1), step]).generate_state(1, np.uint64)
    return int(state[0] & (2**63 - 1))


# ------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    row: int  # global row of the step's batch
    prompt_ids: list[int]
    output_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    # Scored after sampling, per response token (collate's keys of the same names).
    teacher_logprobs: Optional[list[float]] = None
    old_logprobs: Optional[list[float]] = None
    # --routing-replay: [length, MoE layers, top-k] experts the generator chose (-1: none).
    routing: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def sample(model, prompts: list[list[int]], rows: list[int], settings: RolloutSettings,
           tok: ChatTokenizer, seed: int, *, per_rank: bool, routing=None) -> list[Sample]:
    """Sample `rows` (global row ids; row g answers prompts[i] for rows[i]) with the student.
    `per_rank`: each data-parallel rank passes only its own rows (see generation.generate).
    `routing`: a routing_replay.Recording; each sample then carries its experts."""

    out = generate(model, prompts, settings.sampling(tok.stop_ids), seed=seed,
                   batch_size=settings.decode_batch_size, vocab_size=tok.vocab_size,
                   indices=list(rows), per_rank=per_rank, routing=routing)
    return [Sample(r, g.prompt_ids, g.output_ids, g.logprobs, g.finish_reason,
                   routing=None if routing is None else
                   routing.routing(r, len(g.prompt_ids) + len(g.output_ids)))
            for r, g in zip(rows, out)]


def sample_served(client, prompts: list[list[int]], rows: list[int], settings: RolloutSettings,
                  tok: ChatTokenizer, *, weight_version: Optional[int] = None) -> list[Sample]:
    """Sample `rows` on a served engine (megatron_ext/inference/sglang_client.py: SGLang's
    /generate with token ids in and out; every reply checked, the weight version included).
    One request per --rollout-batch-size rows' worth of prompts, spread over the engines."""
    out = client.generate(prompts, temperature=settings.temperature, top_p=settings.top_p,
                          top_k=settings.top_k, max_new_tokens=settings.max_response_len,
                          stop_token_ids=tok.stop_ids, vocab_size=tok.vocab_size,
                          weight_version=weight_version)
    return [Sample(r, list(p), g.output_ids, g.logprobs, g.finish_reason)
            for r, p, g in zip(rows, prompts, out)]


def collate(samples: list[Sample], pad_id: int, multiple: int = 1) -> dict:
    """Training rows of `samples`, right-padded to the longest (a multiple of `multiple`)."""
    longest = max(s.length for s in samples)
    width = -(-longest // multiple) * multiple
    b = len(samples)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, width, dtype=torch.float32)
    per_token = {key: torch.zeros(b, width, dtype=torch.float32) for key in RESPONSE_VALUES
                 if all(getattr(s, key) is not None for s in samples)}
    for i, s in enumerate(samples):
        ids = s.prompt_ids + s.output_ids
        n, p = len(ids), len(s.prompt_ids)
        tokens[i, :n] = torch.tensor(ids)
        labels[i, :n - 1] = tokens[i, 1:n]
        # labels[t] = ids[t + 1] is a response token for t in [p - 1, n - 2].
        loss_mask[i, p - 1:n - 1] = 1.0
        for key, values in per_token.items():
            values[i, p - 1:n - 1] = torch.tensor(getattr(s, key), dtype=torch.float32)
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
           "loss_weights": loss_mask.clone(),
           "position_ids": torch.arange(width).expand(b, width).contiguous(),
           "lengths": torch.tensor([s.length for s in samples], dtype=torch.long),
           **per_token}
    if all(s.routing is not None for s in samples):  # [b, s, MoE layers, k], -1 on padding
        routing = torch.full((b, width, *samples[0].routing.shape[1:]), -1, dtype=torch.int16)
        for i, s in enumerate(samples):
            routing[i, :s.length] = s.routing
        out["routing"] = routing
    return out


RESPONSE_VALUES = ("rollout_logprobs", "teacher_logprobs", "old_logprobs")


def set_response_values(samples: dict, rows: list[int], key: str, batch: dict,
                        values: torch.Tensor) -> None:
    """Store `values` ([b, s] over collate's rows of samples[rows]) of each response token in
    that sample's field `key`."""
    for i, g in enumerate(rows):
        picked = values[i][batch["loss_mask"][i] > 0]
        setattr(samples[g], key, picked.float().tolist())


def sample_state(sample: Sample) -> dict:
    """A sample as plain data (a checkpoint's trainer state)."""
    return dataclasses.asdict(sample)


def sample_from_state(state: dict) -> Sample:
    return Sample(**state)


def statistics(samples: list[Sample]) -> torch.Tensor:
    """Sums to reduce over ranks: [samples, response tokens, stopped, truncated, prompt tokens]."""
    return torch.tensor([len(samples), sum(len(s.output_ids) for s in samples),
                         sum(s.finish_reason == "stop" for s in samples),
                         sum(s.finish_reason == "length" for s in samples),
                         sum(len(s.prompt_ids) for s in samples)], dtype=torch.float64)


def statistics_dict(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    n = max(float(sums[0]), 1.0)
    return {f"{prefix}/response_length": float(sums[1]) / n,
            f"{prefix}/stop_rate": float(sums[2]) / n,
            f"{prefix}/truncation_rate": float(sums[3]) / n,
            f"{prefix}/truncated": float(sums[3]),
            f"{prefix}/prompt_length": float(sums[4]) / n}
