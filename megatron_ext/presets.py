"""Model presets: the published Marco architectures, their dense parent, and CPU-sized twins.

Numbers come from the Marco-MoE paper (arXiv 2604.25578) and Qwen3-0.6B's config; see
README's presets table. A preset fixes the architecture; training hyper-parameters are flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_ext.errors import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # GQA: number of key/value heads
    kv_channels: int  # head dimension
    ffn_hidden_size: int  # dense SwiGLU FFN (dense presets; the upcycling parent's FFN for MoE)
    vocab_size: int
    max_position_embeddings: int
    num_experts: Optional[int] = None  # None: dense model
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    tie_embeddings: bool = True
    seq_length: int = 4096  # default training sequence length (not published for Marco)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def slices_per_dense_ffn(self) -> Optional[int]:
        """N: how many expert-sized slices the dense parent FFN is cut into when upcycling."""
        if not self.is_moe:
            return None
        return self.ffn_hidden_size // self.moe_ffn_hidden_size


# The transformer's shape, by TransformerConfig's names (model.marco_config passes them on).
TRANSFORMER_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "ffn_hidden_size")
_SHAPE_FIELDS = (*TRANSFORMER_SHAPE, "vocab_size", "max_position_embeddings")

# The shapes the presets share, one column per _SHAPE_FIELDS entry. Tiny: FFN 512 = 4 expert
# slices of 128; vocabulary: the shipped SentencePiece tokenizer (data/tokenizer).
#                                           layers hidden heads kv-heads head-dim FFN   vocab    positions
_QWEN3_06B_SHAPE = dict(zip(_SHAPE_FIELDS, (28,    1024,  16,   8,       128,     3072, 151_936, 32_768)))
_TINY_SHAPE = dict(zip(_SHAPE_FIELDS,      (4,     128,   4,    2,       32,      512,  8192,    2048)),
                   seq_length=256)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            name="qwen3-0.6b",
            description="dense parent: Qwen3-0.6B-Base",
            **_QWEN3_06B_SHAPE,
        ),
        ModelPreset(
            name="nano",
            description="Marco-Nano: 232 experts x 384, top-8 (N=8, M=29), 8.0B / 0.60B",
            num_experts=232,
            moe_ffn_hidden_size=384,
            moe_router_topk=8,
            **_QWEN3_06B_SHAPE,
        ),
        ModelPreset(
            name="mini",
            description="Marco-Mini: 256 experts x 768, top-8 (N=4, M=64), 17.3B / 0.86B",
            num_experts=256,
            moe_ffn_hidden_size=768,
            moe_router_topk=8,
            **_QWEN3_06B_SHAPE,
        ),
        ModelPreset(
            name="mini-global",
            description="Marco-Mini-Global: Mini's architecture, +1.4T tokens over 64 languages",
            num_experts=256,
            moe_ffn_hidden_size=768,
            moe_router_topk=8,
            **_QWEN3_06B_SHAPE,
        ),
        ModelPreset(
            name="tiny-dense",
            description="CPU-sized dense parent of tiny",
            **_TINY_SHAPE,
        ),
        ModelPreset(
            name="tiny",
            description="CPU-sized MoE: 16 experts x 128, top-4 (N=4, M=4)",
            num_experts=16,
            moe_ffn_hidden_size=128,
            moe_router_topk=4,
            **_TINY_SHAPE,
        ),
    ]
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def override(preset: ModelPreset, **changes) -> ModelPreset:
    """A preset with some fields replaced (flags such as --num-experts); None means keep."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(preset, **changes) if changes else preset
