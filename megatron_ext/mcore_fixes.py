"""Fixes for Megatron-Core bugs, on any device: most on the path without TransformerEngine/apex.

Two kinds of adaptation keep Megatron-Core running here, and they are installed on different
conditions:

  cpu_compat.py    the machine has no CUDA: device "cuda" -> CPU, no-op streams, a CPU RNG
                   tracker, gloo's collectives. Never installed on a GPU.
  this module      Megatron-Core itself is wrong: on the code path it takes without
                   TransformerEngine or apex, with fp32 parameters, or (moe_aux_loss_tp_scale)
                   everywhere. A GPU without TE (the `torch-grouped` expert backend exists for
                   exactly that GPU) takes the TE-less path too, so each fix is installed on
                   its own condition (TE/apex absent, the Megatron-Core releases known to carry
                   the bug), whatever the device.

`install()` is the one entry (called by `parallel.init_distributed`): it installs the fixes
that `plan()` selects for this process and, without CUDA, the CPU adaptations. `plan(env)` is a
pure function of (CUDA?, TE?, a fused Adam?, Megatron-Core version), so the selection is tested on any
machine for every case (tests/test_compat.py).

The fixes (Megatron-Core lines as of 0.16.1; "read in" = the same code was read in that
release's source):
  te_general_gemm_name          moe_utils.py binds `te_general_gemm` only inside its
                                `try: import transformer_engine`, yet `router_gating_linear`
                                tests `te_general_gemm is not None`: without TE every MoE
                                forward raises NameError. Fixed in 0.17.0 (binds None).
  dist_optimizer_torch_adam_step  the distributed optimizer without a fused Adam (Megatron's
                                `HAVE_APEX_OR_TE` False: neither TE's nor apex's imports, which
                                can happen with TE installed) keeps torch Adam's
                                per-parameter 'step' and mishandles it on checkpoint load
                                (assertion on an empty state, KeyError 'step', one shared step
                                tensor). Read unchanged in 0.17.0, 0.18.0, 0.19.0.
  dist_optimizer_fp32_load      `load_parameter_state_from_dp_reshardable` copies into the main
                                params without torch.no_grad(); with fp32 params the main param
                                is a view of the model param (RuntimeError). Any TE/apex state.
                                Read unchanged in 0.17.0, 0.18.0, 0.19.0.
  checkpoint_without_output_fp8 tensor_parallel.CheckpointWithoutOutput(fp8=False) sets
                                `self.fp8 = fp8 is not None` (True), then calls TE's
                                FP8GlobalStateManager, unbound without TE: selective recompute
                                of `layernorm` and `moe_act` raises NameError. Read unchanged in
                                0.17.0, 0.18.0, 0.19.0.
  moe_aux_loss_tp_scale         with calculate_per_token_loss (set by model.py), the router
                                scales its load-balancing and z-loss by its *local* token count,
                                which sequence parallelism / CP divides by the TP x CP size,
                                while finalize_model_grads divides by the full count: at TP = 2
                                those gradients were half of one process's (router grads 25% off
                                in the parallel-layout tests). Megatron-LM PR #5047 multiplies by
                                the TP x CP size (first released in 0.19.0); here only
                                where the count is the rank's own (no padding mask: with one,
                                Megatron already passes the group's count). Any TE/apex state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from packaging.version import Version

from megatron_ext import cpu_compat

_installed: set[str] = set()


@dataclass(frozen=True)
class Environment:
    """What decides which fixes apply."""

    cuda: bool
    have_te: bool  # TransformerEngine imports (Megatron-Core's moe_utils.HAVE_TE)
    have_apex_or_te: bool  # a fused Adam imports, TE's or apex's (distrib_optimizer.HAVE_APEX_OR_TE)
    mcore_version: str


def current_environment() -> Environment:
    from megatron.core import package_info
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.transformer.moe import moe_utils

    # Megatron-Core's own verdicts: TE for its MoE helpers; apex or TE's FusedAdam for the
    # distributed optimizer (`HAVE_APEX_OR_TE`, False when neither optimizer imports).
    return Environment(
        cuda=torch.cuda.is_available(),
        have_te=bool(moe_utils.HAVE_TE),
        have_apex_or_te=bool(distrib_optimizer.HAVE_APEX_OR_TE),
        mcore_version=package_info.__version__,
    )


def _in(version: str, low: str, high: str) -> bool:
    v = Version(version)
    return Version(low) <= Version(v.base_version) < Version(high)


# name -> (condition on the environment, what it fixes)
_CONDITIONS: dict[str, Callable[[Environment], bool]] = {
    "te_general_gemm_name": lambda e: not e.have_te and _in(e.mcore_version, "0.16", "0.17"),
    # Megatron's own condition for torch's Adam inside the distributed optimizer: neither TE's
    # nor apex's FusedAdam imports (TE may import while its optimizers do not).
    "dist_optimizer_torch_adam_step": lambda e: (not e.have_apex_or_te
                                                 and _in(e.mcore_version, "0.16", "0.20")),
    "dist_optimizer_fp32_load": lambda e: _in(e.mcore_version, "0.16", "0.20"),
    "checkpoint_without_output_fp8": lambda e: not e.have_te and _in(e.mcore_version, "0.16", "0.20"),
    "moe_aux_loss_tp_scale": lambda e: _in(e.mcore_version, "0.16", "0.19"),
}
CPU_ADAPTATIONS = "cpu_compat"


def plan(env: Environment) -> list[str]:
    """The fixes to install in `env`, in order; "cpu_compat" (the CPU adaptations) last."""
    names = [name for name, applies in _CONDITIONS.items() if applies(env)]
    return names + ([] if env.cuda else [CPU_ADAPTATIONS])


def install() -> list[str]:
    """Install what `plan` selects for this process (idempotent); returns the names."""

    names = plan(current_environment())
    for name in names:
        if name in _installed:
            continue
        if name == CPU_ADAPTATIONS:
            cpu_compat.enable()
        else:
            _INSTALLERS[name]()
        _installed.add(name)
    return names


def installed() -> list[str]:
    return sorted(_installed)


# --------------------------------------------------------------------------------------------
# te_general_gemm_name: transformer/moe/moe_utils.py (0.16) imports te_general_gemm inside
# `try: import transformer_engine ... except ImportError: HAVE_TE = False` and later, in
# router_gating_linear, evaluates `te_general_gemm is not None`.
# --------------------------------------------------------------------------------------------
def _te_general_gemm_name() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------------
# dist_optimizer_torch_adam_step: optimizer/distrib_optimizer.py without apex/TE
# (`HAVE_APEX_OR_TE` False, torch.optim.Adam inside) keeps torch Adam's per-parameter 'step'
# and mishandles it in three places (a, b, d).
# --------------------------------------------------------------------------------------------
def _dist_optimizer_torch_adam_step() -> None:
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # (a) DistributedOptimizer.state_dict asserts exactly one 'step' value across torch Adam's
    # per-parameter state; sharded_state_dict(is_loading=True) calls it before any step, while
    # that state is still empty (AssertionError). Give a fresh optimizer the state torch's Adam
    # would create on its first step (step 0, zero moments); loading overwrites it.
    original_sharded = DistributedOptimizer.sharded_state_dict

    @functools.wraps(original_sharded)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
        inner = self.optimizer
        if is_loading and not distrib_optimizer.HAVE_APEX_OR_TE and not inner.state:
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }
        return original_sharded(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    # (b) load_parameter_state_from_fully_reshardable leaves 'step' out of the loaded tensors
    # ("Handle torch Adam 'step' state separately"), but _set_main_param_and_optimizer_states
    # fills every key of torch's per-parameter state from them: KeyError 'step'. Keep the
    # current value for that key; (d) sets it.
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not distrib_optimizer.HAVE_APEX_OR_TE and "step" not in tensors:
            current = self._get_main_param_and_optimizer_states(model_param)
            if "step" in current:
                tensors = {**tensors, "step": current["step"]}
        original_set(self, model_param, tensors)

    # (d) load_state_dict sets `s["step"] = step` for every parameter with ONE shared tensor,
    # which torch's Adam then increments once per parameter per iteration; and the
    # dp_reshardable load afterwards copies each 'step' from the template of (a), not from the
    # checkpoint. Either way Adam's bias correction after a resume was wrong (the loss of the
    # second step after a resume was 4e-3 off). Each parameter gets its own tensor holding the
    # checkpoint's step, on the device of its moments.
    original_load_state_dict = DistributedOptimizer.load_state_dict

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, device=state["step"].device)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict


# --------------------------------------------------------------------------------------------
# dist_optimizer_fp32_load: optimizer/distrib_optimizer.py load_parameter_state_from_dp_reshardable
# copies into the main params without torch.no_grad() (its fs_model_space sibling has it). With
# fp32 params a main param is a view of the model param, a leaf that requires grad:
# RuntimeError "a view of a leaf Variable that requires grad is being used in an in-place
# operation".
# --------------------------------------------------------------------------------------------
def _dist_optimizer_fp32_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_parameter_state_from_dp_reshardable
    DistributedOptimizer.load_parameter_state_from_dp_reshardable = functools.wraps(original)(
        torch.no_grad()(original)
    )


# --------------------------------------------------------------------------------------------
# checkpoint_without_output_fp8: tensor_parallel/random.py CheckpointWithoutOutput.__init__(fp8=False)
# does `self.fp8 = fp8 is not None`, so every caller that passes nothing (transformer_layer.py's
# layernorm recompute, experts.py's moe_act recompute) gets fp8 = True, and
# CheckpointWithoutOutputFunction.forward then evaluates FP8GlobalStateManager, a name bound
# only when TransformerEngine imports. Without TE no FP8 can be on: fp8 False means no FP8.
# --------------------------------------------------------------------------------------------
def _checkpoint_without_output_fp8() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    cls = mcore_random.CheckpointWithoutOutput
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, fp8=False, *args, **kwargs):
        original(self, fp8, *args, **kwargs)
        if not fp8:
            self.fp8 = False

    cls.__init__ = __init__


# --------------------------------------------------------------------------------------------
# moe_aux_loss_tp_scale: transformer/moe/router.py TopKRouter, with calculate_per_token_loss.
# Every gradient is divided by the global token count in finalize_model_grads, so the router
# multiplies its aux losses by the token count to leave them a per-micro-batch mean. It uses
# the count of the tokens it sees, which under sequence parallelism (and CP) is 1 / (TP x CP)
# of the sequence; the router weight's partial gradients are then summed over TP. Net: the
# load-balancing and z-loss gradients are 1 / (TP x CP) of what one process computes.
# Megatron-LM #5047 (0.19.0) multiplies both by tp_cp_group.size(). Here:
#   load-balancing loss  each rank's share is a partial sum of one global loss, so every rank
#                        must scale it by the same, global count: the count over the TP x CP
#                        group. Without a padding mask Megatron passes the rank's own rows, and
#                        the shards are equal: local x TP x CP (as #5047). With one (OPD's
#                        right-padded rows) the count it passes is already the group's total,
#                        because get_tokens_per_expert_and_token_count all-reduces the local
#                        per-expert counts in place before summing them (0.16.1; the OPD TP=2
#                        test checks it): left as is. #5047 multiplies that one by TP x CP too.
#   z-loss               a mean over the rank's own tokens: its coefficient times TP x CP for
#                        the call (apply_z_loss divides it by TP x CP, then multiplies by the
#                        local count: local mean x local count = local sum, exact with padding
#                        too); the logged z-loss (loss / coefficient) is unchanged.
# Without calculate_per_token_loss both paths are right and left alone.
# --------------------------------------------------------------------------------------------
def _moe_aux_loss_tp_scale() -> None:
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    original_attach = TopKRouter.attach_and_log_load_balancing_loss
    attach_signature = inspect.signature(original_attach)

    @functools.wraps(original_attach)
    def attach_and_log_load_balancing_loss(self, *args, **kwargs):
        shards = self.tp_cp_group.size()
        if not self.calculate_per_token_loss or shards == 1:
            return original_attach(self, *args, **kwargs)
        bound = attach_signature.bind(self, *args, **kwargs)
        count = bound.arguments.get("valid_token_count")
        if count is None:
            count = bound.arguments["activation"].shape[0]
        if not torch.is_tensor(count):
            # Without a padding mask: the router's own rows; the shards are equal.
            bound.arguments["valid_token_count"] = count * shards
        # With one, the count is a tensor and already the group's: the helper computing it
        # (moe_utils.get_tokens_per_expert_and_token_count) all-reduces its per-expert
        # counts in place, so its "local" count is the sum over the TP x CP group. Left as is.
        return original_attach(*bound.args, **bound.kwargs)

    original_z_loss = TopKRouter.apply_z_loss

    @functools.wraps(original_z_loss)
    def apply_z_loss(self, logits, *args, **kwargs):
        shards = self.tp_cp_group.size()
        coeff = self.config.moe_z_loss_coeff
        if not self.calculate_per_token_loss or shards == 1 or coeff is None:
            return original_z_loss(self, logits, *args, **kwargs)
        self.config.moe_z_loss_coeff = coeff * shards  # shared config: restored below
        try:
            return original_z_loss(self, logits, *args, **kwargs)
        finally:
            self.config.moe_z_loss_coeff = coeff

    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    TopKRouter.apply_z_loss = apply_z_loss


_INSTALLERS: dict[str, Callable[[], None]] = {
    "te_general_gemm_name": _te_general_gemm_name,
    "dist_optimizer_torch_adam_step": _dist_optimizer_torch_adam_step,
    "dist_optimizer_fp32_load": _dist_optimizer_fp32_load,
    "checkpoint_without_output_fp8": _checkpoint_without_output_fp8,
    "moe_aux_loss_tp_scale": _moe_aux_loss_tp_scale,
}
