"""Watch MoE routing through forward hooks on Megatron-Core's routers (no Megatron edits).

`RoutingRecorder` counts, per MoE layer, how many tokens each expert received, under a label
(the trainer uses "train" while training and the language name while evaluating; the routing
analysis tool uses the language). From the counts come the per-layer expert load imbalance
(max / mean tokens per expert, 1.0 = balanced) and the language-expert signatures.

The hooks never synchronise the device: counts accumulate where the router runs (int64 on the
GPU during GPU training), and `totals` reduces them over ranks and copies them to the host once,
when the trainer asks for a step's imbalance (once per step) or an evaluation's counts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


def find_routers(model: torch.nn.Module) -> dict[int, TopKRouter]:
    """Routers by global 0-based layer index (Megatron's layer_number is 1-based, global)."""
    return {
        module.layer_number - 1: module
        for module in model.modules()
        if isinstance(module, TopKRouter)
    }


class RoutingRecorder:
    """Accumulates tokens-per-expert per layer for the current label."""

    def __init__(self, model_chunks: list, num_layers: int, num_experts: int, label: str = "train"):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.label = label
        self._counts: dict[str, torch.Tensor] = {}  # label -> [layers, experts] int64, on device
        self._handles = []
        self.local_layers: list[int] = []
        for chunk in model_chunks:
            for layer, router in find_routers(chunk).items():
                self.local_layers.append(layer)
                self._handles.append(router.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def record(module, inputs, outputs):
            _, routing_map = outputs  # [tokens, experts], True where a token goes
            counts = self._counts.get(self.label)
            if counts is None:  # on the router's device: no host copy, no sync per layer
                counts = self._counts[self.label] = torch.zeros(
                    self.num_layers, self.num_experts, dtype=torch.int64, device=routing_map.device
                )
            counts[layer] += routing_map.sum(dim=0)

        return record

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """This rank's counts per label, as float64 on the host (copies: for offline tools)."""
        return {label: c.to("cpu", torch.float64) for label, c in self._counts.items()}

    @contextlib.contextmanager
    def recording(self, label: str):
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def totals(self, label: str, group=None) -> torch.Tensor:
        """[layers, experts] counts for `label`, summed over all ranks (collective).

        Tokens are distinct across data-parallel ranks, sequence-parallel slices and pipeline
        stages (each stage fills only its own layers), so a plain sum is the global count.
        """
        counts = self._counts.get(label)
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        if counts is None:
            counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64,
                                 device="cuda" if nccl else "cpu")
        counts = counts.clone()
        if nccl and counts.device.type != "cuda":
            counts = counts.cuda()
        if dist.is_initialized():
            dist.all_reduce(counts, group=group)
        return counts.to("cpu", torch.float64)  # the one device-to-host copy

    def imbalance(self, label: str = "train") -> list[float]:
        """Max / mean tokens per expert for each layer (collective)."""
        counts = self.totals(label)
        mean = counts.mean(dim=1)
        return [
            float(counts[i].max() / mean[i]) if mean[i] > 0 else float("nan")
            for i in range(self.num_layers)
        ]

    def reset(self, label: str | None = None) -> None:
        if label is None:
            self._counts.clear()
        else:
            self._counts.pop(label, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
