"""Shortcuts taken by generation's forward passes: Megatron-Core's arithmetic, less of its glue.

A decode step pushes one token per row through every layer, so a small model's step is mostly
per-call overhead, not arithmetic: at `tiny` (hidden 128, 8 rows) the kernels are under half of
a ~17 ms step. Megatron-Core's modules are written for training at any tensor-parallel size:
every linear layer goes through TP-aware autograd `Function`s (copy-to / reduce-from the TP
region, the linear with gradient-accumulation fusion, the gather of the output layer's
logits), the router's gating GEMM through another, and RoPE re-rotates every cached key at
every step. Without autograd and at tensor-parallel size 1 all of that is the identity around
one matmul, so while one of generation's forward passes runs, these shortcuts stand in:

- `Tp1Shortcuts`: each `ColumnParallelLinear` / `RowParallelLinear` whose TP group has one rank
  gets an instance `forward` that is Megatron's forward at that size without the `Function`s:
  `F.linear(input, weight)`, then the bias where Megatron adds it. Megatron computes
  `torch.matmul(input, weight.t())`, the same product; for a 3-D input that spelling costs a
  fifth more on CPU at the output layer's shape (8 x 128 by 128 x 8192: 630 against 515 us).
  Each `TopKRouter` gets a `gating` that is `RouterGatingLinearFunction.forward` (mm or addmm
  in the router dtype) without the `Function`, where Megatron would not call TE's GEMM there,
  and an `_apply_expert_bias` that does nothing, as Megatron's does without grad (its
  `torch.compile` wrapper is the cost). The instance attributes are deleted on exit: the
  class methods are back for training, which the same model does between rollouts
  (on-policy distillation). Only exactly these classes are touched (a subclass may differ),
  and nothing is installed while autograd is on.
- `RopeOnce`: each key rotated once, each cos/sin computed once per forward (its docstring).

The other decode-step saving lives with the attention it changes: SDPAttention folds the query
heads of a KV group into that group's query rows when there is one query per row
(megatron_ext/attention.py).

Logits are bit-identical to Megatron's own path (tested: dense and MoE, both expert backends,
fp32 and bf16, with and without the shortcuts). At TP > 1 the linears keep Megatron's forward;
the layout tests check that generation there equals one process. What the shortcuts buy is in
bench/RESULTS.md (generation against `transformers` `generate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Tp1Shortcuts:
    """While entered: plain forwards on the TP-size-1 linears and routers of `model`."""

    def __init__(self, model):
        self.model = model
        self.installed: list[tuple[torch.nn.Module, tuple[str, ...]]] = []

    def __enter__(self):
        if torch.is_grad_enabled():
            return self
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import get_pg_size

        plain_gating = getattr(moe_utils, "te_general_gemm", None) is None
        for module in self.model.modules():
            kind = type(module)
            if kind in (ColumnParallelLinear, RowParallelLinear):
                if (get_pg_size(module.tp_group) != 1
                        or getattr(module.config, "_cpu_offloading_context", None) is not None):
                    continue
                make = _column_forward if kind is ColumnParallelLinear else _row_forward
                module.forward = make(module)
                self.installed.append((module, ("forward",)))
            elif (kind is TopKRouter and plain_gating
                  and module.config.moe_router_dtype in (None, "fp32", "fp64")):
                module.gating = _router_gating(module)
                module._apply_expert_bias = _no_expert_bias_update
                self.installed.append((module, ("gating", "_apply_expert_bias")))
        return self

    def __exit__(self, *exc):
        for module, names in self.installed:
            for name in names:
                module.__dict__.pop(name, None)
        self.installed.clear()


def _column_forward(module):
    def forward(input_, weight=None, runtime_gather_output=None):
        # One TP rank: the copy into the region and the gather of the output are identities.
        output = F.linear(input_, module.weight if weight is None else weight)
        if module.bias is not None and not module.skip_bias_add:
            output = output + module.bias
        return output, (module.bias if module.skip_bias_add else None)
    return forward


def _row_forward(module):
    def forward(input_):
        output = F.linear(input_, module.weight)  # the reduce over one rank: identity
        if module.skip_bias_add:
            return output, module.bias
        return (output + module.bias if module.bias is not None else output), None
    return forward


_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _router_gating(router):
    def gating(input_):
        dtype = _ROUTER_DTYPES.get(router.config.moe_router_dtype, input_.dtype)
        rows = input_.reshape(-1, input_.shape[-1]).to(dtype)
        weight = router.weight.to(dtype).t()
        if router.bias is None:
            logits = torch.mm(rows, weight)
        else:
            logits = torch.addmm(router.bias.to(dtype), rows, weight)
        return logits.view(*input_.shape[:-1], -1)
    return gating


def _no_expert_bias_update(routing_map, padding_mask=None):
    """TopKRouter._apply_expert_bias without grad: nothing (Megatron's returns at its first `if`)."""


class RopeOnce:
    """RoPE during our cached forwards: each key rotated once, each cos/sin computed once.

    Megatron's static KV cache stores keys before RoPE and re-applies RoPE to every cached
    key at every step (attention.py: `key = apply_rotary_pos_emb(key, k_pos_emb)` on
    `inference_key_memory[:sequence_end]`): O(sequence) extra elementwise work per layer per
    token, a fifth of a small model's decode step at 700 tokens. While one of our forwards runs,
    this wraps that call: when the tensor is a view of one of our key buffers, only the rows
    written by this forward are rotated, in place, so the cache holds rotated keys and each key
    is rotated exactly once. And every layer's queries and keys of one forward sit at the same
    positions, so cos and sin of those positions are computed once per forward, not twice per
    layer (5% of a `tiny-long` generation by CPU time, bench/RESULTS.md). The arithmetic is
    Megatron's unfused RoPE (`rope_utils._apply_rotary_pos_emb_bshd`: t * cos +
    rotate_half(t) * sin, the same ops in the same order), so results are bit-identical
    (tested); any other call (fused or interleaved RoPE, packed sequences, training) goes to
    Megatron's function as is."""

    def __init__(self, steps):  # generation._CachedSteps: its key buffers and offset
        import megatron.core.transformer.attention as attention

        self.steps, self.module = steps, attention
        self.original = attention.apply_rotary_pos_emb
        self.hits = 0  # calls that rotated only the new keys (tested: one per layer per forward)
        self.cos_sin = {}  # this forward's (cos, sin) per positions slice of the RoPE table

    def __enter__(self):
        self.cos_sin.clear()
        self.module.apply_rotary_pos_emb = self._apply

    def __exit__(self, *exc):
        self.module.apply_rotary_pos_emb = self.original
        self.cos_sin.clear()

    def _is_key_cache(self, tensor) -> bool:
        # Same storage as one of our key buffers (`_base` is not kept under inference_mode).
        storage = tensor.untyped_storage().data_ptr()
        return any(storage == k.untyped_storage().data_ptr() for k, _ in self.steps.buffers.values())

    def _apply(self, t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        plain = not (cu_seqlens is not None or config.apply_rope_fusion or config.rotary_interleaved
                     or config.multi_latent_attention or freqs.shape[-1] != t.shape[-1])
        if not plain:
            return self.original(t, freqs, config, cu_seqlens, mscale, cp_group)
        if t.shape[0] == freqs.shape[0] and self._is_key_cache(t):
            self.hits += 1
            start = self.steps.ctx.sequence_len_offset
            new = t[start:]
            new.copy_(self._rotate(new, freqs[start:], mscale))
            return t
        return self._rotate(t, freqs, mscale)

    def _rotate(self, t, freqs, mscale):
        key = (freqs.data_ptr(), tuple(freqs.shape), t.dtype, mscale)
        if key not in self.cos_sin:
            self.cos_sin[key] = ((torch.cos(freqs) * mscale).to(t.dtype),
                                 (torch.sin(freqs) * mscale).to(t.dtype))
        cos, sin = self.cos_sin[key]
        first, second = torch.chunk(t, 2, dim=-1)
        return (t * cos) + (torch.cat((-second, first), dim=-1) * sin)
