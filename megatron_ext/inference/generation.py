"""Generation with a Megatron GPTModel: batched, KV-cached sampling at the model's parallel layout.

Serves the CLI (tools/generate.py), evaluation, and the rollouts of on-policy distillation
(n samples per prompt at temperature 1, whose log-probs are compared with the trainer's).

Design.
- One loop of our own; the model is Megatron-Core's, untouched. Megatron-Core 0.16's inference
  engines and controllers assume CUDA, but the KV cache they drive lives in `Attention`
  itself: given a `StaticInferenceContext`, each attention layer allocates a
  [max_seq, batch, kv_heads, head_dim] key and value buffer once, writes the new keys/values at
  `sequence_len_offset`, attends over everything cached so far, and slices RoPE at the same
  offset. That path is plain PyTorch and runs on CPU (with our non-TE spec and cpu_compat) and
  on GPU alike, so we use it: static buffers, no per-step reallocation, no re-run of the prompt.
- Batches of prompts of different lengths are LEFT-padded to the longest (P tokens), so every
  row's next token is read off the same last column and all rows decode in lockstep. Padding
  is masked out of attention with an explicit boolean mask (True = masked): causal plus padded
  keys in the prefill, padded keys in each decode step. A padding query attends to itself
  only, so no softmax row is empty (an all-masked row gives NaN, and 0 * NaN poisons
  the real rows through the values). Megatron applies RoPE by cache position, not by
  `position_ids`, so a row with k padding tokens sits k positions to the right; RoPE scores
  depend on relative positions only, so this changes nothing but rounding (cached decoding
  equals a full unpadded recompute to ~1e-6, tested).
- The prefill computes logits for the last column only (`materialize_only_last_token_logits`);
  each decode step feeds one token per row. Rows that finish (a stop token, or their own
  budget) are dropped from the batch and from the cache buffers once a quarter of the rows are
  done, so long tails do not pay for finished rows.
- Sampling: logits in fp32, cut to `vocab_size` (the tokenizer's real vocabulary; embedding
  tables are padded); greedy = argmax; otherwise logits / T, then top-k, then top-p (the
  `transformers` warpers' semantics), then inverse-CDF sampling with one uniform per row per
  step from a generator seeded by (seed, prompt index): a prompt's samples do not depend on
  what else is in the batch, and n copies of one prompt draw n different samples. The reported
  log-prob is log softmax(logits / T) of the chosen token before truncation (T = 1 for greedy).
- Parallel layouts: logits are gathered over TP by the output layer (`runtime_gather_output`),
  so every rank holds the full vocabulary. Global rank 0 chooses the tokens and broadcasts
  (ids, log-probs) to all ranks each step, so every rank gets the same result even where the
  ranks' logits differ in the last bit (expert parallelism batches tokens differently per
  rank), and all ranks run the same number of forward steps (the MoE all-to-alls need that).
  Every rank must be called with the same prompts and parameters (checked: a digest is
  compared across ranks, so a mismatch is an error, never a hang). Sequence parallelism (TP > 1)
  is switched off for the duration of generation, as Megatron's own static engine does: a decode
  step's one token cannot be split over TP ranks; the MoE layers then route every TP rank's full
  sequence, which is the same computation replicated. Pipeline parallelism is refused.
- MoE in eval mode routes as in training (top-k over the router's fp32 scores; no aux/z-loss
  under no_grad) but never drops tokens: Megatron-Core applies --moe-expert-capacity-factor
  whether or not the model trains, and a 16-row decode step would get a capacity of one token
  per expert, so rollouts would not come from the trained policy. `dropless` lifts the capacity
  factor (the config's and the token dispatchers' copies) while generating and scoring.
- Padding on the TE spec: TransformerEngine's attention ignores the mask for the `causal` and
  `no_mask` types that Megatron passes, so while generating each TE core attention gets the
  padding as TE reads it (`te_padding_masks`: `padding_causal` prefill, `padding` decode steps);
  tested on CPU against an attention with TE's documented mask semantics.
- An FP8 student (--fp8-format) generates in bf16 (`without_fp8`): decode steps feed token
  counts that are not multiples of 16, which TE's FP8 GEMMs refuse. Its rollout log-probs are
  then bf16 ones; the training forward that the loss uses stays in FP8.
- Megatron-Core's modules run as built, with the shortcuts of decode_shortcuts.py while
  generating: at TP = 1 the linears and router gating skip their TP-aware autograd
  `Function`s, and each cached key is rotated once. Logits are bit-identical (tested); a
  small model's decode step is mostly such per-call overhead.
- `torch.no_grad` by default; `inference_mode=True` (the CLI, benchmarks) runs under
  `torch.inference_mode`, about 8% faster per decode step on CPU (no autograd bookkeeping per
  op). Not the default because state a forward creates lazily and keeps (TransformerEngine's
  lazily made buffers on GPU) would be inference tensors, unusable by a later training step of
  the same model (on-policy distillation alternates the two). After an inference-mode call the
  lru caches of the model's modules are cleared (Megatron's RoPE table), so no inference
  tensor of ours outlives the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from megatron_ext import cpu_compat
from megatron_ext.errors import LayoutError, UsageError
from megatron_ext.inference.decode_shortcuts import RopeOnce, Tp1Shortcuts

# Rows are dropped from the cache when at least this share of the current batch has finished.
COMPACT_SHARE = 0.25


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # up to and including the first stop token; nothing after it
    logprobs: list[float]  # per output token: log softmax(logits / T) of the chosen token
    #                        (T = 1 for greedy), before top-k/top-p truncation, in fp32
    finish_reason: str  # "stop" | "length"


def generate(model, prompts: list[list[int]], params: SamplingParams, *, seed: int = 0,
             batch_size: int | None = None, vocab_size: int | None = None,
             use_cache: bool = True,
             on_batch: Optional[Callable[[int], None]] = None,
             indices: Optional[list[int]] = None, per_rank: bool = False,
             inference_mode: bool = False, routing=None) -> list[Generation]:
    """Continue each prompt (a list of token ids). `model`: a Megatron GPTModel, or a list of
    one model chunk, possibly wrapped (DDP, Float16Module), at the current parallel layout;
    every rank calls this with the same arguments and gets the same result. `batch_size`
    prompts are decoded together (all at once when None), longest first. `vocab_size`: cut the
    logits to the tokenizer's real vocabulary. `use_cache=False` recomputes the whole sequence
    at every step (the reference the KV cache is tested against). `on_batch(n)` is called
    after each batch of n prompts (progress bars). `inference_mode=True`: faster, for a model
    that will not train afterwards (module docstring). `indices[i]`: the sampling stream of prompt
    i (default i), so a prompt's samples do not depend on which call or rank decodes it.

    `per_rank=True` (only where `per_rank_supported(model)`): each data-parallel rank passes
    its own prompts (ranks of one tensor-parallel group the same ones, any number per rank) and
    gets its own results; the ranks decode in lockstep (every rank runs the same number of
    forward passes, idle ones a one-token dummy), which the MoE all-to-alls across
    data-parallel ranks need.

    `routing`: a routing_replay.Recording, told after each cached forward pass which rows (by
    `indices`) and prompt lengths it ran (`prefill`) or which rows got one more token
    (`decode`), while the model's routers record (OPD's --routing-replay)."""
    gpt = _unwrap(model)
    if routing is not None and not use_cache:
        raise UsageError("generate: routing is recorded on the KV-cached path only")
    vocab = _check_vocab(gpt, vocab_size)
    prompts = _check_prompts(prompts, gpt, params, vocab)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise UsageError(f"generate: {len(indices)} indices for {len(prompts)} prompts")
    lockstep = None
    if per_rank and _world()[1] > 1:
        if not per_rank_supported(gpt):
            raise LayoutError("generate(per_rank=True): the MoE all-gather dispatcher with expert "
                              "parallelism needs equal token counts on every rank; use "
                              "--moe-token-dispatcher-type alltoall or generate on every rank")
        lockstep = _Lockstep()
    _check_same_on_all_ranks(prompts, params, seed, batch_size, vocab, indices, per_rank=lockstep is not None)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable
    size = batch_size or max(1, len(prompts))
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    count = lockstep.most(len(batches)) if lockstep else len(batches)
    results: list[Optional[Generation]] = [None] * len(prompts)
    with _inference_layout(gpt), _without_autograd(gpt, inference_mode), Tp1Shortcuts(gpt):
        for k in range(count):
            if k >= len(batches):  # this rank has no batch k: keep the others company
                lockstep.idle(gpt)
                continue
            rows = batches[k]
            batch = _generate_batch(gpt, [prompts[i] for i in rows], [indices[i] for i in rows],
                                    params, seed, vocab, use_cache, lockstep, routing)
            for i, g in zip(rows, batch):
                results[i] = g
            if on_batch is not None:
                on_batch(len(rows))
    if torch.cuda.is_available():  # the KV caches go back before a training forward (OPD)
        torch.cuda.empty_cache()
    return results


def per_rank_supported(model) -> bool:
    """Whether data-parallel ranks may decode different prompts (`generate(per_rank=True)`):
    the only collectives of the forward that span data-parallel ranks are the MoE token
    dispatcher's, and the all-to-all one takes any token count per rank; the all-gather one
    (expert parallelism with --moe-token-dispatcher-type allgather), or expert tensor
    parallelism wider than tensor parallelism, needs equal counts."""
    config = _unwrap(model).config
    if not getattr(config, "num_moe_experts", None):
        return True
    ep = config.expert_model_parallel_size
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    if etp > config.tensor_model_parallel_size:
        return False
    return ep == 1 or config.moe_token_dispatcher_type == "alltoall"


# ------------------------------------------------------------------------------ checks
def _unwrap(model):
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise LayoutError(f"generation takes one model chunk, got {len(model)} "
                              "(virtual pipeline stages are not supported)")
        model = model[0]
    if parallel_state.model_parallel_is_initialized():
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp > 1:
            raise LayoutError(f"generation needs --pipeline-model-parallel-size 1, got {pp}; "
                              "load the checkpoint at PP=1 (checkpoints reshard)")
    gpt = unwrap_model(model)
    if not (getattr(gpt, "pre_process", True) and getattr(gpt, "post_process", True)):
        raise LayoutError("generation needs the whole model on this rank (no pipeline stages)")
    return gpt


def _check_vocab(gpt, vocab_size: int | None) -> int:
    if vocab_size is None:
        return gpt.vocab_size
    if not 0 < vocab_size <= gpt.vocab_size:
        raise UsageError(f"vocab_size {vocab_size}: must be in [1, {gpt.vocab_size}] "
                         "(the model's vocabulary)")
    return vocab_size


def _check_prompts(prompts, gpt, params: SamplingParams, vocab: int) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)):
        raise UsageError("prompts must be a list of token-id lists")
    out = []
    limit = getattr(gpt, "max_sequence_length", None)
    for n, p in enumerate(prompts):
        ids = [int(i) for i in p]
        if not ids:
            raise UsageError(f"prompt {n} is empty; a prompt needs at least one token")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"prompt {n}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if limit and len(ids) + params.max_new_tokens > limit:
            raise UsageError(f"prompt {n}: {len(ids)} tokens + --max-new-tokens "
                             f"{params.max_new_tokens} exceed the model's {limit} positions")
        out.append(ids)
    return out


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_on_all_ranks(prompts, params, seed, batch_size, vocab, indices,
                             per_rank: bool = False) -> None:
    """Every rank must decode the same batches (the forward steps hold collectives); with
    `per_rank`, the same parameters everywhere and the same prompts within a tensor-parallel
    group (the ranks that share data)."""
    if _world()[1] == 1:
        return
    settings = [params.__dict__, seed, batch_size, vocab]
    if per_rank:
        from megatron.core import parallel_state

        _agree(settings, None, "sampling parameters")
        _agree([prompts, indices], parallel_state.get_tensor_model_parallel_group(),
               "prompts (ranks of one tensor-parallel group)")
    else:
        _agree([prompts, indices, *settings], None, "prompts or sampling parameters")


def _agree(value, group, what: str) -> None:
    import torch.distributed as dist

    text = json.dumps(value, sort_keys=True)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if t[0].item() != -t[1].item():
        raise UsageError(f"generate: the ranks were given different {what}; every rank must "
                         "pass the same ones")


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------ layout
_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def _inference_layout(gpt):
    """Eval mode and no sequence parallelism while generating; the training state after."""
    was_training = gpt.training
    config = gpt.config
    switched = []
    sequence_parallel = config.sequence_parallel
    if sequence_parallel:
        for module in gpt.modules():
            for attr in _SP_ATTRS:
                if getattr(module, attr, None) is True:
                    setattr(module, attr, False)
                    switched.append((module, attr))
        config.sequence_parallel = False
    gpt.eval()
    try:
        with _without_cpu_device_mode(), dropless(gpt), without_fp8(gpt), te_padding_masks(gpt):
            yield
    finally:
        for module, attr in switched:
            setattr(module, attr, True)
        config.sequence_parallel = sequence_parallel
        gpt.train(was_training)


# What Megatron-Core 0.16 reads to drop tokens: the config's fields, and the copies the token
# dispatchers take at construction (alltoall: drop_and_pad; flex: its manager's capacity_factor).
_DROP_FIELDS = {"moe_expert_capacity_factor": None, "moe_pad_expert_input_to_capacity": False}
_DROP_ATTRS = {"drop_and_pad": False, "capacity_factor": None}


def dropless(model):
    """No token dropping inside the block (generation, scoring): the capacity factor and
    padding to capacity are lifted from `model`'s config and its dispatchers, then restored."""
    targets = [(model.config, _DROP_FIELDS)] if getattr(model, "config", None) is not None else []
    for module in model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        for obj in (dispatcher, getattr(dispatcher, "_comm_manager", None)):
            if obj is not None:
                targets.append((obj, _DROP_ATTRS))
    return _lifted(targets)


def without_fp8(model):
    """No FP8 autocast inside the block: an FP8 student decodes in its parameters' dtype (bf16).
    A decode step feeds TE's FP8 GEMMs a token count (the rows still decoding) that is not a
    multiple of 16, which they refuse; the weights are bf16 (FP8 is applied per GEMM), so
    leaving FP8 out is exact bf16 arithmetic, not a different model."""
    config = getattr(model, "config", None)
    return _lifted([(config, {"fp8": None})] if config is not None else [])


@contextlib.contextmanager
def te_padding_masks(model):
    """TransformerEngine's attention reads a mask only for the padding and arbitrary mask types:
    with the spec's `causal` (the prefill) and the `no_mask` Megatron switches to while decoding
    it would attend to the left padding. Inside the block, every core attention that is not our
    SDPAttention gets the padding in TE's terms (`te_mask_call`); where no mask is passed
    nothing changes."""
    # Megatron-Core, imported where a model exists: importing generation stays light.
    from megatron.core.transformer.attention import Attention

    from megatron_ext.attention import SDPAttention

    handles = [m.core_attention.register_forward_pre_hook(te_mask_call, with_kwargs=True)
               for m in model.modules()
               if isinstance(m, Attention) and not isinstance(m.core_attention, SDPAttention)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def te_mask_call(module, args, kwargs):
    """(args, kwargs) of a core-attention call with generation's boolean mask (True = masked;
    [b, 1, s_q, s_kv], causal + padded keys) recast as TE takes padding: prefill (s_q = s_kv)
    `padding_causal` with the [b, 1, 1, s] padded positions, one mask for queries and keys;
    a decode step `padding` with (no padded query, the [b, 1, 1, s_kv] padded keys). The last
    query is a real token in every left-padded row and sees every key but the padding, so its
    mask row is the padding of the keys."""
    from megatron.core.transformer.enums import AttnMaskType

    args = list(args)
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    if mask is None:
        return None
    query, key = args[0], args[1]  # [s, b, heads, d]
    kv_pad = mask[:, :, -1:, :]
    if query.shape[0] == key.shape[0]:
        mask, kind = kv_pad, AttnMaskType.padding_causal
    else:
        q_pad = torch.zeros(kv_pad.shape[0], 1, 1, query.shape[0], dtype=torch.bool,
                            device=kv_pad.device)
        mask, kind = (q_pad, kv_pad), AttnMaskType.padding
    if len(args) > 3:
        args[3] = mask
    else:
        kwargs["attention_mask"] = mask
    kwargs["attn_mask_type"] = kind
    return tuple(args), kwargs


@contextlib.contextmanager
def _lifted(targets):
    """Set each (obj, {attribute: value}) for the block where obj has the attribute and differs;
    put the old values back after."""
    saved = []
    for obj, fields in targets:
        for name, off in fields.items():
            if name in vars(obj) and getattr(obj, name) != off:
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, off)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _without_autograd(gpt, inference_mode: bool):
    if not inference_mode:
        with torch.no_grad():
            yield
        return
    try:
        with torch.inference_mode():
            yield
    finally:  # no inference tensor stays in a module's cache (RoPE's table)
        for cls in {type(m) for m in gpt.modules()}:
            clear = getattr(cls.forward, "cache_clear", None)
            if clear is not None:
                clear()


@contextlib.contextmanager
def _without_cpu_device_mode():
    """On a CPU-only machine cpu_compat keeps a TorchFunctionMode active that rewrites
    device="cuda" requests to the CPU; it costs a Python call per torch call, a fifth of a
    small model's decode step. The inference forward makes no such request (the KV buffers
    and router state are created with torch.cuda.current_device(), which cpu_compat answers
    as "cpu" without the mode), so the mode is lifted while generating."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily


    mode = getattr(cpu_compat, "_CudaToCpuMode", None)
    stack = _get_current_function_mode_stack()
    if mode is not None and stack and isinstance(stack[-1], mode):
        with _pop_mode_temporarily():
            yield
    else:
        yield


class _Lockstep:
    """Data-parallel ranks decoding different prompts agree, after every forward pass, whether
    anyone needs another; a rank with nothing left runs a one-token dummy forward meanwhile, so
    every rank runs the same number of forward passes (MoE all-to-alls are collective)."""

    def most(self, n: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def more(self, mine: bool) -> bool:
        """True on every rank iff some rank needs another forward pass (collective)."""
        return self.most(int(mine)) > 0

    def idle(self, gpt) -> None:
        """Dummy forward passes until no rank needs another."""
        device = next(gpt.parameters()).device
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        while True:
            gpt(token, token, None)
            if not self.more(False):
                return


# ------------------------------------------------------------------------------ decoding
def attention_mask(pad: torch.Tensor, q_len: int) -> Optional[torch.Tensor]:
    """Megatron's boolean mask (True = masked) for the last `q_len` of the pad.shape[1] key
    positions: causal (bottom-right aligned) and padded keys masked; a padding query sees
    itself. None when nothing is padded and q_len is 1 or the whole sequence (plain causal)."""
    b, s = pad.shape
    if not bool(pad.any()):
        return None
    q_pos = torch.arange(s - q_len, s, device=pad.device)[:, None]
    k_pos = torch.arange(s, device=pad.device)[None, :]
    mask = (k_pos > q_pos)[None, None] | pad[:, None, None, :]
    return mask & ~(k_pos == q_pos)[None, None]


class _CachedSteps:
    """Prefill once, then one token per row per step, with Megatron's static KV cache.

    The cache buffers are ours, handed to Megatron before the first forward (it allocates only
    for layers it does not find): [max_len, batch, kv_heads, head_dim] as Megatron indexes
    them, but laid out [batch, kv_heads, max_len, head_dim] in memory, so that each head's keys
    and values are contiguous rows, as SDPA wants them (on Megatron's own layout CPU SDPA runs
    about 3x slower at 700 cached tokens)."""

    def __init__(self, gpt, batch: int, max_len: int, pad: torch.Tensor):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.gpt = gpt
        self.ctx = StaticInferenceContext(batch, max_len)
        self.ctx.materialize_only_last_token_logits = True
        self.buffers = _allocate_cache(gpt, batch, max_len)  # layer -> (key, value) [b, g, s, d]
        self._hand_over()
        self.rope = RopeOnce(self)
        self.pad = pad  # [rows in the cache, max_len] True = padding
        self.padded = bool(pad.any())

    def _hand_over(self) -> None:
        self.ctx.key_value_memory_dict.update(
            {layer: (k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)) for layer, (k, v) in self.buffers.items()})

    def _forward(self, tokens: torch.Tensor, mask) -> torch.Tensor:
        offset = self.ctx.sequence_len_offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        with self.rope:
            logits = self.gpt(tokens, positions.expand_as(tokens), mask,
                              inference_context=self.ctx, runtime_gather_output=True)
        self.ctx.sequence_len_offset += tokens.shape[1]
        return logits[:, -1].float()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ctx.enable_prefill_mode()
        logits = self._forward(tokens, attention_mask(self.pad[:, :tokens.shape[1]], tokens.shape[1]))
        self.ctx.enable_decode_mode()
        return logits

    def decode(self, last: torch.Tensor) -> torch.Tensor:
        end = self.ctx.sequence_len_offset + 1
        # One query per row: the mask is the padded keys (attention_mask(pad, 1), made cheaply).
        mask = self.pad[:, None, None, :end] if self.padded else None
        return self._forward(last[:, None], mask)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch) in the cache: moved to the
        front of the same buffers, one layer at a time, so the step needs one layer's kept rows
        beside the cache, not a second cache (16 rows x 10k tokens: 17.5 GiB of cache; a copy
        of its kept rows was 13 GiB more at the first compaction)."""
        n = rows.numel()
        for k, v in self.buffers.values():
            for buf in (k, v):
                buf[:n] = buf.index_select(0, rows)
        self.buffers = {layer: (k[:n], v[:n]) for layer, (k, v) in self.buffers.items()}
        self._hand_over()
        self.pad = self.pad.index_select(0, rows)
        self.padded = bool(self.pad.any())


def _allocate_cache(gpt, batch: int, max_len: int) -> dict:
    """{layer_number: (key, value)} buffers [batch, kv_heads, max_len, head_dim] for each
    attention layer of `gpt`, in its parameters' dtype and device."""
    from megatron.core.transformer.attention import Attention

    buffers = {}
    for module in gpt.modules():
        if isinstance(module, Attention):
            param = next(module.parameters())
            dtype = param.dtype if param.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                else gpt.config.params_dtype  # (FP8 weights: activations in the params dtype)
            shape = (batch, module.num_query_groups_per_partition, max_len)
            buffers[module.layer_number] = tuple(
                torch.empty(*shape, dim, dtype=dtype, device=param.device)
                for dim in (module.key_hidden_size, module.val_hidden_size))
    return buffers


class _RecomputeSteps:
    """No cache: the whole sequence so far at every step (the reference for the cache)."""

    def __init__(self, gpt, pad: torch.Tensor):
        self.gpt, self.pad = gpt, pad
        self.tokens = None

    def _forward(self) -> torch.Tensor:
        s = self.tokens.shape[1]
        positions = torch.arange(s, device=self.tokens.device).expand_as(self.tokens)
        mask = attention_mask(self.pad[:, :s], s)
        return self.gpt(self.tokens, positions, mask, runtime_gather_output=True)[:, -1].float()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens
        return self._forward()

    def decode(self, last: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, last[:, None]], dim=1)
        return self._forward()

    def keep(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)
        self.pad = self.pad.index_select(0, rows)


def _generate_batch(gpt, prompts, indices, params: SamplingParams, seed: int, vocab: int,
                    use_cache: bool, lockstep: Optional[_Lockstep] = None,
                    routing=None) -> list[Generation]:
    device = next(gpt.parameters()).device
    b, longest = len(prompts), max(len(p) for p in prompts)
    max_len = longest + params.max_new_tokens
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    pad = torch.zeros(b, max_len, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        tokens[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        pad[r, :longest - len(p)] = True
    steps = _CachedSteps(gpt, b, max_len, pad) if use_cache else _RecomputeSteps(gpt, pad)
    chooser = _Chooser(params, seed, indices, vocab, per_rank=lockstep is not None)
    stop = set(params.stop_ids)
    outputs: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    active = list(range(b))  # batch rows still decoding, in cache order
    logits = steps.prefill(tokens)
    if routing is not None:
        routing.prefill(indices, [len(p) for p in prompts])
    for step in range(params.max_new_tokens):
        ids, lps = chooser.choose(logits[:, :vocab], active, step)
        still = []
        for k, (r, i, lp) in enumerate(zip(active, ids.tolist(), lps.tolist())):
            if reasons[r] == "stop":  # stopped earlier, still in the batch until it is compacted
                continue
            outputs[r].append(i)
            logprobs[r].append(lp)
            if i in stop:
                reasons[r] = "stop"
            else:
                still.append(k)
        more = bool(still) and step < params.max_new_tokens - 1
        if lockstep is not None and lockstep.more(more) and not more:
            lockstep.idle(gpt)  # the others go on decoding
        if not more:
            break
        last = ids.to(device)
        if len(active) - len(still) >= COMPACT_SHARE * len(active):
            rows = torch.tensor(still, dtype=torch.long, device=device)
            steps.keep(rows)
            last = last.index_select(0, rows)
            active = [active[k] for k in still]
        logits = steps.decode(last)
        if routing is not None:
            routing.decode([indices[r] for r in active])
    return [Generation(prompt_ids=list(p), output_ids=o, logprobs=lp, finish_reason=f)
            for p, o, lp, f in zip(prompts, outputs, logprobs, reasons)]


# ------------------------------------------------------------------------------ sampling
def _row_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence((seed & (2**63 - 1), index)).generate_state(1, np.uint64)[0]
               & (2**63 - 1))


def filter_logits(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus) on [rows, vocab] scores: removed entries become -inf.
    The semantics of transformers' TopKLogitsWarper / TopPLogitsWarper (ties at the k-th
    value kept; the smallest set whose probability reaches top_p, at least one token)."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return scores


class _Chooser:
    """Chooses each row's next token on one rank and broadcasts it (ids, log-probs): global
    rank 0 to all ranks, or with `per_rank` the first rank of each tensor-parallel group to
    that group. Row r's t-th token uses the t-th uniform of the generator seeded by
    (seed, indices[r]), all drawn up front (one call per row, not per row and step)."""

    def __init__(self, params: SamplingParams, seed: int, indices, vocab: int, per_rank: bool = False):
        self.params = params
        self.rank, self.world = _world()
        self.src, self.group = 0, None
        if per_rank and self.world > 1:
            import torch.distributed as dist
            from megatron.core import parallel_state

            self.group = parallel_state.get_tensor_model_parallel_group()
            self.src = dist.get_global_rank(self.group, 0)
            self.world = dist.get_world_size(self.group)
        self.uniforms = None
        if not params.greedy and self.rank == self.src:
            self.uniforms = torch.stack([
                torch.rand(params.max_new_tokens, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(_row_seed(seed, i)))
                for i in indices])

    def choose(self, logits: torch.Tensor, rows: list[int], step: int = 0):
        """The next token of each of `rows` (batch rows, in `logits` order) at `step`."""
        if self.rank == self.src:
            ids, lps = self._choose(logits, rows, step)
        else:
            ids = lps = None
        if self.world > 1:
            ids, lps = self._broadcast(ids, lps, len(rows))
        return ids, lps

    def _choose(self, logits: torch.Tensor, rows: list[int], step: int):
        p = self.params
        if p.greedy:
            ids = logits.argmax(dim=-1)
            lps = torch.log_softmax(logits, dim=-1)
        else:
            scaled = logits / p.temperature
            lps = torch.log_softmax(scaled, dim=-1)
            probs = filter_logits(scaled, p.top_k, p.top_p).softmax(dim=-1, dtype=torch.float64)
            u = self.uniforms[torch.tensor(rows), step].to(probs.device)
            cdf = probs.cumsum(dim=-1)
            ids = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            # u * total rounds to total only for u within 2^-53 of 1: the last kept token.
            last_kept = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
            ids = torch.minimum(ids, last_kept)
        return ids, lps.gather(-1, ids[:, None]).squeeze(-1)

    def _broadcast(self, ids, lps, n: int):
        import torch.distributed as dist

        buf = torch.empty(2, n, dtype=torch.float64, device=_comm_device())
        if self.rank == self.src:
            buf[0] = ids.to(buf.device, torch.float64)
            buf[1] = lps.to(buf.device, torch.float64)
        dist.broadcast(buf, src=self.src, group=self.group)
        return buf[0].to(torch.long), buf[1].to(torch.float32)
