"""Routing replay for on-policy distillation (--routing-replay), on Megatron-Core's RouterReplay.

The same MoE weights can route a token to other experts when it is batched differently: the
KV-cached decode step that sampled it (one token per row) and the training forward (the whole
sequence, other rows, other expert-parallel traffic) round the router's logits differently, and
a near-tie flips. The sampled token's log-prob then comes from another sub-network at training
time, which is most of the sampling/training log-prob gap of an MoE student (`logprob_diff`).
Routing replay (slime's --use-rollout-routing-replay, arXiv 2510.11370) records the experts the
generator chose for every token and makes the trainer's forwards of that rollout use them.

Megatron-Core 0.16.1 carries the mechanism: `transformer/moe/router_replay.py: RouterReplay`, one
per router (`TopKRouter.router_replay`, created when `moe_enable_routing_replay`), whose
RECORD action keeps the top-k indices of the router's last call and whose REPLAY_FORWARD
action takes given indices instead of the top-k and gathers the router's own scores at them,
so the router's probabilities and their gradients are still the router's (as slime's replay).
Built on it here:

- `RoutingReplay(model)` gives each of the student's routers a `ReplayRouter` (a RouterReplay)
  after the model is built, and sets `moe_enable_routing_replay` on its config to say so;
  routers of other models (teachers) are untouched.
- Recording: Megatron's RouterReplay keeps only the last call's indices, and a cached decode
  calls the router once per generated token (one token per row), so the generator tells a
  `Recording` after each forward which rows and positions it just ran (`prefill`: the
  left-padded prompts; `decode`: the rows still in the cache, one position each), and the
  recording copies that call's indices out, per row and position. A row's last token (the stop
  token or the one at the length limit) is never fed back to the generator, so it has no
  recorded routing; nor has padding.
- Replay: `replay(routing)` sets each layer's target indices from the training batch's
  `routing` [b, s, layers, k] (-1 where nothing was recorded), laid out as Megatron's router
  sees the tokens (sequence-major, this rank's sequence-parallel chunk). `ReplayRouter` takes
  the recorded experts where there are some and the router's own top-k elsewhere (the last
  token of each row, padding), which Megatron's all-or-nothing replay cannot do. The targets stay
  set until the next micro-batch, so a backward that recomputes the layer (activation
  recompute) routes as its forward did.

Where it falls short:
- The record is of top-k indices only; the rest of the forward (expert GEMMs, attention) is
  still batched differently, so the gap shrinks to rounding but not to zero.
- Capacity: the generator never drops tokens (generation.dropless); with
  --moe-expert-capacity-factor the trainer may still drop a replayed token at a full expert.
- Memory: layers x k indices (int16) per token of every rollout row are kept with the rollout
  (and in a mid-rollout checkpoint): 48 layers x top-8 x 10k tokens is 7.7 MB per response.
- Only the in-process generator records; the SGLang engine (--rollout-engine sglang) returns
  no routing here (refused with --routing-replay), nor does the uncached reference decoder.
- Sinkhorn routing and the fused router kernel (--moe-router-fusion) bypass RouterReplay's
  top-k hook: refused.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_ext.errors import ConfigError


class ReplayRouter(RouterReplay):
    """Megatron's RouterReplay, replaying per token: recorded experts where the target row is
    >= 0, the router's own top-k where it is -1."""

    def set_target_indices(self, topk_indices: torch.Tensor):
        self.target_topk_idx = topk_indices  # (no backward list: targets persist, see module doc)

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
            return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        target = self.target_topk_idx.to(scores.device)
        if target.shape != (scores.shape[0], topk):
            raise RuntimeError(f"routing replay: {tuple(target.shape)} recorded indices for "
                               f"{scores.shape[0]} tokens x top-{topk}")
        recorded = target[:, :1] >= 0
        if not bool(recorded.all()):
            _, own = default_compute_topk(scores, topk, num_groups, group_topk)
            target = torch.where(recorded, target, own)
        return scores.gather(1, target), target


def _routers(model) -> list:
    """The TopKRouters of `model` (a model or a list of chunks, possibly wrapped), in order."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.utils import unwrap_model

    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in unwrap_model(c).modules() if isinstance(m, TopKRouter)]


class RoutingReplay:
    """The student's routers, recorded while it samples and replayed while it trains."""

    def __init__(self, model):
        routers = _routers(model)
        if not routers:
            raise ConfigError("--routing-replay: the student has no MoE layers (nothing to replay)")
        config = routers[0].config
        if config.moe_router_fusion or any(r.routing_type == "sinkhorn" for r in routers):
            raise ConfigError("--routing-replay: the fused router (--moe-router-fusion) and "
                              "sinkhorn routing bypass Megatron-Core's RouterReplay")
        self.config = config
        self.topk = routers[0].topk
        self.layers: list[ReplayRouter] = []
        for router in routers:
            router.router_replay = ReplayRouter()
            self.layers.append(router.router_replay)
        config.moe_enable_routing_replay = True

    def off(self) -> None:
        for layer in self.layers:
            layer.clear_router_replay_action()
            layer.clear_indices()

    @contextlib.contextmanager
    def recording(self):
        """While sampling: every router records; the generator reports its forwards to the
        `Recording` yielded."""
        for layer in self.layers:
            layer.set_router_replay_action(RouterReplayAction.RECORD)
        try:
            yield Recording(self.layers)
        finally:
            self.off()

    def replay(self, routing: Optional[torch.Tensor]) -> None:
        """The next forwards of the student route `routing` [b, s, layers, k] (a collated
        batch's; -1: the router's own choice); None: no replay."""
        if routing is None:
            self.off()
            return
        b, s, layers, k = routing.shape
        if layers != len(self.layers) or k != self.topk:
            raise RuntimeError(f"routing replay: the rollout recorded {layers} layers x top-{k}, "
                               f"the student has {len(self.layers)} x top-{self.topk}")
        per_layer = routing.permute(2, 1, 0, 3).reshape(layers, s * b, k).long()  # [s * b] tokens
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and tp > 1:  # this rank's sequence chunk
            from megatron.core import parallel_state

            chunk = s // tp * b
            start = parallel_state.get_tensor_model_parallel_rank() * chunk
            per_layer = per_layer[:, start:start + chunk]
        for layer, target in zip(self.layers, per_layer):
            layer.set_target_indices(target)
            layer.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


class Recording:
    """Per row (the generator's sampling index) and position, the experts of each layer."""

    def __init__(self, layers: list):
        self.layers = layers
        self.parts: dict[int, list[torch.Tensor]] = {}  # row -> [positions, layers, k] pieces

    def _last_call(self) -> torch.Tensor:
        """[layers, tokens, k] of the routers' last call."""
        return torch.stack([layer.get_recorded_indices() for layer in self.layers]).to(
            "cpu", torch.int16)

    def prefill(self, rows: list[int], prompt_lengths: list[int]) -> None:
        """After the prefill of left-padded prompts [b, width] (tokens sequence-major)."""
        x = self._last_call()
        b = len(rows)
        x = x.view(x.shape[0], -1, b, x.shape[-1])  # [layers, width, b, k]
        width = x.shape[1]
        for i, (row, n) in enumerate(zip(rows, prompt_lengths)):
            self.parts[row] = [x[:, width - n:, i].permute(1, 0, 2).contiguous()]

    def decode(self, rows: list[int]) -> None:
        """After a decode step of one token per row of `rows` (the cache's order)."""
        x = self._last_call()
        for i, row in enumerate(rows):
            self.parts[row].append(x[:, i:i + 1].permute(1, 0, 2).contiguous())

    def routing(self, row: int, length: int) -> torch.Tensor:
        """[length, layers, k] experts of row `row`'s tokens, -1 where none was recorded."""
        got = torch.cat(self.parts.pop(row))[:length]
        if got.shape[0] < length:
            pad = torch.full((length - got.shape[0], *got.shape[1:]), -1, dtype=got.dtype)
            got = torch.cat([got, pad])
        return got
