"""Cascaded on-policy distillation (OPD) as a trainer task: Marco's Instruct recipe after SFT.

    python posttrain_marco.py opd --cascade configs/posttrain/marco_mini_cascade.yaml \\
        --load /ckpt/mini-sft --save /ckpt/mini-opd ...

The student samples its own responses, the teacher scores exactly those token ids, and the
student learns from the per-token gap (losses.py). Everything else is the pre-training
trainer's: model, parallel layouts, optimizer, checkpoints, signals, TensorBoard/--log-json.

A step (the trainer's `on_step_start`, then its usual forward/backward/optimizer step):
  1. phase: the cascade's phase is a pure function of the step (phase i covers its `steps`
     after the previous phases'); entering one (or resuming into one) builds its teacher in
     place of the last and sets its learning rate (the optimizer's per-group max/min lr, so
     the scheduler's own state stays the flags' and a resume checks it as usual). Each phase
     starts from the previous phase's final student, optimizer state included.
  2. rollout (rollout.py): the step's prompts and sampling streams come from (--seed, step);
     the student (trainer.model) samples n responses per prompt with the generator. With data
     parallelism each rank samples only the rows it trains on when the generator can do that
     safely (generation.per_rank_supported: dense, or MoE with the all-to-all dispatcher), the
     ranks decoding in lockstep; otherwise every rank samples the whole global batch and keeps
     its rows.
  3. teacher scoring (sampled-rkl): the teacher's log-prob of every response token, at the
     rollout temperature, in fp32, one forward per micro-batch, once per data-parallel group's
     rows (tensor-parallel rank 0 asks a served or transformers teacher and sends the result to
     its group; a Megatron teacher's forward is the group's collective). The full-vocabulary
     losses score inside the forward step instead (the teacher's logits of one micro-batch at a
     time).
  4. training: forward_step recomputes the student's log-probs (trainer side; compared with the
     sampling log-probs: "logprob diff", non-zero under MoE routing noise and bf16) and the loss
     function reports {name: [sum, tokens]}: the loss first, then the per-token reverse KL to
     the current teacher on the rollouts (s(y) - t(y), the sampled estimate), student and
     teacher log-prob means, the student's entropy and the surrogate's clip fraction. The loss
     is reduced per --opd-loss-reduction (losses.py, "Reduction": per-token weights fixed once
     per step from the global batch's totals), whatever the micro-batching or layout.
Several optimizer steps per rollout: --global-batch-size may divide the rollout's rows (rollout
batch x samples); a rollout of m steps is sampled and scored at its first step, and the student
scores it once more then (no gradient): the old log-probs of slime's clipped surrogate. Step j
of the rollout trains its rows j*G .. j*G + G - 1. A checkpoint inside a rollout keeps the
rollout in the trainer state (TrainState.extra[ROLLOUT_STATE], every rank's rows), dropped after
its last step. --routing-replay (routing_replay.py): the generator records every token's experts
and the trainer's forwards of the rollout replay them.
Metrics of the step (`step_metrics`): phase, response length, stop and truncation rates,
seconds in rollout / teacher scoring / training. `evaluate` (every --eval-interval): the exact
per-token reverse KL KL(p_student || p_teacher) on a fixed held-out prompt set (one sample each,
fixed seed) and, with --eval-assistant-data, the held-out assistant-token loss.

Resume is exact: prompts, sampling seeds and phase are functions of the step (rollout r =
step // m reads prompts r*P .. r*P + P - 1 with seed (--seed, r)), and the rest is the
checkpoint's (weights, optimizer, scheduler, iteration, a rollout in progress); a resume inside
a phase, across a phase switch or inside a rollout trains what an uninterrupted run trains
(tests/test_opd.py, tests/test_opd_steps.py).

The cascade file (YAML):

    settings:                       # defaults for this file's runs (the command line wins)
      rollout-batch-size: 512
      n-samples-per-prompt: 2
      rollout-max-prompt-len: 2048
      rollout-max-response-len: 8192
    phases:
      - name: qwen3-30b-a3b
        teacher: ${QWEN3_30B_A3B_MCORE}   # Megatron checkpoint, HF directory or sglang:URL
        steps: 1900
        lr: 1.0e-6
      - name: qwen3-next-80b-a3b
        teacher: {path: "${QWEN3_NEXT_80B}", tokenizer: "${QWEN3_TOKENIZER}"}
        steps: 1000
        lr: 1.0e-6
        overrides: {opd-kl-coef: 1.0}    # per-phase: rollout-temperature/-top-p/-top-k,
                                         # rollout-max-response-len, opd-loss/-kl-coef/-beta
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch

from megatron_ext.data.args import DataOptions, add_tokenizer_args
from megatron_ext.errors import CheckpointError, ConfigError, DataConfigError, LayoutError
from megatron_ext.inference import sglang_client
from megatron_ext.inference.chat import ChatTokenizer
from megatron_ext.inference.generation import per_rank_supported
from megatron_ext.inference.sglang_client import ClientOptions, SGLangClient
from megatron_ext.inference.weight_sync import DiskWeightSync
from megatron_ext.posttrain import losses, rollout
from megatron_ext.posttrain.rollout import RolloutSettings
from megatron_ext.posttrain.sft_data import SFTDataOptions, build_sft_data, rank_rows
from megatron_ext.posttrain.teachers import (
    MegatronTeacher,
    ServedTeacher,
    TeacherSpec,
    check_token_maps,
    detect_kind,
    load_teacher,
    served_tokenizer,
    teacher_tokenizer,
)
from megatron_ext.task import StepInterrupted, Task, TrainData

log = logging.getLogger(__name__)

# Flags whose default comes from the cascade file's `settings`, else from here.
DEFAULTS: dict[str, Any] = {
    "rollout_batch_size": 8,
    "n_samples_per_prompt": 2,
    "rollout_max_prompt_len": 256,
    "rollout_max_response_len": 128,
    "rollout_temperature": 1.0,
    "rollout_top_p": 1.0,
    "rollout_top_k": 0,
    "rollout_decode_batch_size": None,
    "opd_loss": "sampled-rkl",
    "opd_kl_coef": 1.0,
    "opd_beta": 0.5,
    "opd_chunk_tokens": 1024,
    "eval_prompts": 64,
    # slime's defaults where Marco's paper is silent (docs/posttraining.md, "The cascade file").
    "opd_loss_reduction": "sample-mean",
    "eps_clip": 0.2,
    "eps_clip_high": None,
    "use_tis": False,
    "tis_clip": 2.0,
    "tis_clip_low": 0.0,
    "entropy_coef": 0.0,
    "routing_replay": False,
}
# What a phase may override (the batch shape and the prompt set are the run's).
PHASE_OVERRIDES = ("rollout_temperature", "rollout_top_p", "rollout_top_k",
                   "rollout_max_response_len", "rollout_decode_batch_size", "opd_loss",
                   "opd_kl_coef", "opd_beta")
EVAL_STREAM = 1 << 40  # the held-out sampling stream: step_seed(--seed, EVAL_STREAM)
ROLLOUT_STATE = "opd_rollout"  # TrainState.extra key: the rollout a mid-rollout checkpoint needs


# ====================================================================== the cascade
@dataclass(frozen=True)
class Phase:
    name: str
    teacher: TeacherSpec
    steps: int
    start: int  # first step (0-based) of the phase
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    overrides: tuple = ()  # ((flag dest, value), ...)

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class Cascade:
    phases: tuple
    settings: tuple = ()  # ((flag dest, value), ...) from the file's `settings`
    path: Optional[str] = None

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    def phase_index(self, step: int) -> int:
        """The phase that trains step `step` (0-based); the last one past the end."""
        for i, p in enumerate(self.phases):
            if step < p.end:
                return i
        return len(self.phases) - 1


def _dest(key: str) -> str:
    return str(key).replace("-", "_")


def _expand(value: str, where: str) -> str:
    """${VAR} / $VAR from the environment; an unset variable is an error naming it."""
    for name in re.findall(r"\$\{(\w+)\}|\$(\w+)", value):
        var = name[0] or name[1]
        if var not in os.environ:
            raise ConfigError(f"{where}: environment variable {var} is not set")
    return os.path.expandvars(value)


def _number(value, where: str, kind=float, positive: bool = True):
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(out) or (positive and out <= 0) or out < 0:
        raise ConfigError(f"{where}: must be a {'positive' if positive else 'non-negative'} "
                          f"number, got {value!r}")
    if kind is int and out != float(value):
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    return out


def _teacher(raw, where: str) -> TeacherSpec:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or "path" not in raw:
        raise ConfigError(f"{where}: expected a path or {{path: ..., tokenizer: ..., kind: ...}}")
    unknown = set(raw) - {"path", "tokenizer", "kind"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (path, tokenizer, kind)")
    path = _expand(str(raw["path"]), where)
    if not path.startswith(("sglang:", "http://", "https://")):
        path = os.path.abspath(path)
    kind = raw.get("kind") or detect_kind(path, where)
    if kind not in ("megatron", "hf", "sglang"):
        raise ConfigError(f"{where}: kind {kind!r} is not one of megatron, hf, sglang")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        tokenizer = os.path.abspath(_expand(str(tokenizer), where))
    return TeacherSpec(path=path, kind=kind, tokenizer=tokenizer)


def _settings(raw, where: str, allowed) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of flag names to values")
    out = []
    for key, value in raw.items():
        dest = _dest(key)
        if dest not in allowed:
            raise ConfigError(f"{where}: {key!r} cannot be set here (allowed: "
                              f"{', '.join(d.replace('_', '-') for d in allowed)})")
        out.append((dest, value))
    return tuple(out)


def load_cascade(path: str) -> Cascade:
    """Read and check a cascade file; errors name FILE and the phase/key at fault."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--cascade {path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--cascade {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("phases"), list) or not doc["phases"]:
        raise ConfigError(f"--cascade {path}: expected a mapping with a non-empty 'phases' list")
    unknown = set(doc) - {"name", "description", "settings", "phases"}
    if unknown:
        raise ConfigError(f"--cascade {path}: unknown key {sorted(unknown)[0]!r} "
                          "(name, description, settings, phases)")
    settings = _settings(doc.get("settings"), f"{path}: settings", tuple(DEFAULTS))
    phases, start, names = [], 0, set()
    for i, raw in enumerate(doc["phases"], 1):
        where = f"{path}: phase {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping (name, teacher, steps, lr, overrides)")
        unknown = set(raw) - {"name", "teacher", "steps", "lr", "min_lr", "min-lr", "overrides"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                              "(name, teacher, steps, lr, min-lr, overrides)")
        for key in ("teacher", "steps"):
            if key not in raw:
                raise ConfigError(f"{where}: no {key!r}")
        name = str(raw.get("name") or f"phase{i}")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        names.add(name)
        steps = _number(raw["steps"], f"{where} steps", int)
        lr = None if raw.get("lr") is None else _number(raw["lr"], f"{where} lr", positive=False)
        min_raw = raw.get("min_lr", raw.get("min-lr"))
        min_lr = None if min_raw is None else _number(min_raw, f"{where} min-lr", positive=False)
        teacher = dataclasses.replace(_teacher(raw["teacher"], f"{where} teacher"), name=name)
        overrides = _settings(raw.get("overrides"), f"{where} overrides", PHASE_OVERRIDES)
        phases.append(Phase(name=name, teacher=teacher, steps=steps, start=start, lr=lr,
                            min_lr=min_lr, overrides=overrides))
        start += steps
    return Cascade(phases=tuple(phases), settings=settings, path=os.path.abspath(path))


# ====================================================================== flags
def add_opd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The OPD flags (slime's names where they exist); defaults marked 'cascade' come from the
    cascade file's `settings`, else the value shown."""

    g = parser.add_argument_group("on-policy distillation")
    g.add_argument("--cascade", metavar="FILE",
                   help="YAML cascade: phases of (name, teacher, steps, lr, overrides), each "
                        "starting from the previous phase's student (configs/posttrain/)")
    g.add_argument("--teacher", metavar="PATH",
                   help="one phase of --train-iters steps with this teacher (Megatron checkpoint, "
                        "transformers directory or sglang:http://HOST:PORT) instead of --cascade")
    g.add_argument("--teacher-tokenizer", metavar="PATH",
                   help="the --teacher's tokenizer if its checkpoint records none")
    g.add_argument("--prompt-data", nargs="+", metavar="FILE",
                   help="chat jsonl files whose conversations, up to the last user turn, are "
                        "the rollout prompts (default: the bundled SFT sample's training set)")
    g.add_argument("--eval-prompt-data", nargs="+", metavar="FILE",
                   help="held-out prompts for the reverse KL every --eval-interval (default: the "
                        "bundled SFT sample's held-out set)")
    g.add_argument("--eval-prompts", type=int, help=f"held-out prompts per evaluation "
                   f"(cascade, else {DEFAULTS['eval_prompts']})")
    g.add_argument("--eval-assistant-data", nargs="*", metavar="PREFIX",
                   help="also evaluate the held-out assistant-token loss: chat data prefixes "
                        "(tools/preprocess_chat_data.py), or none for the bundled SFT sample's "
                        "held-out split")
    g.add_argument("--rollout-batch-size", type=int,
                   help=f"prompts per rollout (cascade, else {DEFAULTS['rollout_batch_size']}); "
                        "its rows, this x --n-samples-per-prompt, are the default "
                        "--global-batch-size (a divisor: several optimizer steps per rollout)")
    g.add_argument("--n-samples-per-prompt", type=int,
                   help=f"responses sampled per prompt (cascade, else {DEFAULTS['n_samples_per_prompt']})")
    g.add_argument("--rollout-max-prompt-len", type=int,
                   help=f"longer prompts are left out, counted (cascade, else "
                        f"{DEFAULTS['rollout_max_prompt_len']})")
    g.add_argument("--rollout-max-response-len", type=int,
                   help=f"longer responses are truncated, counted (cascade, else "
                        f"{DEFAULTS['rollout_max_response_len']})")
    g.add_argument("--rollout-temperature", type=float,
                   help="sampling and scoring temperature (cascade, else 1.0)")
    g.add_argument("--rollout-top-p", type=float, help="nucleus sampling (cascade, else 1.0 = off)")
    g.add_argument("--rollout-top-k", type=int, help="top-k sampling (cascade, else 0 = off)")
    g.add_argument("--rollout-decode-batch-size", type=int,
                   help="rows decoded together per rank (cascade, else all of the rank's rows)")
    g.add_argument("--opd-loss", choices=losses.LOSSES,
                   help="sampled-rkl (Marco/slime: policy gradient with advantage "
                        "-(log p_s - log p_t)), or full-vocabulary rkl, fkl, jsd (cascade, else "
                        "sampled-rkl)")
    g.add_argument("--opd-kl-coef", type=float, help="scale of the loss (cascade, else 1.0)")
    g.add_argument("--opd-beta", type=float,
                   help="jsd: weight of the teacher in the mixture, 0 = forward KL, 1 = reverse "
                        "KL (cascade, else 0.5)")
    g.add_argument("--rollout-engine", choices=("megatron", "sglang"), default="megatron",
                   help="who samples the rollouts: the student in process (the Megatron "
                        "generator), or SGLang servers (--rollout-url) holding the student's "
                        "weights, synced every --rollout-sync-interval steps")
    g.add_argument("--rollout-url", nargs="+", metavar="URL",
                   help="--rollout-engine sglang: the servers (http://HOST:PORT, SGLang or "
                        "tools/serve_teacher.py); requests are spread over them")
    g.add_argument("--rollout-sync-interval", type=int, default=1,
                   help="--rollout-engine sglang: steps between weight syncs (1: every step, "
                        "on-policy; N: rollouts up to N-1 optimizer steps old)")
    g.add_argument("--rollout-sync-dir", metavar="DIR",
                   help="--rollout-engine sglang: a directory the servers read (shared file "
                        "system) for the synced weights (default: --save/rollout-weights)")
    g.add_argument("--rollout-timeout", type=float, default=600.0,
                   help="seconds a request to a rollout engine or served teacher may take")
    g.add_argument("--rollout-retries", type=int, default=2,
                   help="further tries of a request after a connection failure, timeout or 5xx")
    g.add_argument("--opd-chunk-tokens", type=int,
                   help="full-vocabulary losses: tokens per chunk (memory bound; cascade, else 1024)")
    g.add_argument("--opd-loss-reduction", choices=losses.REDUCTIONS,
                   help="sample-mean: a mean over each response's tokens, then over responses "
                        "(slime's default); token-mean: over all response tokens of the global "
                        "batch (slime's --calculate-per-token-loss) (cascade, else sample-mean)")
    g.add_argument("--eps-clip", type=float,
                   help="sampled-rkl: the clipped surrogate's lower range, ratio >= 1 - eps "
                        "(cascade, else 0.2; acts from the second optimizer step of a rollout)")
    g.add_argument("--eps-clip-high", type=float,
                   help="sampled-rkl: the upper range, ratio <= 1 + eps-high (cascade, else "
                        "--eps-clip)")
    g.add_argument("--use-tis", action="store_true", default=None,
                   help="sampled-rkl: truncated importance sampling, the loss times "
                        "clip(exp(trainer - sampler log-prob), --tis-clip-low, --tis-clip)")
    g.add_argument("--tis-clip", type=float, help="--use-tis upper clip (cascade, else 2.0)")
    g.add_argument("--tis-clip-low", type=float, help="--use-tis lower clip (cascade, else 0)")
    g.add_argument("--entropy-coef", type=float,
                   help="subtract this x the student's entropy on the response tokens from the "
                        "loss (cascade, else 0: logged only)")
    g.add_argument("--routing-replay", action="store_true", default=None,
                   help="MoE student: the generator records each token's top-k experts per "
                        "layer and the trainer's forwards of the rollout route the same way "
                        "(Megatron-Core's RouterReplay)")
    add_tokenizer_args(g, cache_help="where the bundled SFT sample is prepared for --eval-assistant-data",
                       if_missing=True)
    # Filled by resolve_opd_args: the cascade's total steps, rollout x samples, prompt + response.
    parser.set_defaults(train_iters=None, global_batch_size=None, seq_length=None)
    return parser


def _cascade_from_args(args) -> Cascade:
    if args.cascade and args.teacher:
        raise ConfigError("--cascade and --teacher are exclusive (a cascade names its teachers)")
    if args.cascade:
        return load_cascade(args.cascade)
    if not args.teacher:
        raise ConfigError("opd needs --cascade FILE (phases of teachers) or --teacher PATH")
    if args.train_iters is None:
        raise ConfigError("--teacher: give --train-iters (the steps of its one phase)")
    spec = _teacher({"path": args.teacher, "tokenizer": args.teacher_tokenizer}, "--teacher")
    name = os.path.basename(spec.path.rstrip("/")) or "teacher"
    return Cascade(phases=(Phase(name=name, teacher=dataclasses.replace(spec, name=name),
                                 steps=args.train_iters, start=0),))


def resolve_opd_args(args: argparse.Namespace) -> argparse.Namespace:
    """Before check_args: read the cascade, fill the OPD flags from its `settings`, and derive
    --train-iters (the phases' total), --global-batch-size (rollout batch x samples) and
    --seq-length (longest prompt + response) unless given, checking them if given."""
    cascade = _cascade_from_args(args)
    file_settings = dict(cascade.settings)
    for dest, default in DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, file_settings.get(dest, default))
    for dest in ("rollout_batch_size", "n_samples_per_prompt"):  # before their product is used
        value = getattr(args, dest)
        try:  # a whole number (a YAML string of one too), as the phases read it with int()
            number = int(value) if float(value) == int(float(value)) else 0
        except (TypeError, ValueError, OverflowError):
            number = 0
        if number < 1:
            in_file = dest in file_settings and value == file_settings[dest]
            where = f"{cascade.path}: settings: " if in_file else ""
            raise ConfigError(f"{where}--{dest.replace('_', '-')} must be an integer >= 1, got {value!r}")
    rollout_rows = int(args.rollout_batch_size) * int(args.n_samples_per_prompt)
    if args.global_batch_size is None:
        args.global_batch_size = rollout_rows
    elif args.global_batch_size < 1 or rollout_rows % args.global_batch_size:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} must divide --rollout-batch-size "
                          f"{args.rollout_batch_size} x --n-samples-per-prompt {args.n_samples_per_prompt} "
                          f"= {rollout_rows} (each rollout gives a whole number of optimizer steps)")
    per_rollout = rollout_rows // args.global_batch_size
    for i, phase in enumerate(cascade.phases, 1):
        if phase.steps % per_rollout:
            where = f"{cascade.path}: phase {i} ({phase.name})" if cascade.path else "--train-iters"
            raise ConfigError(f"{where}: {phase.steps} steps is not a multiple of the {per_rollout} "
                              f"optimizer steps of each rollout ({rollout_rows} rows / "
                              f"--global-batch-size {args.global_batch_size})")
    total = cascade.total_steps
    if args.train_iters is None:
        args.train_iters = total
    elif args.train_iters > total:
        raise ConfigError(f"--train-iters {args.train_iters} exceeds the cascade's {total} steps "
                          f"({cascade.path})")
    longest = max(int(args.rollout_max_prompt_len) + int(dict(p.overrides).get(
        "rollout_max_response_len", args.rollout_max_response_len)) for p in cascade.phases)
    if args.seq_length is None:
        args.seq_length = longest
    elif args.seq_length < longest:
        raise ConfigError(f"--seq-length {args.seq_length} is shorter than "
                          f"--rollout-max-prompt-len + --rollout-max-response-len = {longest}")
    if args.pipeline_model_parallel_size != 1:
        raise LayoutError("opd: --pipeline-model-parallel-size must be 1 (the student generates "
                          "its rollouts, which needs the whole model on each rank)")
    args.opd_cascade = cascade
    return args


@dataclass(frozen=True)
class PhaseSettings:
    rollout: RolloutSettings
    opd_loss: str
    kl_coef: float
    beta: float
    reduction: str = "sample-mean"  # --opd-loss-reduction (the run's)
    policy: losses.PolicyLoss = losses.PolicyLoss()  # sampled-rkl's surrogate (kl_coef in it)
    entropy_coef: float = 0.0

    @property
    def full_vocab(self) -> bool:
        """The loss needs the teacher's logits in the forward step (else its log-prob of each
        sampled token, scored once per rollout)."""
        return losses.needs_teacher_logits(self.opd_loss)


@dataclass(frozen=True)
class OPDOptions:
    """What the OPD flags mean once checked (the run's `cfg.task`; its tokenizer is
    `cfg.data`'s, see opd_data_options)."""

    cascade: Cascade
    base: tuple  # ((flag dest, value), ...) after the command line and the cascade settings
    prompt_data: tuple = rollout.DEFAULT_PROMPTS
    eval_prompt_data: tuple = rollout.DEFAULT_EVAL_PROMPTS
    eval_prompts: int = 64
    eval_assistant_data: Optional[tuple] = None  # None: off; (): the bundled SFT held-out split
    chunk_tokens: int = 1024
    engine: str = "megatron"  # --rollout-engine
    engine_urls: tuple = ()  # --rollout-url
    sync_interval: int = 1
    sync_dir: Optional[str] = None
    timeout: float = 600.0  # --rollout-timeout (engines and served teachers)
    retries: int = 2
    routing_replay: bool = False  # --routing-replay

    def client_options(self, urls: tuple = ()):
        return ClientOptions(urls=tuple(urls or self.engine_urls), timeout=self.timeout,
                             retries=self.retries)

    def phase_settings(self, index: int) -> PhaseSettings:
        v = {**dict(self.base), **dict(self.cascade.phases[index].overrides)}
        return _phase_settings(v, f"{self.cascade.path or '--teacher'}: phase {index + 1}: ")


def _phase_settings(v: dict, where: str) -> PhaseSettings:
    try:
        settings = RolloutSettings(
            rollout_batch_size=int(v["rollout_batch_size"]),
            n_samples_per_prompt=int(v["n_samples_per_prompt"]),
            max_prompt_len=int(v["rollout_max_prompt_len"]),
            max_response_len=int(v["rollout_max_response_len"]),
            temperature=float(v["rollout_temperature"]), top_p=float(v["rollout_top_p"]),
            top_k=int(v["rollout_top_k"]),
            decode_batch_size=None if v["rollout_decode_batch_size"] is None
            else int(v["rollout_decode_batch_size"]))
        kl_coef, beta = float(v["opd_kl_coef"]), float(v["opd_beta"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}{e}") from None
    settings.check(where)
    if v["opd_loss"] not in losses.LOSSES:
        raise ConfigError(f"{where}--opd-loss {v['opd_loss']!r}: expected one of {', '.join(losses.LOSSES)}")
    if not (kl_coef > 0 and math.isfinite(kl_coef)):
        raise ConfigError(f"{where}--opd-kl-coef must be a positive number, got {kl_coef}")
    if not 0 <= beta <= 1:
        raise ConfigError(f"{where}--opd-beta must be in [0, 1], got {beta}")
    if v["opd_loss_reduction"] not in losses.REDUCTIONS:
        raise ConfigError(f"{where}--opd-loss-reduction {v['opd_loss_reduction']!r}: expected one of "
                          f"{', '.join(losses.REDUCTIONS)}")
    policy = _policy(v, kl_coef, where)
    entropy_coef = _finite(v["entropy_coef"], "--entropy-coef", where)
    return PhaseSettings(settings, v["opd_loss"], kl_coef, beta, v["opd_loss_reduction"], policy,
                         entropy_coef)


def _finite(value, flag: str, where: str, low: float = -math.inf) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{flag} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < low:
        raise ConfigError(f"{where}{flag} must be a finite number >= {low:g}, got {value!r}")
    return out


def _policy(v: dict, kl_coef: float, where: str) -> losses.PolicyLoss:
    """slime's clipped surrogate and TIS settings, checked."""
    eps = _finite(v["eps_clip"], "--eps-clip", where, 0.0)
    high = None if v["eps_clip_high"] is None else _finite(v["eps_clip_high"], "--eps-clip-high", where, 0.0)
    low_tis = _finite(v["tis_clip_low"], "--tis-clip-low", where, 0.0)
    tis = _finite(v["tis_clip"], "--tis-clip", where, 0.0)
    if tis <= low_tis:
        raise ConfigError(f"{where}--tis-clip {tis:g} must exceed --tis-clip-low {low_tis:g}")
    return losses.PolicyLoss(kl_coef=kl_coef, eps_clip=eps, eps_clip_high=high,
                             use_tis=bool(v["use_tis"]), tis_clip=tis, tis_clip_low=low_tis)


def _check_base_settings(opts: OPDOptions) -> None:
    """The settings before any phase overrides them, blamed where they were given: first the
    command line's (the file's settings at their defaults), then the cascade file's settings."""
    given = dict(opts.base)
    from_file = {d for d, v in opts.cascade.settings if given.get(d) == v}
    _phase_settings({d: DEFAULTS[d] if d in from_file else v for d, v in given.items()}, "")
    if from_file:
        _phase_settings(given, f"{opts.cascade.path}: settings: ")


def opd_data_options(args: argparse.Namespace) -> DataOptions:
    """OPD's `cfg.data`: the tokenizer and cache only (its prompts are task options)."""
    return DataOptions(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                       data_cache_path=args.data_cache_path)


def opd_options(args: argparse.Namespace) -> OPDOptions:
    """The checked OPD options (call resolve_opd_args first)."""
    cascade = getattr(args, "opd_cascade", None) or resolve_opd_args(args).opd_cascade
    base = tuple((d, getattr(args, d)) for d in DEFAULTS)
    for name, files in (("--prompt-data", args.prompt_data), ("--eval-prompt-data", args.eval_prompt_data)):
        for f in files or ():
            if not os.path.isfile(f):
                raise DataConfigError(f"{name} {f}: no such file")
    if args.eval_prompts < 1 or args.opd_chunk_tokens < 1:
        raise ConfigError("--eval-prompts and --opd-chunk-tokens must be >= 1")
    opts = OPDOptions(
        cascade=cascade, base=base,
        prompt_data=tuple(args.prompt_data or rollout.DEFAULT_PROMPTS),
        eval_prompt_data=tuple(args.eval_prompt_data or rollout.DEFAULT_EVAL_PROMPTS),
        eval_prompts=int(args.eval_prompts),
        eval_assistant_data=None if args.eval_assistant_data is None else tuple(args.eval_assistant_data),
        chunk_tokens=int(args.opd_chunk_tokens), routing_replay=bool(args.routing_replay),
        **_engine_options(args))
    _check_base_settings(opts)
    for i, phase in enumerate(cascade.phases):
        ps = opts.phase_settings(i)
        where = f"{cascade.path or '--teacher'}: phase {i + 1} ({phase.name})"
        if phase.teacher.kind == "sglang" and ps.full_vocab:
            raise ConfigError(f"{where}: --opd-loss {ps.opd_loss} needs the teacher's full logits; a "
                              "served (sglang) teacher returns per-token log-probs only (use "
                              "sampled-rkl)")
        if phase.teacher.kind == "sglang" and ps.rollout.temperature != 1.0:
            raise ConfigError(f"{where}: --rollout-temperature {ps.rollout.temperature:g} with a "
                              "served (sglang) teacher: SGLang scores prompt tokens at temperature "
                              "1 only (use 1.0, Marco's setting)")
    return opts


def _engine_options(args) -> dict:
    """--rollout-engine and its flags, checked."""
    engine, urls = args.rollout_engine, tuple(args.rollout_url or ())
    if args.rollout_sync_interval < 1:
        raise ConfigError(f"--rollout-sync-interval must be >= 1, got {args.rollout_sync_interval}")
    if not (args.rollout_timeout > 0 and math.isfinite(args.rollout_timeout)):
        raise ConfigError(f"--rollout-timeout must be a positive number of seconds, got "
                          f"{args.rollout_timeout}")
    if args.rollout_retries < 0:
        raise ConfigError(f"--rollout-retries must be >= 0, got {args.rollout_retries}")
    if engine == "sglang" and args.routing_replay:
        raise ConfigError("--routing-replay needs the in-process generator's routing; the SGLang "
                          "engine (--rollout-engine sglang) returns none here")
    if engine == "megatron" and urls:
        raise ConfigError("--rollout-url is for --rollout-engine sglang (the default engine, "
                          "megatron, samples in process)")
    sync_dir = args.rollout_sync_dir
    if engine == "sglang":
        if not urls:
            raise ConfigError("--rollout-engine sglang: give --rollout-url URL [URL ...]")
        if sync_dir is None and not getattr(args, "save", None):
            raise ConfigError("--rollout-engine sglang: give --rollout-sync-dir (a directory the "
                              "servers read) or --save (then --save/rollout-weights)")
        sync_dir = os.path.abspath(sync_dir or os.path.join(args.save, "rollout-weights"))

        ClientOptions(urls=urls, timeout=args.rollout_timeout).check("--rollout-url")
    return {"engine": engine, "engine_urls": urls, "sync_interval": int(args.rollout_sync_interval),
            "sync_dir": sync_dir, "timeout": float(args.rollout_timeout),
            "retries": int(args.rollout_retries)}


# ====================================================================== the task
def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Rollout:
    """One rollout's training rows on this rank: batches[j] are the micro-batches of optimizer
    step first_step + j."""

    first_step: int
    batches: list
    statistics: dict
    times: dict


class OPDData(TrainData):
    """The trainer's data interface over the task's rollouts (prepared in on_step_start)."""

    def __init__(self, task: "OPDTask"):
        self.task = task

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int):
        prepared = self.task.prepared
        if prepared is None or prepared[0] != step:
            raise RuntimeError(f"OPD: no rollout prepared for step {step} (on_step_start not run)")
        return prepared[1]

    def validation_names(self) -> list[str]:
        return []

    def stage_at(self, step: int):
        return None

    def consumed_tokens_by_source(self, step: int) -> dict:
        return {}

    def summary(self) -> list[str]:
        return self.task.summary()


class OPDTask(Task):
    """`posttrain_marco.py opd`: the trainer's task for cascaded on-policy distillation."""

    kind = "opd"

    def __init__(self, cfg):
        self.cfg, self.opts = cfg, cfg.task
        self.forward_step = self._forward_step  # bound: the loss needs the teacher
        self.teacher = None
        self.teacher_phase: Optional[int] = None
        self.prepared = None
        self.current_rollout: Optional[Rollout] = None
        self.settings: Optional[PhaseSettings] = None
        self._info: dict = {}
        self._teacher_seconds = 0.0
        self._train_start = 0.0
        self._sft_eval = None
        self.replay = None  # --routing-replay: routing_replay.RoutingReplay of the student
        self.engine = None  # --rollout-engine sglang: the client (rank 0) and the weight sync
        self.weight_sync = None
        self.synced_step: Optional[int] = None

    # ------------------------------------------------------------------ setup
    def build_data(self, trainer) -> OPDData:
        from megatron.core import parallel_state


        self.trainer = trainer
        self.tok = ChatTokenizer.from_megatron(trainer.tokenizer)
        first = self.opts.phase_settings(0).rollout
        self.prompts = rollout.PromptSet(self.opts.prompt_data, self.tok, first.max_prompt_len,
                                         "--prompt-data")
        self.eval_set = rollout.PromptSet(self.opts.eval_prompt_data, self.tok,
                                          first.max_prompt_len, "--eval-prompt-data")
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.multiple = self.tp * (8 if torch.cuda.is_available() else 1)
        self.per_rank = trainer.dp_size > 1 and per_rank_supported(trainer.model)
        # Optimizer steps per rollout (resolve_opd_args checked that it divides).
        self.per_rollout = first.global_batch_size // self.cfg.batch.global_batch_size
        if self.opts.routing_replay:
            from megatron_ext.posttrain.routing_replay import RoutingReplay  # Megatron-Core

            self.replay = RoutingReplay(trainer.model)
        # Before the first step: every teacher's token map is the student's (a served one's
        # as its server reports it), and so is a rollout engine's.
        for phase in self.opts.cascade.phases:
            if phase.teacher.kind == "sglang":
                served = self._served_teacher(phase.teacher)
                check_token_maps(self.tok, served.tokenizer, phase.teacher.label)
            else:
                check_token_maps(self.tok, teacher_tokenizer(phase.teacher), phase.teacher.label)
        if self.opts.engine == "sglang":
            self._start_engine(trainer)
        data = OPDData(self)
        for line in self.summary():
            trainer.log(line)
        return data

    def summary(self) -> list[str]:
        c, lines = self.opts.cascade, []
        for i, p in enumerate(c.phases):
            s = self.opts.phase_settings(i)
            lr = f"lr {p.lr:g}" if p.lr is not None else "lr --lr"
            lines.append(f"OPD phase {i + 1}/{len(c.phases)} {p.name}: steps {p.start + 1}-{p.end}, "
                         f"{lr}, teacher {p.teacher.kind} {p.teacher.path}, loss {s.opd_loss}, "
                         f"T {s.rollout.temperature:g}, top-p {s.rollout.top_p:g}, "
                         f"response <= {s.rollout.max_response_len}")
        s = self.opts.phase_settings(0).rollout
        lines.append(
            f"OPD rollouts: {s.rollout_batch_size} prompts x {s.n_samples_per_prompt} samples per "
            f"step from {len(self.prompts)} prompts ({self.prompts.too_long} longer than "
            f"{s.max_prompt_len} tokens left out), "
            + ("each data-parallel rank samples its own rows" if self.per_rank else
               "every rank samples the whole batch")
            + f"; {self.per_rollout} optimizer step(s) of {self.cfg.batch.global_batch_size} rows "
              f"per rollout; held-out: {min(self.opts.eval_prompts, len(self.eval_set))} of "
              f"{len(self.eval_set)} prompts")
        s = self.opts.phase_settings(0)
        p = s.policy
        high = p.eps_clip if p.eps_clip_high is None else p.eps_clip_high
        lines.append(f"OPD loss: {s.reduction} reduction; sampled-rkl surrogate clip "
                     f"[{1 - p.eps_clip:g}, {1 + high:g}]"
                     + (f", TIS clip [{p.tis_clip_low:g}, {p.tis_clip:g}]" if p.use_tis else ", no TIS")
                     + f", entropy coefficient {s.entropy_coef:g}"
                     + (", routing replay" if self.opts.routing_replay else ""))
        return lines

    def _should_stop(self):
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.stop_signal.received

    def _served_teacher(self, spec):
        return ServedTeacher(spec, self.opts.client_options(), self._should_stop)

    def _start_engine(self, trainer) -> None:
        """--rollout-engine sglang: the client and weight sync (rank 0 talks to the engines);
        each engine must be up and serve the student's token map."""
        import torch.distributed as dist


        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            self.engine = SGLangClient(self.opts.client_options(), what="rollout engine",
                                       should_stop=self._should_stop)
            self.engine.health()
            for url, info in zip(self.opts.engine_urls, self.engine.model_info()):
                spec = TeacherSpec(path=url, kind="sglang", name=f"rollout engine {url}")
                check_token_maps(self.tok, served_tokenizer(info, spec, url), spec.label)
        self.weight_sync = DiskWeightSync(self.opts.sync_dir, self.cfg.model, self.engine,
                                          self.cfg.model_options.moe.aux_loss_coeff)
        trainer.log(f"OPD rollouts on SGLang engines {' '.join(self.opts.engine_urls)}; weights "
                    f"synced through {self.opts.sync_dir} every {self.opts.sync_interval} step(s)")

    def _sync_weights(self, trainer, step: int) -> dict:
        """Before step `step`'s rollout: the engines get the weights after `step` optimizer
        steps when due (every --rollout-sync-interval steps, and always on the run's first)."""
        if self.weight_sync is None:
            return {}
        due = self.synced_step is None or step % self.opts.sync_interval == 0
        if not due:
            return {}
        cost = self.weight_sync.sync(trainer.model, step)
        self.synced_step = step
        trainer.log(f"weights of step {step} synced to the rollout engines: "
                    f"{cost['seconds']:.2f} s, {cost['bytes'] / 1e9:.3f} GB")
        return {"time/weight_sync_sec": cost["seconds"], "rollout/weight_sync_gb": cost["bytes"] / 1e9}

    # ------------------------------------------------------------------ phases
    def _ensure_teacher(self, trainer, index: int) -> None:
        if self.teacher_phase == index:
            return
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        phase = self.opts.cascade.phases[index]
        cfg = self.cfg
        self.teacher = load_teacher(phase.teacher, student_tokenizer=self.tok,
                                    options=cfg.model_options, seq_length=cfg.batch.seq_length,
                                    client_options=self.opts.client_options(),
                                    should_stop=self._should_stop)
        self.teacher_phase = index
        trainer.log(f"OPD phase {index + 1}/{len(self.opts.cascade.phases)} {phase.name} "
                    f"(steps {phase.start + 1}-{phase.end}): teacher {phase.teacher.path}")

    def _set_lr(self, trainer, phase: Phase) -> None:
        if phase.lr is None:
            return
        o = self.cfg.optim
        min_lr = phase.min_lr if phase.min_lr is not None else (
            phase.lr * o.min_lr / o.lr if o.lr > 0 else phase.lr)
        for group in trainer.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = phase.lr, min(min_lr, phase.lr)
        trainer.scheduler.step(increment=0)  # this step's lr from the phase's

    def _enter_phase(self, trainer, step: int) -> int:
        index = self.opts.cascade.phase_index(step)
        self._ensure_teacher(trainer, index)
        self._set_lr(trainer, self.opts.cascade.phases[index])
        self.settings = self.opts.phase_settings(index)
        return index

    # ------------------------------------------------------------------ a step
    def on_step_start(self, trainer, step: int) -> None:
        t0 = _now()
        if self.replay is not None:
            self.replay.off()
        index = self._enter_phase(trainer, step)
        if step == self.opts.cascade.phases[index].start and self.cfg.logging.eval_interval:
            # The held-out reverse KL to the phase's teacher before its first step (the
            # phase's "before"; its "after" is the evaluation at the phase's last step).
            trainer.metrics.log_scalars(step, self._evaluate(trainer, index, step))
            t0 = _now()
        first = step - step % self.per_rollout
        if self.current_rollout is None or self.current_rollout.first_step != first:
            self.current_rollout = self._new_rollout(trainer, step, first, t0)
            times = self.current_rollout.times
        else:  # a later optimizer step of the same rollout
            times = {"time/teacher_load_sec": _now() - t0, "time/rollout_sec": 0.0,
                     "time/teacher_sec": 0.0}
        self.prepared = (step, self.current_rollout.batches[step - first])
        self._info = {"opd/phase": index + 1, **self.current_rollout.statistics, **times}
        self._teacher_seconds = 0.0
        self._train_start = _now()

    def step_metrics(self, step: int) -> dict:
        elapsed = _now() - self._train_start
        info = dict(self._info)
        info["time/teacher_sec"] += self._teacher_seconds
        info["time/train_sec"] = elapsed - self._teacher_seconds
        if (step + 1) % self.per_rollout == 0:  # the rollout is used up: no checkpoint needs it
            self.trainer.state.extra.pop(ROLLOUT_STATE, None)
        return info

    def _new_rollout(self, trainer, step: int, first: int, t0: float) -> "Rollout":
        """The rollout that optimizer steps first .. first + per_rollout - 1 train on: sampled,
        scored by the teacher (sampled-rkl) and, with several steps per rollout, by the
        student as it is now (the policy that sampled: the clipped surrogate's old log-probs);
        or, resuming inside a rollout, the one the checkpoint kept."""
        sync = self._sync_weights(trainer, step) if step == first else {}
        t1 = _now()
        if step != first:
            samples, stats = self._restored_rollout(trainer, first)
            batches = self._step_batches(samples)
            t2 = t3 = _now()
        else:
            samples, stats = self._rollout(trainer, first // self.per_rollout)
            t2 = _now()
            batches = self._step_batches(samples)
            self._score(trainer, batches, samples)
            t3 = _now()
        if step == first and self.per_rollout > 1 and self.cfg.checkpoint.save:
            self._keep_rollout(trainer, first, samples)
        times = {"time/teacher_load_sec": t1 - t0 - sync.get("time/weight_sync_sec", 0.0),
                 "time/rollout_sec": t2 - t1, "time/teacher_sec": t3 - t2, **sync}
        return Rollout(first, batches, rollout.statistics_dict(stats, "rollout"), times)

    def _my_rows(self, trainer) -> list[list[list[int]]]:
        """Rollout rows of this rank: [optimizer step of the rollout][micro-batch] -> rows."""

        gbs = self.cfg.batch.global_batch_size
        mb_rows = rank_rows(gbs, trainer.dp_rank, trainer.dp_size, self.cfg.batch.micro_batch_size)
        return [[[j * gbs + g for g in rows] for rows in mb_rows] for j in range(self.per_rollout)]

    def _step_batches(self, samples: dict) -> list[list[dict]]:
        """Each optimizer step's micro-batches, their tokens weighted for the reduction with
        the step's totals (response tokens and responses over the whole global batch)."""
        steps = [[rollout.collate([samples[g] for g in rows], self.tok.pad_id, self.multiple)
                  for rows in mbs] for mbs in self._my_rows(self.trainer)]
        totals = torch.tensor([[sum(float(b["loss_mask"].sum()) for b in mbs),
                                sum(b["tokens"].shape[0] for b in mbs)] for mbs in steps],
                              dtype=torch.float64)
        totals = self._dp_sum(totals)
        for (tokens, responses), mbs in zip(totals.tolist(), steps):
            for b in mbs:
                w = losses.response_weights(b["loss_mask"].sum(1), tokens, responses,
                                            self.settings.reduction)
                b["loss_weights"] = b["loss_mask"] * w[:, None]
        return steps

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Summed over the data-parallel group (every rank holds its own rows' share)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
            return t
        out = t.to(_device())
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        return out.cpu()

    def _score(self, trainer, batches: list, samples: dict) -> None:
        """Per response token of each micro-batch (and kept with its samples): the teacher's
        log-prob (sampled-rkl) and, with several optimizer steps per rollout, the student's
        now, before the rollout's first step (no gradient)."""
        for rows_of_step, mbs in zip(self._my_rows(trainer), batches):
            for rows, batch in zip(rows_of_step, mbs):
                scores = {}
                if not self.settings.full_vocab:
                    scores["teacher_logprobs"] = self._teacher_logprobs(batch)
                if self.per_rollout > 1:
                    scores["old_logprobs"] = self._student_logprobs(trainer, batch)
                for key, values in scores.items():
                    batch[key] = values * batch["loss_mask"]
                    rollout.set_response_values(samples, rows, key, batch, values)

    def _student_logprobs(self, trainer, batch: dict) -> torch.Tensor:
        """The student's log-probs of `batch`'s labels, [b, s], no gradient (the policy that
        sampled the rollout, before its first optimizer step)."""
        from megatron_ext import trainer as trainer_module  # Megatron-Core: opd --help stays light

        model = trainer.model[0]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._replaying(batch):
                b = trainer_module.to_device(batch)
                logits = model(b["tokens"], b["position_ids"], None)
                lp = losses.selected_logprobs(
                    logits, b["labels"], temperature=self.settings.rollout.temperature,
                    vocab_size=self.tok.vocab_size, vocab_parallel=self.tp > 1,
                    chunk_tokens=self.opts.chunk_tokens)
        finally:
            model.train(was_training)
        return lp.reshape(batch["labels"].shape).float().cpu()

    def _keep_rollout(self, trainer, first: int, samples: dict) -> None:
        """With several optimizer steps per rollout a checkpoint may fall inside one: the whole
        rollout (every rank's rows, the sampling policy's log-probs with them) goes into the
        trainer state that checkpoints save (global rank 0's, which every rank loads), until its
        last step (step_metrics drops it)."""
        import torch.distributed as dist

        mine = {g: rollout.sample_state(samples[g]) for mbs in self._my_rows(trainer)
                for rows in mbs for g in rows}
        parts = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:  # global rank 0 saves it
            parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, parts, dst=0)
            if dist.get_rank() != 0:
                return
        rows = {g: row for part in parts for g, row in part.items()}
        trainer.state.extra[ROLLOUT_STATE] = {"first_step": first, "rows": rows}

    def _restored_rollout(self, trainer, first: int):
        kept = trainer.state.extra.get(ROLLOUT_STATE)
        if not kept or kept.get("first_step") != first:
            raise CheckpointError(
                f"--load {self.cfg.checkpoint.load}: iteration {trainer.state.iteration} is inside "
                f"the rollout that began at step {first + 1}, but the checkpoint does not hold "
                "that rollout (resume from a checkpoint at a rollout boundary)")
        samples = {int(g): rollout.sample_from_state(row) for g, row in kept["rows"].items()}
        return samples, rollout.statistics(list(samples.values()))

    def _replaying(self, batch: dict):
        """For the student's forwards of `batch`: its routing replayed from the rollout
        (--routing-replay; routing_replay.py), left set for the backward's recompute until
        the next micro-batch, a rollout or an evaluation replaces it."""
        import contextlib

        if self.replay is not None:
            self.replay.replay(batch.get("routing"))
        return contextlib.nullcontext()

    def _recording(self, trainer):
        import contextlib

        routing = getattr(trainer, "routing", None)
        return routing.recording("rollout") if routing is not None else contextlib.nullcontext()

    def _rollout(self, trainer, index: int):
        """Rollout number `index`: {row: Sample} of the rows this rank holds (its own, or all
        of them), and the statistics of the whole rollout."""
        s = self.settings.rollout
        n, total = s.n_samples_per_prompt, s.global_batch_size
        chosen = self.prompts.stream(index * s.rollout_batch_size, s.rollout_batch_size,
                                     self.cfg.batch.seed)
        if self.opts.engine == "sglang":
            samples = self._served_rollout(index * self.per_rollout, chosen, s)
            return {x.row: x for x in samples}, rollout.statistics(samples)
        rows = ([g for mbs in self._my_rows(trainer) for b in mbs for g in b] if self.per_rank
                else list(range(total)))
        import contextlib

        replay = self.replay.recording() if self.replay is not None else contextlib.nullcontext()
        with self._recording(trainer), replay as record:
            samples = rollout.sample(trainer.model, [self.prompts.prompts[chosen[g // n]] for g in rows],
                                     rows, s, self.tok, rollout.step_seed(self.cfg.batch.seed, index),
                                     per_rank=self.per_rank, routing=record)
        return {x.row: x for x in samples}, self._reduce(rollout.statistics(samples))

    def _served_rollout(self, step: int, chosen: list, s: RolloutSettings) -> list:
        """The whole global batch sampled by the engines (rank 0 asks, every rank gets it)."""
        import torch.distributed as dist


        n, rows = s.n_samples_per_prompt, list(range(s.global_batch_size))
        box: list = [None]
        if self.engine is not None:
            try:
                box = [rollout.sample_served(self.engine, [self.prompts.prompts[chosen[g // n]]
                                                           for g in rows], rows, s, self.tok,
                                             weight_version=self.synced_step)]
            except sglang_client.Interrupted as e:
                box = [("StepInterrupted", f"{e}, during the rollout of step {step + 1}")]
            except sglang_client.EngineError as e:
                box = [("EngineError", f"step {step + 1} rollout: {e}")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], tuple):  # every rank alike: a signal saves as the trainer does

            kind, message = box[0]
            raise (StepInterrupted if kind == "StepInterrupted" else sglang_client.EngineError)(message)
        return box[0]

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums over data-parallel ranks when each rank sampled only its own rows."""
        if not self.per_rank:
            return sums
        import torch.distributed as dist
        from megatron.core import parallel_state

        t = sums.to(_device())
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return t.cpu()

    def _teacher_logprobs(self, batch: dict) -> torch.Tensor:
        """The teacher's log-probs of `batch`'s labels, [b, s]. A Megatron teacher's forward
        is a collective of the tensor-parallel group (each rank holds a shard); any other is
        asked once per data-parallel group's rows: tensor-parallel rank 0 scores and sends
        the result to the rest of its group."""
        import torch.distributed as dist
        from megatron.core import parallel_state


        def score() -> torch.Tensor:
            return self.teacher.token_logprobs(
                batch["tokens"], batch["position_ids"], batch["lengths"], batch["labels"],
                temperature=self.settings.rollout.temperature,
                vocab_size=self.tok.vocab_size).float().cpu()

        if self.tp == 1 or isinstance(self.teacher, MegatronTeacher):
            return score()
        group = parallel_state.get_tensor_model_parallel_group()
        box = [score() if parallel_state.get_tensor_model_parallel_rank() == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    # ------------------------------------------------------------------ the loss
    def _forward_step(self, data_iterator, model):
        from megatron_ext import trainer as trainer_module  # Megatron-Core: opd --help stays light

        batch = trainer_module.to_device(next(data_iterator))
        # Right padding routes through the MoE layers too: kept out of the router's load-balancing
        # and z-losses, so the padding a layout adds (multiples of TP) changes nothing.
        padding = batch["position_ids"] >= batch["lengths"][:, None]
        with self._replaying(batch):
            output = model(batch["tokens"], batch["position_ids"], None, padding_mask=padding)
        teacher = None
        if self.settings.full_vocab:
            t0 = _now()
            teacher = self.teacher.logits(batch["tokens"], batch["position_ids"], batch["lengths"])
            self._teacher_seconds += _now() - t0
        return output, partial(self._loss, batch, teacher)

    def _loss(self, batch: dict, teacher, output: torch.Tensor):
        """The micro-batch's sum of weight x per-token loss and its response-token count (the
        trainer divides by the global batch's: losses.py, "Reduction"), and the reports."""
        s = self.settings
        T, vocab = s.rollout.temperature, self.tok.vocab_size
        rows = (batch["loss_mask"].reshape(-1) > 0).nonzero().squeeze(-1)
        labels = batch["labels"]
        chunk = self.opts.chunk_tokens

        def at(key: str):
            return batch[key].reshape(-1)[rows].to(output.device) if key in batch else None

        student, entropy = losses.selected_logprobs(
            output, labels, rows, temperature=T, vocab_size=vocab, vocab_parallel=self.tp > 1,
            chunk_tokens=chunk, with_entropy=True)
        old, sampler = at("old_logprobs"), at("rollout_logprobs")
        clipfrac = torch.zeros_like(student)
        if teacher is None:
            teacher_lp = at("teacher_logprobs")
            per_token, info = s.policy.per_token(student, teacher_lp, old, sampler)
            clipfrac = info["clipfrac"]
        else:
            logits, parallel = teacher
            with torch.no_grad():
                teacher_lp = losses.selected_logprobs(logits, labels, rows, temperature=T,
                                                      vocab_size=vocab, vocab_parallel=parallel,
                                                      chunk_tokens=chunk)
            per_token = s.kl_coef * losses.full_vocab_divergence(
                output.reshape(-1, output.shape[-1]), logits.reshape(-1, logits.shape[-1]),
                rows=rows, opd_loss=s.opd_loss, beta=s.beta, temperature=T, vocab_size=vocab,
                student_parallel=self.tp > 1, teacher_parallel=parallel,
                chunk_tokens=chunk)
        if s.entropy_coef:
            per_token = per_token - s.entropy_coef * entropy
        weighted = per_token * at("loss_weights")
        n = float(rows.numel())
        current = student.detach()
        # The sampler's log-probs against the trainer's for the policy that sampled (slime's
        # train_rollout_logprob_abs_diff): the old log-probs, or the current ones at one step
        # per rollout.
        trainer_lp = current if old is None else old

        def report(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.detach().float().sum(), torch.tensor(n, device=x.device)])

        reports = {
            "opd loss": report(weighted),
            "reverse kl": report(current - teacher_lp),
            "student logprob": report(current),
            "teacher logprob": report(teacher_lp),
            "logprob diff": report((trainer_lp - sampler).abs()),
            "entropy": report(entropy),
            "clipfrac": report(clipfrac),
        }
        return weighted.sum(), torch.tensor(int(n), dtype=torch.int, device=output.device), reports

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer, step: int) -> dict:
        """Held-out reverse KL to the teacher of step `step`'s phase (and the assistant loss if
        asked), after that step."""
        return self._evaluate(trainer, self.opts.cascade.phase_index(step), step + 1)

    def _evaluate(self, trainer, index: int, iteration: int) -> dict:
        if self.replay is not None:
            self.replay.off()
        self._ensure_teacher(trainer, index)
        self.settings = self.opts.phase_settings(index)
        results = self.heldout(trainer)
        if self.opts.eval_assistant_data is not None:
            results.update(self.assistant_loss(trainer))
        results["heldout/phase"] = index + 1
        phase = self.opts.cascade.phases[index]
        trainer.log(f"held-out (iteration {iteration}, teacher {phase.name}): reverse KL "
                    f"{results['heldout/reverse_kl']:.4f}, response length "
                    f"{results['heldout/response_length']:.1f}, stop rate "
                    f"{results['heldout/stop_rate']:.2f}"
                    + "".join(f", assistant loss {v:.4f}" for k, v in results.items()
                              if k.startswith("validation/lm_loss/")))
        return results

    def heldout(self, trainer) -> dict:
        """One sample per held-out prompt (fixed seed) from the student, scored by student and
        teacher over the whole vocabulary: exact per-token KL(p_student || p_teacher)."""
        s = dataclasses.replace(self.settings.rollout, n_samples_per_prompt=1)
        subset = self.eval_set.fixed_subset(self.opts.eval_prompts)
        dp, rank = trainer.dp_size, trainer.dp_rank
        if self.per_rank:
            subset = subset[:len(subset) - len(subset) % dp] or subset[:1] * dp
            rows = list(range(rank, len(subset), dp))
        else:
            rows = list(range(len(subset)))
        with self._recording(trainer):
            samples = rollout.sample(trainer.model, [self.eval_set.prompts[subset[g]] for g in rows],
                                     rows, s, self.tok,
                                     rollout.step_seed(self.cfg.batch.seed, EVAL_STREAM),
                                     per_rank=self.per_rank)
            sums = torch.zeros(6, dtype=torch.float64)
            mbs = self.cfg.batch.micro_batch_size
            model = trainer.model[0]
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for i in range(0, len(samples), mbs):
                        sums += self._score_heldout(model, rollout.collate(samples[i:i + mbs],
                                                                           self.tok.pad_id, self.multiple))
            finally:
                model.train(was_training)
        stats = self._reduce(rollout.statistics(samples))
        sums = self._reduce(sums)
        n = max(float(sums[0]), 1.0)
        out = {"heldout/reverse_kl": float(sums[1] if self.teacher.full_logits else sums[2]) / n,
               "heldout/reverse_kl_sampled": float(sums[2]) / n,
               "heldout/student_logprob": float(sums[3]) / n,
               "heldout/teacher_logprob": float(sums[4]) / n}
        out.update(rollout.statistics_dict(stats, "heldout"))
        return out

    def _score_heldout(self, model, batch: dict) -> torch.Tensor:
        """[tokens, exact reverse KL, sampled reverse KL, student lp, teacher lp, 0] sums."""
        from megatron_ext import trainer as trainer_module  # Megatron-Core: opd --help stays light

        batch = trainer_module.to_device(batch)
        T, vocab = self.settings.rollout.temperature, self.tok.vocab_size
        rows = (batch["loss_mask"].reshape(-1) > 0).nonzero().squeeze(-1)
        chunk = self.opts.chunk_tokens
        logits = model(batch["tokens"], batch["position_ids"], None)
        student = losses.selected_logprobs(logits, batch["labels"], rows, temperature=T,
                                           vocab_size=vocab, vocab_parallel=self.tp > 1,
                                           chunk_tokens=chunk)
        exact = torch.zeros((), device=logits.device)
        if self.teacher.full_logits:
            t_logits, parallel = self.teacher.logits(batch["tokens"], batch["position_ids"],
                                                     batch["lengths"])
            teacher = losses.selected_logprobs(t_logits, batch["labels"], rows, temperature=T,
                                               vocab_size=vocab, vocab_parallel=parallel,
                                               chunk_tokens=chunk)
            exact = losses.full_vocab_divergence(
                logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1]),
                rows=rows, opd_loss="rkl", temperature=T, vocab_size=vocab,
                student_parallel=self.tp > 1, teacher_parallel=parallel,
                chunk_tokens=chunk).sum()
        else:
            teacher = self.teacher.token_logprobs(batch["tokens"], batch["position_ids"],
                                                  batch["lengths"], batch["labels"], temperature=T,
                                                  vocab_size=vocab).to(logits.device).reshape(-1)[rows]
        return torch.stack([torch.tensor(float(rows.numel())), exact.double().cpu(),
                            (student - teacher).sum().double().cpu(), student.sum().double().cpu(),
                            teacher.sum().double().cpu(), torch.tensor(0.0, dtype=torch.float64)])

    def assistant_loss(self, trainer) -> dict:
        """Assistant-token loss of the student on held-out chat data (as SFT validates)."""
        from megatron_ext.posttrain.sft import assistant_loss  # Megatron-Core (the trainer)

        return assistant_loss(trainer.model, self._assistant_data(trainer), trainer.dp_rank,
                              trainer.dp_size, self.cfg.batch.micro_batch_size)

    def _assistant_data(self, trainer):
        if self._sft_eval is None:
            from megatron_ext.layer_spec import te_usable  # Megatron-Core, TransformerEngine

            o = self.opts
            opts = SFTDataOptions(valid_data_path=o.eval_assistant_data or None,
                                  tokenizer_type=self.cfg.data.tokenizer_type,
                                  tokenizer_model=self.cfg.data.tokenizer_model,
                                  data_cache_path=self.cfg.data.data_cache_path)
            self._sft_eval = build_sft_data(opts, trainer.tokenizer,
                                            global_batch_size=self.cfg.batch.global_batch_size,
                                            seq_length=self.cfg.batch.seq_length, train_iters=1,
                                            seed=self.cfg.batch.seed, attention_mask=not te_usable())
        return self._sft_eval
