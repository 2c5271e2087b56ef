"""Grouped-GEMM routed experts on `torch._grouped_mm`, for GPUs without TransformerEngine.

Megatron-Core's legacy `GroupedMLP` runs all local experts as two grouped GEMMs but needs the
external `grouped_gemm` package. This module keeps GroupedMLP's parameter layout and its
sharded checkpoint mapping (weights interchangeable with SequentialMLP / TEGroupedMLP
checkpoints) and swaps the kernel for PyTorch's native grouped GEMM.

Layout (as GroupedMLP): weight1 is [hidden, E_local * 2F] and weight2 [E_local * F, hidden],
read as [E_local, hidden, 2F] and [E_local, F, hidden] per-expert blocks.

`--recompute-granularity selective --recompute-modules moe_act` recomputes the SwiGLU (and the
routing-probability scaling) in backward instead of keeping its output, as GroupedMLP does
(Megatron-Core's CheckpointWithoutOutput): the expert activation memory drops from FC1 out +
SwiGLU out to FC1 out per routed token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class TorchGroupedMLP(GroupedMLP):
    """All local experts of one MoE layer as two `torch._grouped_mm` calls."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None):
        # GroupedMLP.__init__ insists on the grouped_gemm package; build the same state here.
        MegatronModule.__init__(self, config=config)
        if config.add_bias_linear:
            raise ValueError("TorchGroupedMLP: expert biases are not supported (Marco has none)")
        if config.gated_linear_unit and config.activation_func is not F.silu:
            raise ValueError("TorchGroupedMLP: gated experts must use SiLU (SwiGLU)")
        self.num_local_experts = num_local_experts
        self.expert_parallel = config.expert_model_parallel_size > 1
        self.activation_recompute = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or ()))
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp

        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        fc1_out = config.moe_ffn_hidden_size * num_local_experts * (2 if config.gated_linear_unit else 1)
        fc2_in = config.moe_ffn_hidden_size * num_local_experts
        fc1_out_part, fc2_in_part = divide(fc1_out, tp_size), divide(fc2_in, tp_size)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(
            torch.empty(config.hidden_size, fc1_out_part, dtype=config.params_dtype, device=device)
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(fc2_in_part, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization and config.use_cpu_initialization:
            for weight, full_shape, dim, init in (
                (self.weight1, (config.hidden_size, fc1_out), 1, config.init_method),
                (self.weight2, (fc2_in, config.hidden_size), 0, config.output_layer_init_method),
            ):
                _initialize_affine_weight_cpu(
                    weight, *full_shape, weight.shape[dim], partition_dim=dim, init_method=init,
                    params_dtype=config.params_dtype, rank=tp_rank, world_size=tp_size,
                )
        elif config.perform_initialization:
            _initialize_affine_weight_gpu(
                self.weight1, config.init_method, partition_dim=1, is_expert=True
            )
            _initialize_affine_weight_gpu(
                self.weight2, config.output_layer_init_method, partition_dim=0, is_expert=True
            )
        # Expert weights are reduced over the expert-data-parallel group, not the full DP group.
        self.weight1.allreduce = not self.expert_parallel
        self.weight2.allreduce = not self.expert_parallel
        # Checkpoints written by SequentialMLP carry per-expert `_extra_state` entries that
        # this layout has no module for (GroupedMLP ignores them the same way).
        self.register_load_state_dict_post_hook(_ignore_extra_states)

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.gated_linear_unit:
            return self.config.activation_func(x)
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    def _act(self, fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """SwiGLU, scaled by the routing probabilities (fp32), back in the input dtype."""
        return (self._glu(fc1) * probs).to(fc1.dtype)

    def _act_then(self, fc1: torch.Tensor, probs: torch.Tensor, second):
        """`second(act(fc1))`; with moe_act recompute the activation is not kept for backward."""
        if not self.activation_recompute:
            return second(self._act(fc1, probs))
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
        out = second(checkpoint.checkpoint(self._act, fc1, probs))
        checkpoint.discard_output_and_register_recompute(out)
        return out

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        hidden = self.config.hidden_size
        x = permuted_local_hidden_states
        probs = permuted_probs.unsqueeze(-1)
        w1 = self.weight1.view(self.num_local_experts, hidden, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, hidden)
        if x.shape[0] == 0:
            # No token reached these experts: a zero-size product keeps every weight in the
            # autograd graph so gradient buffers stay consistent across ranks. The routing
            # probabilities are fp32: cast back before the second matmul (bf16 weights).
            out = self._act_then((x @ self.weight1).to(x.dtype), probs, lambda h: h @ self.weight2)
            return out.to(x.dtype), None
        offsets = torch.cumsum(
            torch.as_tensor(tokens_per_expert, device=x.device), dim=0, dtype=torch.int32
        )
        fc1 = torch._grouped_mm(x, w1.to(x.dtype), offs=offsets)
        out = self._act_then(fc1, probs,
                             lambda h: torch._grouped_mm(h, w2.to(x.dtype), offs=offsets))
        return out, None



def _ignore_extra_states(module, incompatible_keys):
    for key in list(incompatible_keys.unexpected_keys):
        if "_extra_state" in key:
            incompatible_keys.unexpected_keys.remove(key)
