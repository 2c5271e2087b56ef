"""Core attention on PyTorch's `scaled_dot_product_attention`, for the non-TE layer spec.

Megatron-Core's local `DotProductAttention` materialises the [b, heads, s, s] score matrix
(baddbmm, masked softmax, bmm) and repeats K/V for GQA. PyTorch's SDPA runs fused
flash/memory-efficient kernels on CPU and GPU and handles GQA natively, with the same math.
With TransformerEngine installed, the TE spec uses `TEDotProductAttention` instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for DotProductAttention: [s, b, heads, d] q/k/v in, [s, b, heads * d] out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs TransformerEngine's attention")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SDPAttention supports full causal attention with a plain softmax")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.hidden_per_partition = divide(config.kv_channels * config.num_attention_heads, tp)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias need TE attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # Megatron masks mark positions to drop (True); SDPA's boolean masks mark positions kept.
        keep = None if attention_mask is None else ~attention_mask
        if causal and query.shape[0] != key.shape[0]:
            # Inference with a KV cache: fewer queries than keys, the queries being the last
            # positions. SDPA's is_causal aligns the triangle top-left (query i sees keys <= i),
            # which is wrong here; the triangle must be aligned bottom-right (one query: the
            # last position, which sees every key).
            if query.shape[0] > 1:
                keep = _causal_bottom_right(query.shape[0], key.shape[0], query.device)
            causal = False
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0
        if _fold_query_heads(q, k, keep, dropout):
            return self._decode_step(q, k, v, keep, query.shape[1])
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        k, v, gqa = _grouped_kv(q, k, v, keep)
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=gqa,
            )
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_per_partition)

    def _decode_step(self, q, k, v, keep, batch: int) -> torch.Tensor:
        """One query per row with grouped KV heads (a decode step): the query heads that share
        a KV head become that head's query rows, [b, heads, 1, d] -> [b, kv_heads, heads /
        kv_heads, d]. The same attention as `enable_gqa` (which repeats K/V per query head),
        without the repeat: 10-30% less SDPA time per step on CPU at 64-560 cached keys
        (bench/RESULTS.md), as `transformers` does in its decode steps. The mask must not
        depend on the query (one query: it never does) nor on the head."""
        folded = q.reshape(batch, k.shape[1], -1, q.shape[-1])
        context = F.scaled_dot_product_attention(folded, k, v, attn_mask=keep, scale=self.softmax_scale)
        # [b, kv_heads, heads / kv_heads, d] = [b, heads, d] -> [1, b, heads * d]
        return context.reshape(1, batch, self.hidden_per_partition)


def _grouped_kv(q, k, v, keep):
    """(k, v, enable_gqa) for SDPA. On CUDA a boolean mask together with grouped K/V heads
    has no fused kernel (flash takes GQA but no mask, memory-efficient a mask but no GQA), so
    SDPA would fall back to the math kernel and its [b, heads, s, s] scores (4 GiB in fp32 at
    one row of 8,192 tokens x 16 heads): there K/V are repeated per query head instead (a
    [b, heads, s, d] copy) and the memory-efficient kernel runs. On CPU the fused kernel takes
    both (measured at 8,192 tokens, 16/8 heads: +0.25 GiB peak, no score matrix)."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and keep is not None and q.is_cuda:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    return k, v, gqa


def _fold_query_heads(q, k, keep, dropout: float) -> bool:
    """A decode step SDPAttention._decode_step can take: one query, grouped KV heads, no
    dropout, a mask (if any) shared by all heads and queries."""
    return (q.shape[2] == 1 and k.shape[1] != q.shape[1] and dropout == 0.0
            and (keep is None or (keep.dim() == 4 and keep.shape[1] == 1 and keep.shape[2] == 1)))


def _causal_bottom_right(q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean keep-mask [q_len, k_len]: query i (at key position k_len - q_len + i) sees
    keys up to and including its own position."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos
