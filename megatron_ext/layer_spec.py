"""The Marco transformer layer spec: Qwen3 attention + SwiGLU dense FFN or fine-grained MoE.

Qwen3 attention: GQA, RMSNorm on q and k (per head), RoPE, no biases; pre-norm RMSNorm layers.
The MoE block is Megatron-Core's `MoELayer` (router, token dispatcher, experts); what varies
is the expert backend:

  te            TEGroupedMLP (TransformerEngine grouped GEMM; FP8 capable)
  torch-grouped TorchGroupedMLP (torch._grouped_mm; GPUs without TransformerEngine)
  sequential    SequentialMLP (one MLP per expert; the CPU backend)

Two module providers build the rest of the layer: TransformerEngine's modules where TE is
installed and a GPU is present, otherwise Megatron-Core's local modules with our RMSNorm.
Checkpoints of the two specs are interchangeable in both directions. Their weight keys are the
same (`sharded_state_dict_keys_map` names the local spec's separate input/pre-MLP norms as
TE's fused norm+linear layers do). Their `_extra_state` entries are not: TE's modules carry FP8
metadata, including its standalone norms (q/k norms, the MoE pre-MLP norm, the final norm) and
its core attention, which the local RMSNorm and SDPA attention have no counterpart for. Loads
treat `_extra_state` entries as optional in both directions (`checkpointing.load_checkpoint`):
an entry the checkpoint lacks keeps the module's fresh state, one the model lacks is skipped.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.attention import SDPAttention
from megatron_ext.cli import EXPERT_BACKEND_CHOICES, EXPERT_BACKENDS
from megatron_ext.errors import ConfigError
from megatron_ext.experts import TorchGroupedMLP

try:  # TransformerEngine is an optional GPU extra.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def te_usable() -> bool:
    return HAVE_TE and torch.cuda.is_available()


def default_expert_backend(params_dtype: torch.dtype = torch.bfloat16) -> str:
    """`--moe-expert-backend auto`: TE's grouped GEMM where TE runs; else our torch._grouped_mm
    module, which is the faster equivalent of SequentialMLP on CPU (1.24x, bench/RESULTS.md) and
    on GPUs in bf16 (the CUDA kernel has no fp32 path, so fp32 on a GPU takes SequentialMLP)."""
    if te_usable():
        return "te"
    if torch.cuda.is_available() and params_dtype != torch.bfloat16:
        return "sequential"
    return "torch-grouped"


def torch_grouped_problem(hidden: int, expert_ffn: int, expert_tp: int,
                          params_dtype: torch.dtype) -> str | None:
    """Why `torch._grouped_mm` cannot run these expert shapes, or None. Its operands' rows must
    be 16-byte aligned (e.g. expert-TP leaving 12 bf16 columns fails), and on a GPU it runs in
    bf16 only."""
    if torch.cuda.is_available() and params_dtype != torch.bfloat16:
        return "torch._grouped_mm runs in bf16 only on GPUs (use --bf16, or sequential/te)"
    itemsize = torch.empty((), dtype=params_dtype).element_size()
    for what, cols in (("hidden size", hidden), ("expert FFN size / expert-TP", expert_ffn // expert_tp)):
        if cols * itemsize % 16:
            return (f"torch._grouped_mm needs 16-byte aligned rows, but the {what} is {cols} "
                    f"({cols * itemsize} bytes in {str(params_dtype).replace('torch.', '')})")
    return None


def resolve_expert_backend(choice: str, params_dtype: torch.dtype, preset, expert_tp: int = 1, *,
                           fall_back: bool | None = None, flag: str = "--moe-expert-backend") -> str:
    """The one decision of which expert module runs (the trainer, the teachers, the tools):
    `choice` (EXPERT_BACKEND_CHOICES), the weights' dtype, the preset's shapes and the expert-TP
    size -> "te", "torch-grouped" or "sequential". `auto` is `default_expert_backend`, and
    where torch._grouped_mm cannot run the shapes, sequential; an explicit torch-grouped there
    is refused in one line, unless `fall_back` (a teacher at the student's choice)."""
    if choice not in EXPERT_BACKEND_CHOICES:
        raise ConfigError(f"{flag} {choice!r}: expected one of {', '.join(EXPERT_BACKEND_CHOICES)}")
    fall_back = choice == "auto" if fall_back is None else fall_back
    backend = default_expert_backend(params_dtype) if choice == "auto" else choice
    if backend == "te" and not te_usable():
        raise ConfigError(f"{flag} te: TransformerEngine's grouped GEMM needs TransformerEngine "
                          "and a GPU (use auto)")
    if preset.is_moe and backend == "torch-grouped":
        problem = torch_grouped_problem(preset.hidden_size, preset.moe_ffn_hidden_size, expert_tp,
                                        params_dtype)
        if problem and fall_back:
            return "sequential"  # the equivalent that runs any shape
        if problem:
            raise ConfigError(f"{flag} torch-grouped: {problem}")
    return backend


class RMSNorm(torch.nn.Module):
    """RMSNorm with Megatron's norm signature, usable with sequence parallelism.

    Megatron-Core's local norm (`WrappedTorchNorm`) refuses sequence parallelism, which MoE
    requires whenever TP > 1. With sequence parallelism each TP rank normalises its own slice
    of the sequence, so the weight's gradient must be summed over the TP group: marking it
    `sequence_parallel` makes Megatron's `finalize_model_grads` do exactly that.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MarcoLocalSpecProvider(LocalSpecProvider):
    """Megatron-Core local modules, our RMSNorm and SDPA attention; grouped experts are
    torch._grouped_mm's (TorchGroupedMLP), ungrouped ones SequentialMLP."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        if moe_use_grouped_gemm:
            return TorchGroupedMLP, None
        return SequentialMLP, MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
        )


def _te_spec_provider(torch_grouped: bool):
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class MarcoTESpecProvider(TESpecProvider):
        """TransformerEngine modules; grouped experts are TE's grouped GEMM, or
        torch._grouped_mm's when asked (`torch_grouped`)."""

        def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
            if moe_use_grouped_gemm and torch_grouped:
                return TorchGroupedMLP, None
            return super().grouped_mlp_modules(moe_use_grouped_gemm, False)

    return MarcoTESpecProvider()


def _provider(expert_backend: str, use_te: bool | None):
    """The module provider (TransformerEngine's or Megatron-Core's local modules) that builds
    the layer; `expert_backend` (already resolved) only says which grouped experts TE's takes.
    Whether experts are grouped at all is the config's `moe_grouped_gemm`."""
    if expert_backend not in EXPERT_BACKENDS:
        raise ValueError(
            f"--moe-expert-backend: unknown backend {expert_backend!r}; "
            f"expected one of {', '.join(EXPERT_BACKENDS)}"
        )
    use_te = te_usable() if use_te is None else use_te
    if use_te:
        return _te_spec_provider(expert_backend == "torch-grouped")
    if expert_backend == "te":
        raise ValueError("--moe-expert-backend te needs TransformerEngine and a GPU")
    return MarcoLocalSpecProvider()


def marco_block_spec(
    config: TransformerConfig, expert_backend: str, use_te: bool | None = None,
    vp_stage: int | None = None,
) -> TransformerBlockSubmodules:
    """This pipeline stage's (or virtual stage `vp_stage`'s) layers plus the final norm
    (Megatron's default would be `WrappedTorchNorm`, which cannot run with sequence
    parallelism)."""
    layer = marco_layer_spec(config, expert_backend, use_te)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
        layer_norm=_provider(expert_backend, use_te).layer_norm(rms_norm=True),
    )


def marco_layer_spec(
    config: TransformerConfig, expert_backend: str, use_te: bool | None = None
) -> ModuleSpec:
    """The layer spec for a Marco model (MoE when `config.num_moe_experts` is set)."""
    provider = _provider(expert_backend, use_te)
    fused_norm = provider.fuse_layernorm_and_linear()
    is_moe = config.num_moe_experts is not None
    qk_norm = provider.layer_norm(rms_norm=True, for_qk=True)
    norm = provider.layer_norm(rms_norm=True)
    # The column-parallel linear after a pre-norm: TE fuses the norm into it.
    norm_linear = (provider.column_parallel_layer_norm_linear() if fused_norm
                   else provider.column_parallel_linear())

    if is_moe:
        mlp = get_moe_module_spec_for_backend(
            backend=provider,  # Megatron-Core's name for the provider
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
        )
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=norm_linear, linear_fc2=provider.row_parallel_linear()),
        )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused_norm else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=norm_linear,
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            # TE fuses the pre-MLP norm into the dense FC1; the MoE router needs it separate.
            pre_mlp_layernorm=IdentityOp if (fused_norm and not is_moe) else norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Weight keys as TE's fused layers name them, so CPU and GPU checkpoints match
            # (their `_extra_state` entries differ and load as optional: see the docstring).
            sharded_state_dict_keys_map=(
                {}
                if fused_norm
                else {
                    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    **({} if is_moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
                }
            ),
        ),
    )
