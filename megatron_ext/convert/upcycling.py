"""Fine-grained upcycling of a dense SwiGLU FFN into N x M experts (Marco-MoE recipe).

Dense FFN: y = W_down (silu(W_gate x) * (W_up x)), intermediate size F, expert size F_e.

  split      N = F / F_e slices; slice j = rows j*F_e:(j+1)*F_e of W_gate and W_up and the same
             columns of W_down. The N slice-FFNs sum to the dense FFN.
  scale      routed outputs are weighted by renormalised top-k probabilities (sum 1), so a token
             taking one copy of each slice with weight 1/N gets 1/N of the dense output:
               marco  W_gate, W_up, W_down x N^(1/3)  (the paper's; approximate, silu is not
                      homogeneous)
               exact  W_up, W_down x sqrt(N), W_gate unchanged (linear in the output: x N exactly)
               none   no scale
  replicate  E = N x M; expert e is replica e // N of slice e % N, so each group of N
             consecutive experts holds the N distinct slices.
  router     virtual-group: the N experts of a group share one row (std 0.02), so top-k with k a
             multiple of N picks whole groups and each slice gets weight P_group / N: with
             `exact` the MoE reproduces the dense FFN. random: every row std 0.02.
  drop       Drop-Upcycling (ratio r): per expert round(r x F_e) intermediate indices (half-up)
             are re-initialised in W_gate and W_up rows and W_down columns, from a normal with
             the mean and std of the weights dropped from that matrix. The indices of an expert
             are shared by its three matrices (they are the same neurons).

Every random draw comes from a generator keyed by (seed, layer, expert, what), so results do
not depend on the order in which experts or matrices are produced (the checkpoint writer
produces them one at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.convert import mapping as hm
from megatron_ext.errors import ConversionError

SCALES = ("marco", "exact", "none")
ROUTER_INITS = ("virtual-group", "random")
MATRICES = ("gate", "up", "down")
_TAG = {"indices": 0, "gate": 1, "up": 2, "down": 3, "router": 4}


@dataclass(frozen=True)
class UpcycleSpec:
    dense_ffn: int  # F
    expert_ffn: int  # F_e
    num_experts: int  # E = N x M
    topk: int
    scale: str = "marco"
    router_init: str = "virtual-group"
    drop_ratio: float = 0.0
    seed: int = 0
    router_std: float = 0.02

    @property
    def n(self) -> int:
        return self.dense_ffn // self.expert_ffn

    @property
    def m(self) -> int:
        return self.num_experts // self.n

    def validate(self) -> "UpcycleSpec":
        if self.scale not in SCALES:
            raise ConversionError(f"--scale {self.scale}: expected one of {', '.join(SCALES)}")
        if self.router_init not in ROUTER_INITS:
            raise ConversionError(f"--router-init {self.router_init}: expected one of "
                                  f"{', '.join(ROUTER_INITS)}")
        if self.expert_ffn <= 0 or self.dense_ffn % self.expert_ffn:
            raise ConversionError(f"--moe-ffn-hidden-size {self.expert_ffn} does not divide the "
                                  f"dense FFN size {self.dense_ffn} (intermediate_size)")
        n = self.n
        if self.num_experts <= 0 or self.num_experts % n:
            raise ConversionError(f"--num-experts {self.num_experts} is not a multiple of N = {n} "
                                  f"(dense FFN {self.dense_ffn} / expert FFN {self.expert_ffn})")
        if not 0 < self.topk <= self.num_experts:
            raise ConversionError(f"--moe-router-topk {self.topk} must be in 1..{self.num_experts}")
        if self.router_init == "virtual-group" and self.topk % n:
            raise ConversionError(
                f"--moe-router-topk {self.topk} is not a multiple of N = {n}, which "
                f"--router-init virtual-group needs (top-k must pick whole groups of {n}); "
                "use a multiple of N or --router-init random")
        if not (0.0 <= self.drop_ratio < 1.0):  # also rejects NaN
            raise ConversionError(f"--drop-ratio {self.drop_ratio} must be in [0, 1)")
        return self


def generator(seed: int, layer: int, expert: int, what: str) -> torch.Generator:
    """An independent, reproducible stream per (seed, layer, expert, what)."""
    state = np.random.SeedSequence([seed, layer, expert, _TAG[what]]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def scale_factors(scale: str, n: int) -> dict:
    """Multipliers of W_gate, W_up, W_down."""
    if scale == "marco":
        lam = n ** (1.0 / 3.0)
        return {"gate": lam, "up": lam, "down": lam}
    if scale == "exact":
        root = math.sqrt(n)
        return {"gate": 1.0, "up": root, "down": root}
    if scale == "none":
        return {"gate": 1.0, "up": 1.0, "down": 1.0}
    raise ConversionError(f"--scale {scale}: expected one of {', '.join(SCALES)}")


def expert_slice(expert: int, n: int) -> int:
    """Which dense slice expert `expert` holds (it is replica expert // n of it)."""
    return expert % n


def slice_matrix(dense: torch.Tensor, which: str, j: int, expert_ffn: int) -> torch.Tensor:
    """Slice j of a dense matrix: rows of W_gate / W_up (F, H), columns of W_down (H, F)."""
    s = slice(j * expert_ffn, (j + 1) * expert_ffn)
    return dense[:, s] if which == "down" else dense[s]


def num_dropped(expert_ffn: int, ratio: float) -> int:
    return int(math.floor(ratio * expert_ffn + 0.5))


def drop_indices(spec: UpcycleSpec, layer: int, expert: int) -> torch.Tensor:
    """The sorted intermediate indices Drop-Upcycling re-initialises in this expert."""
    k = num_dropped(spec.expert_ffn, spec.drop_ratio)
    perm = torch.randperm(spec.expert_ffn, generator=generator(spec.seed, layer, expert, "indices"))
    return perm[:k].sort().values


def reinit_like(dropped: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Normal noise with the mean and std of `dropped` (same shape)."""
    std = dropped.std() if dropped.numel() > 1 else dropped.new_zeros(())
    noise = torch.randn(dropped.shape, generator=g, dtype=torch.float32)
    return noise * std + dropped.mean()


def expert_matrix(
    spec: UpcycleSpec, which: str, dense: torch.Tensor, layer: int, expert: int
) -> torch.Tensor:
    """One expert's W_gate / W_up (F_e, H) or W_down (H, F_e), in fp32: slice, scale, drop."""
    w = slice_matrix(dense, which, expert_slice(expert, spec.n), spec.expert_ffn).float()
    w = w * scale_factors(spec.scale, spec.n)[which]
    if spec.drop_ratio > 0:
        idx = drop_indices(spec, layer, expert)
        if idx.numel():
            g = generator(spec.seed, layer, expert, which)
            if which == "down":
                w[:, idx] = reinit_like(w[:, idx], g)
            else:
                w[idx] = reinit_like(w[idx], g)
    return w


def router_weight(spec: UpcycleSpec, layer: int, hidden: int) -> torch.Tensor:
    """Router rows (E, H) in fp32: tied in groups of N (virtual-group) or all independent."""
    g = generator(spec.seed, layer, 0, "router")
    if spec.router_init == "virtual-group":
        rows = torch.randn(spec.m, hidden, generator=g) * spec.router_std
        return rows.repeat_interleave(spec.n, dim=0)
    return torch.randn(spec.num_experts, hidden, generator=g) * spec.router_std


def upcycle_layer(spec: UpcycleSpec, layer: int, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor) -> dict:
    """A whole MoE layer (small models and tests): Megatron-layout tensors, fp32.

    fc1 (E, 2F_e, H) = [gate; up] per expert, fc2 (E, H, F_e), router (E, H).
    """
    dense = {"gate": gate, "up": up, "down": down}
    mats = {w: [expert_matrix(spec, w, dense[w], layer, e) for e in range(spec.num_experts)]
            for w in MATRICES}
    return {
        hm.EXPERT_FC1: hm.concat_gate_up(torch.stack(mats["gate"]), torch.stack(mats["up"])),
        hm.EXPERT_FC2: torch.stack(mats["down"]),
        hm.ROUTER: router_weight(spec, layer, gate.shape[1]),
    }


class UpcycledCheckpoint:
    """The upcycled MoE checkpoint as a producer of chunks (see `streaming.save_streaming`).

    `chunk(key, global_offsets, sizes)` returns that chunk of a Megatron checkpoint tensor,
    read lazily from the dense HF model: one dense layer is cached at a time (the writer goes
    layer by layer) and each expert matrix is computed from its dense slice only when asked.
    """

    def __init__(self, reader, spec: UpcycleSpec, preset, on_layer=None):
        self.reader, self.spec, self.preset = reader, spec, preset
        self.layout = hm.AttentionLayout.from_preset(preset)
        self.on_layer = on_layer
        self._index, self._layer, self._dense = None, {}, {}

    def _load_layer(self, i: int) -> None:
        p = hm.hf_layer_prefix(i)
        names = [*hm.HF_QKV, *hm.ATTENTION_RENAMES.values(), hm.HF_POST_ATTN_NORM, *hm.HF_DENSE]
        hf = {k[len(p):]: v for k, v in self.reader.get_many([p + n for n in names]).items()}
        self._dense = dict(zip(MATRICES, (hf.pop(n) for n in hm.HF_DENSE)))
        self._layer = hm.hf_to_mcore_layer(hf, self.layout, moe=True)
        self._layer[hm.ROUTER] = router_weight(self.spec, i, self.preset.hidden_size)
        self._index = i
        if self.on_layer is not None:
            self.on_layer(i)

    def _expert_fc1_rows(self, i: int, e: int, start: int, length: int) -> torch.Tensor:
        f = self.spec.expert_ffn  # fc1 rows [0, F_e) are gate, [F_e, 2F_e) up
        parts = [w for w, lo in (("gate", 0), ("up", f)) if start < lo + f and start + length > lo]
        full = torch.cat([expert_matrix(self.spec, w, self._dense[w], i, e) for w in parts])
        base = 0 if parts[0] == "gate" else f
        return full[start - base:start - base + length]

    def chunk(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        if not key.startswith(hm.MCORE_LAYERS):
            return hm.chunk_of(self.reader.get(hm.GLOBAL_RENAMES[key]), offsets, sizes)
        i, name = offsets[0], key[len(hm.MCORE_LAYERS):]
        if i != self._index:
            self._load_layer(i)
        if name == hm.EXPERT_FC1:
            e, start, length = offsets[1], offsets[2], sizes[2]
            full = self._expert_fc1_rows(i, e, start, length)
            return hm.chunk_of(full, (0, *offsets[3:]), (length, *sizes[3:])).reshape(sizes)
        if name == hm.EXPERT_FC2:
            full = expert_matrix(self.spec, "down", self._dense["down"], i, offsets[1])
            return hm.chunk_of(full, offsets, sizes)
        return hm.chunk_of(self._layer[name], offsets, sizes)
