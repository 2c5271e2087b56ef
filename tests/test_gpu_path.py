"""The GPU path around the training loop, checked on CPU: loading, generation, teachers.

What a first GPU run hit before any number came out, each fixed in one place and tested here
where the path runs on CPU (tests/test_gpu.py holds the `-m gpu` twins):
  - every parameter and buffer is built on the run's device by the model builder (a model
    loaded from a checkpoint had its norms and routers on the CPU, its linears on the GPU);
  - generation never drops tokens: a student trained with a capacity factor rolls out what the
    same weights without one roll out;
  - an in-process Megatron teacher routes as its checkpoint records, whatever the student's
    router flags;
  - the distributed optimizer's torch-Adam fix follows Megatron's own HAVE_APEX_OR_TE;
  - context parallelism with sft/opd and FP8 with opd are refused at parse time in one line.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.config import ModelOptions, MoEOptions
from megatron_ext.presets import get_preset


def _tiny(**changes):
    return dataclasses.replace(get_preset("tiny"), vocab_size=512, **changes)


# ------------------------------------------------------------------------------ 1. devices
def _devices(model) -> dict[str, str]:
    return {name: t.device.type for name, t in
            [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("backend", ["sequential", "torch-grouped"])
def test_builder_puts_every_parameter_and_buffer_on_the_run_device(backend, monkeypatch,
                                                                   megatron_single_rank):
    """Built for a device that is not the default one (meta stands in for a GPU), nothing of
    the model may stay behind on the CPU: not our RMSNorm, not Megatron's router weight, not
    the expert-bias buffers Megatron creates on a fixed device."""
    from megatron_ext import model as model_mod

    monkeypatch.setattr(model_mod, "run_device", lambda: torch.device("meta"), raising=False)
    moe = MoEOptions(enable_expert_bias=True, router_score_function="sigmoid")
    model, _ = model_mod.build_stage(_tiny(), ModelOptions(expert_backend=backend, moe=moe))
    devices = _devices(model)
    elsewhere = {n: d for n, d in devices.items() if d != "meta"}
    assert not elsewhere, f"not on the run's device: {sorted(elsewhere)[:5]}"
    assert any("router.expert_bias" in n for n in devices)
    assert any("layernorm" in n or "layer_norm" in n for n in devices)
