"""Loading a checkpoint as a model to run: what the tools (generate, evaluate, routing
analysis, benchmarks), the teachers and loaded students share.

`load_model_from_checkpoint` reads the architecture the checkpoint records
(checkpointing.preset_from_checkpoint), resolves the expert backend for its shapes
(layer_spec.resolve_expert_backend), builds this rank's stage with the one builder
(model.build_stage) and loads the weights at the current parallel layout, whatever layout saved
them. `recorded_router` is the router a checkpoint was trained with: a loaded model scores with
its own router, never with the flags of the run that loads it.
"""

from __future__ import annotations

import torch

from megatron_ext import checkpointing
from megatron_ext.config import ModelOptions, MoEOptions
from megatron_ext.layer_spec import resolve_expert_backend
from megatron_ext.model import build_stage
from megatron_ext.parallel import ParallelLayout


def recorded_router(path: str, layout_from: MoEOptions = MoEOptions()) -> MoEOptions:
    """The MoE options to score with a checkpoint's model: its router as trained (what the
    checkpoint records of --moe-router-score-function and --moe-router-enable-expert-bias;
    softmax without bias when it records none: imported and upcycled checkpoints), dropless,
    and `layout_from`'s token dispatcher (a choice of the layout, not of the model). Loaded
    students and in-process teachers both take their router from here, never from the flags of
    the run that loads them."""
    router = checkpointing.read_model_info(path).get("run", {}).get("moe_router", {})
    return MoEOptions(router_score_function=router.get("score_function", "softmax"),
                      enable_expert_bias=router.get("expert_bias", False),
                      token_dispatcher=layout_from.token_dispatcher)


def load_model_from_checkpoint(path: str, expert_backend: str = "sequential",
                               params_dtype: torch.dtype = torch.float32):
    """Build the model a checkpoint describes (this rank's stage, at the current parallel
    layout) and load its weights. Megatron's parallel state must be initialised
    (`parallel.init_distributed`); the checkpoint may have been saved at any TP/PP/EP layout.
    `expert_backend`: a --moe-expert-backend choice (`auto` included), resolved for the
    checkpoint's shapes by layer_spec.resolve_expert_backend. Returns (model, preset)."""
    preset = checkpointing.preset_from_checkpoint(path)
    backend = resolve_expert_backend(expert_backend, params_dtype, preset,
                                     ParallelLayout.current().expert_tensor)
    options = ModelOptions(params_dtype=params_dtype, expert_backend=backend,
                           moe=recorded_router(path))
    model, _ = build_stage(preset, options)
    checkpointing.load_checkpoint(path, [model], load_rng=False)
    return model, preset
