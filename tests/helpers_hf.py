"""Random Hugging Face Qwen3 / Qwen3-MoE models for tests (no hub access needed).

Weights are re-drawn so that every part matters to the logits: linear weights with std
1/sqrt(fan_in) (activations of order 1, so FFN and attention visibly change the output) and
norm weights around 1 (a swapped or dropped norm shows).
"""

from __future__ import annotations

import math
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_upcycle_tool():
    """tools/upcycle_hf_to_mcore.py as a module (its `main(argv)` runs in-process)."""
    from conftest import load_tool

    return load_tool("upcycle_hf_to_mcore")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # embeddings, (out, in) linears, (E, out, in) fused experts, router
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True)
    kw.update(overrides)
    rope = kw.pop("rope_theta")
    conf = Qwen3Config(**kw)
    conf.rope_parameters = {"rope_type": "default", "rope_theta": rope}
    return conf


def make_dense_qwen3(directory: str, seed: int = 0, max_shard_size=None,
                     dtype: torch.dtype = torch.float32, **overrides):
    """A random dense Qwen3ForCausalLM saved (safetensors) to `directory`; returns the model."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(**overrides)).eval()
    _randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def make_moe_qwen3(directory: str | None = None, seed: int = 0, **overrides):
    """A random Qwen3MoeForCausalLM (norm_topk_prob, every layer sparse); saved if `directory`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=256, moe_intermediate_size=32,
              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
              decoder_sparse_step=1, mlp_only_layers=[])
    kw.update(overrides)
    conf = Qwen3MoeConfig(**kw)
    conf.rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0}
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(conf).eval()
    _randomize(model, seed)
    if directory:
        model.save_pretrained(directory)
    return model


def write_tokenizer_stub(directory: str) -> None:
    """A tokenizer_config.json, enough for tools that only record where a tokenizer is."""
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')


def tokens(batch: int = 2, seq: int = 24, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a single-rank Megatron GPTModel, (batch, seq, vocab)."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, None).float()
