"""Watch MoE routing through forward hooks on Megatron-Core's routers (no Megatron edits).

`ExpertLoadMonitor` counts, per MoE layer, how many tokens each expert received; the trainer
reports max/mean tokens per expert (1.0 = perfectly balanced) per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


def find_routers(model: torch.nn.Module) -> dict[int, TopKRouter]:
    """Routers by global 0-based layer index (Megatron's layer_number is 1-based, global)."""
    routers = {}
    for module in model.modules():
        if isinstance(module, TopKRouter):
            routers[module.layer_number - 1] = module
    return routers


class ExpertLoadMonitor:
    """Accumulates tokens-per-expert per layer between `reset()` calls."""

    def __init__(self, model_chunks: list, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._handles = []
        for chunk in model_chunks:
            for layer, router in find_routers(chunk).items():
                self._handles.append(router.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def record(module, inputs, outputs):
            _, routing_map = outputs  # [tokens, experts] bool
            if module.training:
                self.counts[layer] += routing_map.sum(dim=0).to("cpu", torch.float64)

        return record

    def imbalance(self, group: Optional[dist.ProcessGroup] = None) -> list[float]:
        """Max / mean tokens per expert for each layer, summed over all ranks (collective)."""
        counts = self.counts.clone()
        if dist.is_initialized():
            # Counts are on CPU; gloo reduces CPU tensors on any backend's world.
            if dist.get_backend() == "nccl":
                counts = counts.cuda()
            dist.all_reduce(counts, group=group)
            counts = counts.cpu()
        mean = counts.mean(dim=1)
        return [
            float(counts[i].max() / mean[i]) if mean[i] > 0 else float("nan")
            for i in range(self.num_layers)
        ]

    def reset(self) -> None:
        self.counts.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
