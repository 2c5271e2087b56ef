"""Hugging Face `config.json` <-> Marco architecture (`ModelPreset` fields).

  read_hf_config                 an HF directory's config.json, or one error naming it
  preset_fields_from_hf_config   the architecture of a `qwen3` / `qwen3_moe` config; anything
                                 Marco's model cannot compute the same way (other RoPE types,
                                 biases, sliding windows, dense layers in a MoE, a router
                                 without renormalised top-k) is refused by name
  hf_config_dict                 the config.json the export writes for a preset
  hf_tokenizer_info              what marco_model.json records about a shipped tokenizer
  architecture                   a preset's architecture fields, for matching HF shapes to a
                                 registered preset
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from megatron_ext.errors import ConversionError


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise ConversionError(f"--hf-dir {directory}: no such directory")
    if not os.path.isfile(path):
        raise ConversionError(f"--hf-dir {directory}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--hf-dir {directory}: config.json is unreadable ({e})") from None


def preset_fields_from_hf_config(cfg: dict, directory: str = "") -> dict:
    """ModelPreset fields (architecture only) of a `qwen3` / `qwen3_moe` config dict.

    Values missing from the file take the transformers defaults, as `from_pretrained` would.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    where = f"--hf-dir {directory}" if directory else "HF config"
    kind = cfg.get("model_type")
    if kind not in ("qwen3", "qwen3_moe"):
        raise ConversionError(f"{where}: model_type {kind!r} is not a Qwen3 model ('qwen3')")
    conf = (Qwen3Config if kind == "qwen3" else Qwen3MoeConfig).from_dict(dict(cfg))
    rope = dict(getattr(conf, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(conf, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{where}: rope_type {rope['rope_type']!r} is not supported "
                              "(plain RoPE only)")
    if conf.hidden_act != "silu" or getattr(conf, "attention_bias", False):
        raise ConversionError(f"{where}: hidden_act {conf.hidden_act!r} / attention_bias "
                              f"{conf.attention_bias} differ from Qwen3's (silu, no bias)")
    if getattr(conf, "use_sliding_window", False):
        raise ConversionError(f"{where}: sliding-window attention is not supported")
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
            raise ConversionError(f"{where}: decoder_sparse_step {sparse_every} / "
                                  f"mlp_only_layers {conf.mlp_only_layers}: only models with "
                                  "every layer sparse are supported")
        if not conf.norm_topk_prob:
            raise ConversionError(f"{where}: norm_topk_prob is false; Marco's router "
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




def hf_tokenizer_info(directory: str) -> Optional[dict]:
    """What marco_model.json records about the tokenizer shipped in an HF directory, if any."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(directory, n)) for n in names):
        return {"type": "HuggingFaceTokenizer", "model": os.path.abspath(directory)}
    return None


def architecture(preset) -> dict:
    """The fields that define a preset's weights and function: not its name, description or
    context length (an HF config and a preset with equal architectures are the same model)."""
    fields = dataclasses.asdict(preset)
    for k in ("name", "description", "seq_length", "max_position_embeddings"):
        fields.pop(k)
    return fields
