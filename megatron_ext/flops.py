"""Parameter counts and training FLOPs, counted from the real Megatron model.

FLOPs per token of training (forward + backward = 3 x forward):

    6 * active_matmul_params  +  6 * num_layers * seq_length * num_heads * head_dim

* active_matmul_params: every weight a token multiplies through: attention projections, the
  top-k routed experts, the router, and the output (LM-head) projection. Tied embeddings are
  multiplied once, as the output layer; the input lookup is not a matmul. Norm weights and
  the experts a token does not visit are excluded.
* attention: QK^T and AV cost 2 * s * h * d FLOPs each per token in the forward pass; the
  causal mask halves the useful work, giving 2 * s * h * d forward, 6 * s * h * d training.

MFU = achieved FLOP/s / peak FLOP/s of the device (H100 SXM dense bf16: 989 TFLOP/s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megatron_ext.presets import ModelPreset

H100_BF16_PEAK_TFLOPS = 989.0


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    active_params: int
    active_matmul_params: int
    embedding_params: int
    expert_params: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: torch.nn.Module, preset: ModelPreset) -> ModelSize:
    """Counts over the unique parameters of a full (single-stage) model; works on meta tensors."""
    total = embedding = expert = norm = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embedding / output weight
            continue
        seen.add(id(param))
        n = param.numel()
        total += n
        if "embedding" in name or "output_layer" in name:
            embedding += n
        elif ".experts." in name:
            expert += n
        elif param.dim() == 1:
            norm += n
    if preset.is_moe:
        inactive_experts = expert * (preset.num_experts - preset.moe_router_topk) // preset.num_experts
    else:
        inactive_experts = 0
    active = total - inactive_experts
    # The output projection multiplies every token by the (tied) embedding matrix once.
    active_matmul = active - norm
    return ModelSize(
        total_params=total,
        active_params=active,
        active_matmul_params=active_matmul,
        embedding_params=embedding,
        expert_params=expert,
    )


def analytic_model_size(preset: ModelPreset) -> ModelSize:
    """The same counts by formula, for ranks that hold only a shard of the model.

    tests/test_flops.py checks it against `count_parameters` on the meta model for every preset.
    """
    h, d = preset.hidden_size, preset.kv_channels
    attention = h * d * (2 * preset.num_attention_heads + 2 * preset.num_query_groups)
    norms_per_layer = 2 * h + 2 * d  # input, pre-MLP, q and k norms
    if preset.is_moe:
        expert = 3 * h * preset.moe_ffn_hidden_size
        ffn = preset.num_experts * expert + preset.num_experts * h  # experts + router
        inactive = (preset.num_experts - preset.moe_router_topk) * expert * preset.num_layers
        experts_total = preset.num_experts * expert * preset.num_layers
    else:
        ffn, inactive, experts_total = 3 * h * preset.ffn_hidden_size, 0, 0
    embedding = preset.vocab_size * h * (1 if preset.tie_embeddings else 2)
    norms = preset.num_layers * norms_per_layer + h
    total = embedding + preset.num_layers * (attention + ffn + norms_per_layer) + h
    active = total - inactive
    return ModelSize(
        total_params=total,
        active_params=active,
        active_matmul_params=active - norms,
        embedding_params=embedding,
        expert_params=experts_total,
    )


def attention_flops_per_token(preset: ModelPreset, seq_length: int) -> float:
    return 6.0 * preset.num_layers * seq_length * preset.num_attention_heads * preset.kv_channels


def router_params(preset: ModelPreset) -> int:
    """The routers' weights (one hidden x experts matrix per MoE layer); 0 for a dense model."""
    return preset.num_layers * preset.num_experts * preset.hidden_size if preset.is_moe else 0


def training_flops_per_token(size: ModelSize, preset: ModelPreset, seq_length: int) -> float:
    return 6.0 * size.active_matmul_params + attention_flops_per_token(preset, seq_length)


def describe(preset: ModelPreset, seq_length: int) -> dict:
    """Parameter counts and training FLOPs per token for a preset (single-rank parallel state)."""
    from megatron_ext.model import build_meta_model  # Megatron-Core: the analytic counts need none

    size = count_parameters(build_meta_model(preset), preset)
    flops = training_flops_per_token(size, preset, seq_length)
    router = router_params(preset)
    return {
        "preset": preset.name,
        **size.as_dict(),
        "total_params_billions": round(size.total_params / 1e9, 3),
        "active_params_billions": round(size.active_params / 1e9, 3),
        # Two conventions: with the routers (every parameter a token uses) and without them,
        # the one the paper reports (Mini 0.86B active = 867.6M - 28 x 256 x 1024 router weights).
        "router_params": router,
        "total_params_without_router_billions": round((size.total_params - router) / 1e9, 3),
        "active_params_without_router_billions": round((size.active_params - router) / 1e9, 3),
        "paper_convention": "without router" if router else "dense: no router",
        "seq_length": seq_length,
        "train_flops_per_token": flops,
        "train_flops_per_token_no_attention": 6.0 * size.active_matmul_params,
    }


def checkpoint_bytes(preset: ModelPreset, params_dtype: torch.dtype,
                     with_optimizer: bool = True) -> tuple[int, str]:
    """About how many bytes one checkpoint of this model takes (all ranks together; each
    rank writes its share), and how that was counted: the weights in their dtype, plus, with
    the optimizer, fp32 main weights (when the weights are not fp32) and Adam's two fp32
    moments. Measured against real saves in tests/test_reliability.py."""
    params = analytic_model_size(preset).total_params
    weight = torch.empty((), dtype=params_dtype).element_size()
    parts = [f"{weight}-byte weights"]
    per_param = weight
    if with_optimizer and params_dtype != torch.float32:
        per_param += 4
        parts.append("fp32 main weights")
    if with_optimizer:
        per_param += 8
        parts.append("Adam's 2 fp32 moments")
    # Per tensor, the torch_dist format adds a serialisation header and an index entry.
    total = int(params * per_param * 1.01) + (1 << 20)
    return total, f"{params / 1e6:,.1f}M parameters x {per_param} bytes: {' + '.join(parts)}"
