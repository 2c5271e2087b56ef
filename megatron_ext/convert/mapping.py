"""One weight mapping between Hugging Face `qwen3` / `qwen3_moe` and Megatron-Core (Marco spec).

Used in both directions: HF -> Megatron (upcycling, qwen3_moe import) and Megatron -> HF
(export). Megatron names are checkpoint keys of the `torch_dist` format: per-layer tensors
live under one key with a leading layer axis, `decoder.layers.<name>` of shape (L, ...).
The per-layer functions below take and return the tensors of one layer, i.e. with that axis
removed; HF names are relative to `model.layers.{i}.`.

Two layout changes besides renaming:
  * qkv: Megatron's `linear_qkv` stacks rows per query group g (= HF kv head g):
    [the q heads of group g, k_g, v_g], each head `head_dim` rows. HF keeps q, k, v apart.
  * SwiGLU fc1: Megatron's `linear_fc1` is [gate; up] (it computes silu(first half) * second).
Experts: transformers 5 holds `mlp.experts.gate_up_proj` (E, 2F, H) = [gate; up] and
`mlp.experts.down_proj` (E, H, F) in memory, and `save_pretrained` writes per-expert
`mlp.experts.{j}.{gate,up,down}_proj.weight`; both are read, either is written.

Also here: the checkpoint names and shapes an architecture implies on either side
(`mcore_layer_shapes`, `mcore_global_shapes`, `expected_hf_shapes`), which the readers check
before reading and the writers lay out up front, and `chunk_of`, the piece of a tensor a
streaming writer asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

MCORE_LAYERS = "decoder.layers."

# Megatron per-layer name -> HF per-layer name (tensor unchanged).
ATTENTION_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
}
QKV = "self_attention.linear_qkv.weight"
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
HF_POST_ATTN_NORM = "post_attention_layernorm.weight"
# The pre-MLP norm: fused into fc1 for dense layers (TE naming), separate for MoE (router input).
DENSE_NORM = "mlp.linear_fc1.layer_norm_weight"
MOE_NORM = "pre_mlp_layernorm.weight"
DENSE_FC1, DENSE_FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
HF_DENSE = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
ROUTER, HF_ROUTER = "mlp.router.weight", "mlp.gate.weight"
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"  # (E, 2F, H)
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"  # (E, H, F)
HF_FUSED_GATE_UP, HF_FUSED_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"

# Whole-model tensors. lm_head only exists untied (Marco ties it to the embedding).
GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_expert_names(expert: int) -> tuple[str, str, str]:
    p = f"mlp.experts.{expert}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


@dataclass(frozen=True)
class AttentionLayout:
    num_heads: int
    num_query_groups: int
    head_dim: int

    @classmethod
    def from_preset(cls, preset) -> "AttentionLayout":
        return cls(preset.num_attention_heads, preset.num_query_groups, preset.kv_channels)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout):
    """HF q (heads*d, H), k and v (groups*d, H) -> Megatron linear_qkv ((heads+2*groups)*d, H)."""
    g, d, hidden = layout.num_query_groups, layout.head_dim, q.shape[-1]
    q = q.reshape(g, layout.heads_per_group * d, hidden)
    k, v = k.reshape(g, d, hidden), v.reshape(g, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, layout: AttentionLayout):
    """Inverse of `interleave_qkv`."""
    g, d, hidden = layout.num_query_groups, layout.head_dim, qkv.shape[-1]
    q, k, v = qkv.reshape(g, -1, hidden).split([layout.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def concat_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(.., F, H) gate and up -> Megatron fc1 (.., 2F, H) = [gate; up]."""
    return torch.cat([gate, up], dim=-2)


def split_gate_up(fc1: torch.Tensor):
    gate, up = fc1.chunk(2, dim=-2)
    return gate, up


def hf_to_mcore_layer(hf: Mapping[str, torch.Tensor], layout: AttentionLayout, moe: bool) -> dict:
    """One layer: HF tensors (names relative to the layer) -> Megatron per-layer tensors.

    Attention and norms are required. The MLP is converted when present: dense
    `mlp.{gate,up,down}_proj` (moe=False) or `mlp.gate` plus experts, per-expert or fused
    (moe=True). Without MLP tensors only attention and norms come back (the upcycler makes
    the experts itself).
    """
    out = {QKV: interleave_qkv(*(hf[n] for n in HF_QKV), layout)}
    out.update({mc: hf[h] for mc, h in ATTENTION_RENAMES.items()})
    out[MOE_NORM if moe else DENSE_NORM] = hf[HF_POST_ATTN_NORM]
    if not moe and HF_DENSE[0] in hf:
        gate, up, down = (hf[n] for n in HF_DENSE)
        out[DENSE_FC1], out[DENSE_FC2] = concat_gate_up(gate, up), down
    elif moe and HF_ROUTER in hf:
        out[ROUTER] = hf[HF_ROUTER]
        if HF_FUSED_GATE_UP in hf:
            out[EXPERT_FC1], out[EXPERT_FC2] = hf[HF_FUSED_GATE_UP], hf[HF_FUSED_DOWN]
        else:
            names = [hf_expert_names(j) for j in range(hf[HF_ROUTER].shape[0])]
            out[EXPERT_FC1] = torch.stack([concat_gate_up(hf[g], hf[u]) for g, u, _ in names])
            out[EXPERT_FC2] = torch.stack([hf[d] for _, _, d in names])
    return out


def mcore_to_hf_layer(
    mc: Mapping[str, torch.Tensor], layout: AttentionLayout, fused_experts: bool = False
) -> dict:
    """Inverse of `hf_to_mcore_layer`. Experts are written per expert (what `save_pretrained`
    writes and older readers expect) unless `fused_experts` (transformers 5 in-memory names)."""
    q, k, v = split_qkv(mc[QKV], layout)
    out = dict(zip(HF_QKV, (q, k, v)))
    out.update({h: mc[m] for m, h in ATTENTION_RENAMES.items()})
    moe = ROUTER in mc or MOE_NORM in mc
    out[HF_POST_ATTN_NORM] = mc[MOE_NORM if moe else DENSE_NORM]
    if DENSE_FC1 in mc:
        gate, up = split_gate_up(mc[DENSE_FC1])
        out.update(zip(HF_DENSE, (gate, up, mc[DENSE_FC2])))
    if ROUTER in mc:
        out[HF_ROUTER] = mc[ROUTER]
        if fused_experts:
            out[HF_FUSED_GATE_UP], out[HF_FUSED_DOWN] = mc[EXPERT_FC1], mc[EXPERT_FC2]
        else:
            for j, (fc1, fc2) in enumerate(zip(mc[EXPERT_FC1], mc[EXPERT_FC2])):
                gate, up = split_gate_up(fc1)
                out.update(zip(hf_expert_names(j), (gate, up, fc2)))
    return out


def hf_to_mcore(hf: Mapping[str, torch.Tensor], layout: AttentionLayout, num_layers: int,
                moe: bool, tied: bool = True) -> dict:
    """A whole (small) HF state dict -> Megatron checkpoint keys with stacked layer axes."""
    layers = []
    for i in range(num_layers):
        p = hf_layer_prefix(i)
        layers.append(hf_to_mcore_layer({k[len(p):]: v for k, v in hf.items() if k.startswith(p)},
                                         layout, moe))
    out = {MCORE_LAYERS + name: torch.stack([l[name] for l in layers]) for name in layers[0]}
    for mc, h in GLOBAL_RENAMES.items():
        if h in hf and not (tied and mc == "output_layer.weight"):
            out[mc] = hf[h]
    return out


def mcore_to_hf(mc: Mapping[str, torch.Tensor], layout: AttentionLayout,
                fused_experts: bool = False) -> dict:
    """Inverse of `hf_to_mcore` (tied models get no lm_head, as `save_pretrained` writes)."""
    per_layer = {k[len(MCORE_LAYERS):]: v for k, v in mc.items() if k.startswith(MCORE_LAYERS)}
    num_layers = next(iter(per_layer.values())).shape[0]
    out = {}
    for i in range(num_layers):
        layer = mcore_to_hf_layer({k: v[i] for k, v in per_layer.items()}, layout, fused_experts)
        out.update({hf_layer_prefix(i) + k: v for k, v in layer.items()})
    out.update({h: mc[m] for m, h in GLOBAL_RENAMES.items() if m in mc})
    return out


# ------------------------------------------------------------------------------------------
# Checkpoint shapes of an architecture, on both sides
# ------------------------------------------------------------------------------------------
def mcore_layer_shapes(preset) -> dict:
    """Megatron per-layer checkpoint names of a preset and their shapes (layer axis removed)."""
    h, d = preset.hidden_size, preset.kv_channels
    heads, groups = preset.num_attention_heads, preset.num_query_groups
    shapes = {QKV: ((heads + 2 * groups) * d, h), "self_attention.linear_proj.weight": (h, heads * d),
              "self_attention.linear_qkv.layer_norm_weight": (h,),
              "self_attention.q_layernorm.weight": (d,), "self_attention.k_layernorm.weight": (d,)}
    if preset.is_moe:
        e, f = preset.num_experts, preset.moe_ffn_hidden_size
        shapes.update({MOE_NORM: (h,), ROUTER: (e, h), EXPERT_FC1: (e, 2 * f, h),
                       EXPERT_FC2: (e, h, f)})
    else:
        f = preset.ffn_hidden_size
        shapes.update({DENSE_NORM: (h,), DENSE_FC1: (2 * f, h), DENSE_FC2: (h, f)})
    return shapes


def mcore_global_shapes(preset) -> dict:
    """Megatron whole-model checkpoint names (no layer axis) and shapes."""
    h = preset.hidden_size
    shapes = {"embedding.word_embeddings.weight": (preset.vocab_size, h),
              "decoder.final_layernorm.weight": (h,)}
    if not preset.tie_embeddings:
        shapes["output_layer.weight"] = (preset.vocab_size, h)
    return shapes


def expected_hf_shapes(fields: dict, moe: bool = False, fused_experts: bool = False) -> dict:
    """HF tensor names and shapes a qwen3 (or qwen3_moe) checkpoint must hold, in file order:
    embedding, layer by layer, final norm (and lm_head when untied). Experts per expert, as
    `save_pretrained` writes them, or fused (E, 2F, H) / (E, H, F) as transformers 5 holds them."""
    h, d = fields["hidden_size"], fields["kv_channels"]
    heads, groups = fields["num_attention_heads"], fields["num_query_groups"]
    shapes = {"model.embed_tokens.weight": (fields["vocab_size"], h)}
    for i in range(fields["num_layers"]):
        p = hf_layer_prefix(i)
        layer = {
            "input_layernorm.weight": (h,), HF_POST_ATTN_NORM: (h,),
            "self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (groups * d, h),
            "self_attn.v_proj.weight": (groups * d, h), "self_attn.o_proj.weight": (h, heads * d),
            "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        }
        if moe:
            e, f = fields["num_experts"], fields["moe_ffn_hidden_size"]
            layer[HF_ROUTER] = (e, h)
            if fused_experts:
                layer.update({HF_FUSED_GATE_UP: (e, 2 * f, h), HF_FUSED_DOWN: (e, h, f)})
            for j in range(0 if fused_experts else e):
                layer.update(zip(hf_expert_names(j), ((f, h), (f, h), (h, f))))
        else:
            f = fields["ffn_hidden_size"]
            layer.update(zip(HF_DENSE, ((f, h), (f, h), (h, f))))
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not fields["tie_embeddings"]:
        shapes["lm_head.weight"] = (fields["vocab_size"], h)
    return shapes


def chunk_of(full: torch.Tensor, offsets: tuple, sizes: tuple) -> torch.Tensor:
    """The chunk of a checkpoint tensor at global `offsets` of size `sizes`, as the streaming
    writer asks for it. Leading axes that `full` lacks (Megatron's prepended layer / expert
    axes, of size 1 in the chunk) are taken as already selected."""
    lead = len(sizes) - full.dim()
    if lead < 0:
        raise RuntimeError(f"chunk {sizes} at {offsets} does not fit a tensor {tuple(full.shape)}")
    index = tuple(slice(o, o + s) for o, s in zip(offsets[lead:], sizes[lead:]))
    return full[index].reshape(sizes)
