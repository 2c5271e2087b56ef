"""Teachers for on-policy distillation: they score the student's own token ids.

A teacher is named by a path (a cascade phase's `teacher:`), its kind found from what is there:

  megatron   a Megatron checkpoint this stack wrote (a trainer run, tools/import_hf_to_mcore.py,
             tools/upcycle_hf_to_mcore.py): any preset, dense `qwen3` or MoE (e.g. an imported
             Qwen3-30B-A3B). Built as its own frozen model next to the student, under the same
             Megatron parallel state (TP shards and EP experts like the student's), in the
             run's precision, loaded with the checkpoint's resharding; eval mode, no gradients.
             Its router is the one recorded with its checkpoint (inference.loading.recorded_router), not
             the student's router flags, and it never drops tokens.
  hf         a `transformers` causal-LM directory (config.json + weights), loaded with
             AutoModelForCausalLM on every rank (e.g. Qwen3-Next-80B-A3B, which this stack
             cannot build; on a cluster it is served instead, see docs/posttraining.md).
  sglang     `sglang:http://HOST:PORT` (or a bare `http://HOST:PORT`): a served teacher, SGLang
             or tools/serve_teacher.py, scored through SGLang's native /generate API on the
             student's ids (`max_new_tokens` 0, `return_logprob`, `logprob_start_len` 0) by
             megatron_ext/inference/sglang_client.py, which checks every reply (one finite
             log-prob <= 0 per token sent, the ids echoed). One log-prob per token: enough for
             `sampled-rkl`, not for the full-vocabulary losses; SGLang returns prompt log-probs
             at temperature 1, so the rollout temperature must be 1. Its token map is the
             served tokenizer's (/get_model_info: the map itself, or its tokenizer path).

Scoring never re-tokenises text: the teacher gets the student's token ids and returns, at the
rollout temperature and in fp32, log softmax(logits / T) over the real vocabulary (logits cut to
the tokenizer's size, whatever each model pads its embedding table to). Before the first step
the teacher's tokenizer must have the student's token map (same id for every token, special
tokens included); otherwise a one-line error names both tokenizers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.errors import ConfigError, DataConfigError
from megatron_ext.inference.chat import ChatTokenizer
from megatron_ext.inference.sglang_client import ClientOptions, SGLangClient
from megatron_ext.posttrain import losses

log = logging.getLogger(__name__)

KINDS = ("megatron", "hf", "sglang")
SERVED_PREFIX = "sglang:"


@dataclass(frozen=True)
class TeacherSpec:
    """Where a teacher is and how to read its tokenizer (`tokenizer` overrides what the
    checkpoint records: a SentencePiece .model or an HF tokenizer directory)."""

    path: str
    kind: str
    tokenizer: Optional[str] = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.path.rstrip("/")) or self.path


def detect_kind(path: str, where: str) -> str:
    """megatron | hf | sglang, from what `path` holds; a ConfigError naming `where` otherwise."""
    if path.startswith((SERVED_PREFIX, "http://", "https://")):
        return "sglang"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: teacher {path} is not a directory or a served teacher "
                          "(sglang:http://HOST:PORT)")
    if any(os.path.exists(os.path.join(path, f)) for f in
           ("latest_checkpointed_iteration.txt", "marco_model.json", "metadata.json")):
        return "megatron"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ConfigError(f"{where}: teacher {path} is neither a Megatron checkpoint (no "
                      "latest_checkpointed_iteration.txt / marco_model.json) nor a transformers "
                      "directory (no config.json)")


# ------------------------------------------------------------------------------ token maps
def check_token_maps(student: ChatTokenizer, teacher: ChatTokenizer, teacher_label: str) -> None:
    """The teacher scores the student's ids: both tokenizers must map every token to the same
    id, special tokens included. Otherwise one line naming both tokenizers and a token."""
    a, b = student.token_map(), teacher.token_map()
    if a == b:
        return
    by_id = sorted(set(a) | set(b), key=lambda k: (min(a.get(k, 1 << 62), b.get(k, 1 << 62)), k))
    token = next(k for k in by_id if a.get(k) != b.get(k))
    raise ConfigError(
        f"teacher {teacher_label}: its tokenizer {teacher.name} ({len(b)} tokens) and the "
        f"student's tokenizer {student.name} ({len(a)} tokens) differ: {token!r} is "
        f"{b.get(token)} vs {a.get(token)}; on-policy distillation scores the student's token "
        "ids, so both need the same token map")


def teacher_tokenizer(spec: TeacherSpec) -> ChatTokenizer:
    """The teacher's tokenizer: `tokenizer:` if given, else what its checkpoint records (or the
    HF directory itself)."""
    path, kind = spec.tokenizer, None
    if path is None and spec.kind == "megatron":
        from megatron_ext import checkpointing  # Megatron-Core: only for a checkpoint teacher

        info = checkpointing.read_model_info(spec.path).get("tokenizer") or {}
        path, kind = info.get("tokenizer_model"), info.get("tokenizer_type")
        if not path:
            raise ConfigError(f"teacher {spec.path}: its checkpoint records no tokenizer; give "
                              "`tokenizer:` in the cascade file")
    elif path is None:
        path = spec.path
    if kind is None:
        kind = "SentencePieceTokenizer" if path.endswith(".model") else "HuggingFaceTokenizer"
    if not os.path.exists(path):
        raise ConfigError(f"teacher {spec.path}: tokenizer {path} does not exist (give "
                          "`tokenizer:` in the cascade file)")
    try:
        return ChatTokenizer.from_args(kind, path)
    except DataConfigError as e:  # its message names --tokenizer-model, the student's flag
        reason = str(e).split(": ", 1)[-1] if str(e).startswith("--tokenizer-model ") else str(e)
        raise ConfigError(f"teacher {spec.path}: its tokenizer {path}: {reason}") from None


# ------------------------------------------------------------------------------ teachers
class Teacher:
    """Scores rows of token ids. `logits` -> (logits [b, s, V'], vocab_parallel);
    `token_logprobs` -> [b, s] log-probs of `labels` at temperature T over `vocab_size` ids."""

    spec: TeacherSpec
    tokenizer: ChatTokenizer
    full_logits = True  # can give whole-vocabulary logits (full-vocabulary losses)

    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor):
        raise NotImplementedError

    def token_logprobs(self, tokens, position_ids, lengths, labels, *, temperature: float,
                       vocab_size: int) -> torch.Tensor:
        with torch.no_grad():
            logits, parallel = self.logits(tokens, position_ids, lengths)
            flat = losses.selected_logprobs(logits, labels, temperature=temperature,
                                            vocab_size=vocab_size, vocab_parallel=parallel)
            return flat.reshape(labels.shape)

    def close(self) -> None:
        """Release the teacher's memory (a phase switch)."""


class MegatronTeacher(Teacher):
    """A frozen Megatron model of any preset, at the student's parallel layout."""

    def __init__(self, spec: TeacherSpec, options, seq_length: int):
        # Megatron-Core (seconds), imported when a Megatron teacher is built: the module itself
        # is read by opd's parser and by transformers-only teacher runs.
        from megatron_ext import checkpointing
        from megatron_ext.inference.loading import recorded_router
        from megatron_ext.layer_spec import resolve_expert_backend
        from megatron_ext.model import build_model, marco_config
        from megatron_ext.parallel import ParallelLayout

        self.spec = spec
        self.preset = checkpointing.preset_from_checkpoint(spec.path)
        layout = ParallelLayout.current()  # the student's; sequence parallel when TP > 1
        if self.preset.is_moe and self.preset.num_experts % layout.expert:
            raise ConfigError(f"teacher {spec.path}: {self.preset.num_experts} experts do not "
                              f"split over --expert-model-parallel-size {layout.expert}")
        # The student's expert backend where the teacher's shapes allow it, else sequential.
        backend = resolve_expert_backend(options.expert_backend, options.params_dtype, self.preset,
                                         layout.expert_tensor, fall_back=True)
        # The teacher's router as its checkpoint records it, never the student's flags (score
        # function, expert bias, capacity factor); the student's dtype and dispatcher; no FP8
        # (a frozen scorer: bf16 GEMMs take any row count, FP8 ones multiples of 16).
        options = dataclasses.replace(options, expert_backend=backend, fp8_format=None,
                                      moe=recorded_router(spec.path, options.moe))
        config = marco_config(self.preset, layout, options, perform_initialization=False)
        model = build_model(self.preset, config, backend,
                            seq_length=max(seq_length, 1), use_te=None)
        checkpointing.load_checkpoint(spec.path, [model], load_rng=False)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()
        self.tokenizer = teacher_tokenizer(spec)
        self.vocab_parallel = layout.tensor > 1

    def logits(self, tokens, position_ids, lengths):
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(tokens.to(device), position_ids.to(device), None)
        return out, self.vocab_parallel

    def close(self) -> None:
        self.model = None


class HFTeacher(Teacher):
    """A transformers causal LM (AutoModelForCausalLM), every rank holding all of it."""

    def __init__(self, spec: TeacherSpec, params_dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=params_dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"teacher {spec.path}: transformers cannot load it "
                              f"({str(e).splitlines()[0]})") from None
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = teacher_tokenizer(spec)

    def logits(self, tokens, position_ids, lengths):
        device = next(self.model.parameters()).device
        s = tokens.shape[1]
        mask = (torch.arange(s)[None, :] < lengths[:, None].cpu()).to(device=device, dtype=torch.long)
        with torch.no_grad():
            out = self.model(input_ids=tokens.to(device), attention_mask=mask,
                             position_ids=position_ids.to(device), use_cache=False)
        return out.logits, False

    def close(self) -> None:
        self.model = None


def served_url(path: str) -> str:
    """The URL of a served teacher's path (`sglang:URL` or a bare URL)."""
    return path[len(SERVED_PREFIX):] if path.startswith(SERVED_PREFIX) else path


class ServedTeacher(Teacher):
    """A teacher behind SGLang's native API (SGLang or tools/serve_teacher.py): the student's
    rows are scored with `max_new_tokens` 0, each token's log-prob given the ones before it."""

    full_logits = False

    def __init__(self, spec: TeacherSpec, client_options=None, should_stop=None):
        self.spec = spec
        self.url = served_url(spec.path)
        opts = client_options or ClientOptions(urls=(self.url,))
        self.client = SGLangClient(dataclasses.replace(opts, urls=(self.url,)), what="teacher",
                                   should_stop=should_stop)
        self.remote = self.client.model_info()[0]
        self.tokenizer = served_tokenizer(self.remote, spec, self.url)

    def logits(self, tokens, position_ids, lengths):
        raise ConfigError(f"teacher {self.spec.path}: a served teacher returns per-token log-probs "
                          "only; the full-vocabulary losses (rkl, fkl, jsd) need an in-process "
                          "teacher (use --opd-loss sampled-rkl)")

    def token_logprobs(self, tokens, position_ids, lengths, labels, *, temperature, vocab_size):
        if temperature != 1.0:
            raise ConfigError(f"teacher {self.spec.path}: SGLang returns prompt log-probs at "
                              f"temperature 1; the rollout temperature is {temperature:g}")
        rows = [tokens[i, :int(n)].tolist() for i, n in enumerate(lengths)]
        scores = self.client.score(rows)
        result = torch.zeros(tokens.shape, dtype=torch.float32)
        for i, lp in enumerate(scores):
            result[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return result


class _RemoteTokenizer:
    """A token map a server reports (its /get_model_info), for the token-map check."""

    def __init__(self, token_map: dict, name: str):
        self.name = name
        self._map = {str(k): int(v) for k, v in token_map.items()}
        self.vocab_size = len(self._map)

    def token_map(self) -> dict[str, int]:
        return dict(self._map)


def served_tokenizer(info: dict, spec: TeacherSpec, url: str):
    """The served model's tokenizer: the token map it reports, else the tokenizer at the path it
    reports (a shared filesystem), else the cascade's `tokenizer:`; otherwise one line."""
    if isinstance(info.get("token_map"), dict):
        return _RemoteTokenizer(info["token_map"], f"{info.get('tokenizer_path', '?')} (served at {url})")
    path = spec.tokenizer or info.get("tokenizer_path")
    if isinstance(path, str) and os.path.exists(path):
        return teacher_tokenizer(dataclasses.replace(spec, tokenizer=path))
    raise ConfigError(f"teacher {spec.path}: the server reports tokenizer_path {path!r}, not "
                      "readable here; give `tokenizer:` in the cascade file (the served "
                      "tokenizer, for the token-map check)")


def load_teacher(spec: TeacherSpec, *, student_tokenizer: ChatTokenizer, options,
                 seq_length: int, client_options=None, should_stop=None) -> Teacher:
    """Build a phase's teacher and check it against the student: token map, vocabulary."""
    if spec.kind == "megatron":
        teacher = MegatronTeacher(spec, options, seq_length)
        size = teacher.preset.vocab_size
    elif spec.kind == "hf":
        teacher = HFTeacher(spec, options.params_dtype)
        size = teacher.model.get_output_embeddings().weight.shape[0]
    elif spec.kind == "sglang":
        teacher = ServedTeacher(spec, client_options, should_stop)
        size = int(teacher.remote.get("vocab_size") or student_tokenizer.vocab_size)
    else:
        raise ConfigError(f"teacher {spec.path}: unknown kind {spec.kind!r} ({', '.join(KINDS)})")
    check_token_maps(student_tokenizer, teacher.tokenizer, spec.label)
    if size < student_tokenizer.vocab_size:
        raise ConfigError(f"teacher {spec.path}: {size} output rows, fewer than the tokenizer's "
                          f"{student_tokenizer.vocab_size} tokens")
    log.info(f"teacher {spec.label}: {spec.kind} model {spec.path}, tokenizer "
             f"{teacher.tokenizer.name} (token map equal to the student's)")
    return teacher
