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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_ext.errors import ConversionError

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


class HFCheckpointError(ConversionError):
    """An HF directory that cannot be read as the expected model; the message names it."""


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
# Reading an HF directory lazily: config and safetensors (one file, or shards with an index).
# ------------------------------------------------------------------------------------------
def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise HFCheckpointError(f"--hf-dir {directory}: no such directory")
    if not os.path.isfile(path):
        raise HFCheckpointError(f"--hf-dir {directory}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"--hf-dir {directory}: config.json is unreadable ({e})") from None


def preset_fields_from_hf_config(cfg: dict, directory: str = "") -> dict:
    """ModelPreset fields (architecture only) of a `qwen3` / `qwen3_moe` config dict.

    Values missing from the file take the transformers defaults, as `from_pretrained` would.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    where = f"--hf-dir {directory}" if directory else "HF config"
    kind = cfg.get("model_type")
    if kind not in ("qwen3", "qwen3_moe"):
        raise HFCheckpointError(f"{where}: model_type {kind!r} is not a Qwen3 model ('qwen3')")
    conf = (Qwen3Config if kind == "qwen3" else Qwen3MoeConfig).from_dict(dict(cfg))
    rope = dict(getattr(conf, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(conf, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise HFCheckpointError(f"{where}: rope_type {rope['rope_type']!r} is not supported "
                                "(plain RoPE only)")
    if conf.hidden_act != "silu" or getattr(conf, "attention_bias", False):
        raise HFCheckpointError(f"{where}: hidden_act {conf.hidden_act!r} / attention_bias "
                                f"{conf.attention_bias} differ from Qwen3's (silu, no bias)")
    if getattr(conf, "use_sliding_window", False):
        raise HFCheckpointError(f"{where}: sliding-window attention is not supported")
    fields = dict(
        num_layers=conf.num_hidden_layers,
        hidden_size=conf.hidden_size,
        num_attention_heads=conf.num_attention_heads,
        num_query_groups=conf.num_key_value_heads,
        kv_channels=conf.head_dim,
        ffn_hidden_size=conf.intermediate_size,
        vocab_size=conf.vocab_size,
        max_position_embeddings=conf.max_position_embeddings,
        rotary_base=float(theta),
        norm_epsilon=float(conf.rms_norm_eps),
        tie_embeddings=bool(conf.tie_word_embeddings),
    )
    if kind == "qwen3_moe":
        # Marco's spec: every layer sparse, top-k renormalised (Megatron's softmax over the
        # top-k logits), no dense layers in between.
        sparse_every = getattr(conf, "decoder_sparse_step", 1)
        if sparse_every != 1 or list(getattr(conf, "mlp_only_layers", []) or []):
            raise HFCheckpointError(f"{where}: decoder_sparse_step {sparse_every} / "
                                    f"mlp_only_layers {conf.mlp_only_layers}: only models with "
                                    "every layer sparse are supported")
        if not conf.norm_topk_prob:
            raise HFCheckpointError(f"{where}: norm_topk_prob is false; Marco's router "
                                    "renormalises the top-k probabilities (true)")
        fields.update(num_experts=conf.num_experts, moe_ffn_hidden_size=conf.moe_intermediate_size,
                      moe_router_topk=conf.num_experts_per_tok)
    return fields


def hf_config_dict(preset, dtype: str = "float32", router_aux_loss_coef: float = 1e-3,
                   token_ids: Optional[dict] = None) -> dict:
    """config.json of a preset: `qwen3` (dense) or `qwen3_moe` (every layer sparse,
    norm_topk_prob). Built by transformers' own config class, plus the keys released Qwen3
    configs carry that transformers 5 renames (`num_experts`, `rope_theta`, `torch_dtype`),
    so older readers (transformers 4, serving engines) read the same model."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    rope = {"rope_type": "default", "rope_theta": float(preset.rotary_base)}
    kw = dict(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, head_dim=preset.kv_channels,
        hidden_act="silu", max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.norm_epsilon, tie_word_embeddings=preset.tie_embeddings,
        attention_bias=False, attention_dropout=0.0, use_cache=True, rope_parameters=rope,
        dtype=dtype, **(token_ids or {}))
    if preset.is_moe:
        kw.update(num_experts=preset.num_experts, num_experts_per_tok=preset.moe_router_topk,
                  moe_intermediate_size=preset.moe_ffn_hidden_size, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                  router_aux_loss_coef=router_aux_loss_coef)
        conf, arch = Qwen3MoeConfig(**kw), "Qwen3MoeForCausalLM"
    else:
        conf, arch = Qwen3Config(**kw, use_sliding_window=False,
                                 max_window_layers=preset.num_layers), "Qwen3ForCausalLM"
    conf.architectures = [arch]
    out = conf.to_diff_dict()  # what save_pretrained writes
    out.pop("num_local_experts", None)
    out.update(kw)  # every architecture key explicit, whatever the class defaults
    out.update(rope_theta=rope["rope_theta"], torch_dtype=dtype)
    return dict(sorted(out.items()))


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


class HFSafetensors:
    """Lazy access to the tensors of an HF directory: headers are read up front (which also
    catches truncated files), tensor data only on `get`, each file opened only for that read
    so no mapping of the whole checkpoint stays resident."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise HFCheckpointError(f"--hf-dir {directory}: unreadable "
                                        f"model.safetensors.index.json ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise HFCheckpointError(f"--hf-dir {directory}: no model.safetensors or "
                                    "model.safetensors.index.json")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise HFCheckpointError(f"--hf-dir {directory}: shard {name} listed in the "
                                        "index is missing")
            for key, shape, dtype in _read_header(path, directory):
                self.file_of[key], self.shapes[key], self.dtypes[key] = path, shape, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def dtype(self) -> torch.dtype:
        """The floating-point dtype the weights are stored in (the most common one)."""
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        counts: dict[str, int] = {}
        for d in self.dtypes.values():
            counts[d] = counts.get(d, 0) + 1
        return names.get(max(counts, key=counts.get), torch.float32)

    def require(self, expected: Mapping[str, tuple]) -> None:
        """Every name present with the given shape, or one error naming the first problem."""
        for name, shape in expected.items():
            if name not in self.file_of:
                raise HFCheckpointError(f"--hf-dir {self.directory}: tensor {name} is missing")
            if tuple(self.shapes[name]) != tuple(shape):
                raise HFCheckpointError(
                    f"--hf-dir {self.directory}: tensor {name} has shape "
                    f"{tuple(self.shapes[name])}, config.json implies {tuple(shape)}")

    def get_many(self, names) -> dict:
        from safetensors import safe_open

        by_file: dict[str, list] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            with safe_open(path, "pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]


def _read_header(path: str, directory: str):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return [(k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()]
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"--hf-dir {directory}: {os.path.basename(path)} is unreadable "
                                f"(truncated or corrupt: {e})") from None


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


def hf_tokenizer_info(directory: str) -> Optional[dict]:
    """What marco_model.json records about the tokenizer shipped in an HF directory, if any."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(directory, n)) for n in names):
        return {"type": "HuggingFaceTokenizer", "model": os.path.abspath(directory)}
    return None
