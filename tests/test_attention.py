"""SDPA core attention (the non-TE spec) computes what Megatron's DotProductAttention does."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.attention import SDPAttention
from megatron_ext.model import marco_config
from megatron_ext.presets import get_preset


@pytest.mark.parametrize("explicit_mask", [False, True])
def test_sdpa_matches_megatron_dot_product_attention(megatron_single_rank, explicit_mask):
    config = marco_config(get_preset("tiny"))  # 4 query heads, 2 key/value groups (GQA)
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    s, b = 48, 2
    q = torch.randn(s, b, 4, 32, generator=g, requires_grad=True)
    k = torch.randn(s, b, 2, 32, generator=g, requires_grad=True)
    v = torch.randn(s, b, 2, 32, generator=g, requires_grad=True)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None] if explicit_mask else None
    if explicit_mask:  # also drop the first key for every query of batch row 1
        mask = mask.repeat(b, 1, 1, 1)
        mask[1, :, 1:, 0] = True
    out_ref, out = reference(q, k, v, mask), ours(q, k, v, mask)
    assert out.shape == out_ref.shape == (s, b, 128)
    assert (out - out_ref).abs().max().item() < 1e-5
    grads_ref = torch.autograd.grad(out_ref.pow(2).sum(), (q, k, v))
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for a, r in zip(grads, grads_ref):
        assert (a - r).abs().max().item() < 1e-4
