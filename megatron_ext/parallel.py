"""Process groups: validate the 4D layout, start torch.distributed, set up Megatron's groups.

Data parallelism is what the world size leaves after tensor x context x pipeline
parallelism. Expert parallelism is carved out of tensor x context x data parallel ranks
(Megatron's "ep" dimension), so expert-parallel size x expert-tensor-parallel size must divide
TP x CP x DP. Virtual pipeline stages (interleaved 1F1B) split each pipeline rank's layers into
several model chunks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, rerun_state_machine, tensor_parallel

from megatron_ext import mcore_fixes
from megatron_ext.errors import LayoutError
from megatron_ext.presets import ModelPreset


def megatron_field(name: str, default):
    """A dataclass field that means what Megatron's `name` means (a Megatron-LM flag's dest,
    a TransformerConfig field, an `initialize_model_parallel` argument)."""
    return field(default=default, metadata={"megatron": name})


def megatron_names(cls) -> dict[str, str]:
    """{field: Megatron name} of the `megatron_field`s of the dataclass `cls`."""
    return {f.name: f.metadata["megatron"] for f in fields(cls) if "megatron" in f.metadata}


def megatron_values(options) -> dict:
    """{Megatron name: value} of the `megatron_field`s of a dataclass instance, e.g. a layout's
    sizes as `initialize_model_parallel` arguments and TransformerConfig fields."""
    return {name: getattr(options, f) for f, name in megatron_names(type(options)).items()}


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes; data parallelism is what the world size leaves."""

    tensor: int = megatron_field("tensor_model_parallel_size", 1)
    pipeline: int = megatron_field("pipeline_model_parallel_size", 1)
    expert: int = megatron_field("expert_model_parallel_size", 1)
    expert_tensor: int = megatron_field("expert_tensor_parallel_size", 1)
    sequence_parallel: bool = False
    context: int = megatron_field("context_parallel_size", 1)
    # --num-virtual-stages-per-pipeline-rank
    virtual_pipeline: Optional[int] = megatron_field("virtual_pipeline_model_parallel_size", None)

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (virtual pipeline stages)."""
        return self.virtual_pipeline or 1

    @classmethod
    def current(cls) -> "ParallelLayout":
        """The layout of Megatron's initialised parallel state."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return cls(
            tensor=tp,
            pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
            expert=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor=parallel_state.get_expert_tensor_parallel_world_size(),
            sequence_parallel=tp > 1,
            context=parallel_state.get_context_parallel_world_size(),
            virtual_pipeline=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )


def is_rank_zero() -> bool:
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_layout(layout: ParallelLayout, preset: ModelPreset, world_size: int) -> int:
    """Check every divisibility rule before any model is built; returns the DP size."""
    tp, pp, ep, etp = layout.tensor, layout.pipeline, layout.expert, layout.expert_tensor
    cp = layout.context
    for flag, size in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--expert-model-parallel-size", ep),
        ("--expert-tensor-parallel-size", etp),
        ("--context-parallel-size", cp),
    ):
        if size < 1:
            raise LayoutError(f"{flag} must be >= 1, got {size}")
    if world_size % (tp * cp * pp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--context-parallel-size {cp} x --pipeline-model-parallel-size {pp}"
            if cp > 1 else
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    dp = world_size // (tp * cp * pp)
    if (tp * cp * dp) % (ep * etp):
        ranks = f"({tp} x {cp} x {dp} = {tp * cp * dp})" if cp > 1 else f"({tp} x {dp} = {tp * dp})"
        raise LayoutError(
            f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} must divide "
            f"tensor x {'context x ' if cp > 1 else ''}data parallel ranks {ranks} of world "
            f"size {world_size}"
        )
    if preset.num_layers % pp:
        raise LayoutError(
            f"{preset.num_layers} layers of preset {preset.name!r} are not divisible by "
            f"--pipeline-model-parallel-size {pp}"
        )
    _validate_virtual_pipeline(layout, preset)
    if cp > 1 and preset.seq_length % (2 * cp):
        raise LayoutError(f"--seq-length {preset.seq_length} must be a multiple of 2 x "
                          f"--context-parallel-size {cp} (load-balanced causal chunks)")
    if preset.num_attention_heads % tp or preset.num_query_groups % tp:
        raise LayoutError(
            f"{preset.num_attention_heads} attention heads / {preset.num_query_groups} key-value "
            f"heads of preset {preset.name!r} are not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if preset.vocab_size % tp:
        raise LayoutError(
            f"vocabulary {preset.vocab_size} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if preset.is_moe:
        if preset.num_experts % ep:
            raise LayoutError(
                f"{preset.num_experts} experts are not divisible by "
                f"--expert-model-parallel-size {ep}"
            )
        if preset.moe_ffn_hidden_size % etp:
            raise LayoutError(
                f"expert FFN size {preset.moe_ffn_hidden_size} is not divisible by "
                f"--expert-tensor-parallel-size {etp}"
            )
        if tp > 1 and not layout.sequence_parallel:
            raise LayoutError(
                "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel "
                "(Megatron-Core requirement)"
            )
    elif ep > 1:
        raise LayoutError(
            f"--expert-model-parallel-size {ep} given for dense preset {preset.name!r}"
        )
    return dp


def _validate_virtual_pipeline(layout: ParallelLayout, preset: ModelPreset) -> None:
    vpp, pp = layout.virtual_pipeline, layout.pipeline
    if vpp is None:
        return
    if vpp < 1:
        raise LayoutError(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {vpp}")
    if pp < 2:
        raise LayoutError("--num-virtual-stages-per-pipeline-rank needs "
                          "--pipeline-model-parallel-size >= 2 (interleaved pipeline schedule)")
    if preset.num_layers % (pp * vpp):
        raise LayoutError(
            f"{preset.num_layers} layers of preset {preset.name!r} are not divisible by "
            f"--pipeline-model-parallel-size {pp} x --num-virtual-stages-per-pipeline-rank {vpp}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(layout: ParallelLayout, seed: int, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's parallel groups.

    Works under torchrun/srun (env:// rendezvous) and as a plain single process.
    """
    mcore_fixes.install()  # Megatron-Core fixes on their conditions; CPU adaptations w/o CUDA
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank = int(os.environ.get("RANK", "0"))
        world_size = world_size_from_env()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        **megatron_values(layout), distributed_timeout_minutes=timeout_minutes)
    # Same seed on every rank: CPU initialisation builds each full weight and keeps this rank's
    # shard, so tensor-parallel ranks must draw identical master weights.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # Megatron's NaN/rerun checker is off (its default); initialising it says so explicitly.
    # Destroy first: it is a process-wide singleton and this function may run twice.
    rerun_state_machine.destroy_rerun_state_machine()
    rerun_state_machine.initialize_rerun_state_machine()


def shutdown() -> None:
    rerun_state_machine.destroy_rerun_state_machine()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process(seed: int = 0):
    """Megatron's parallel state for one process (the offline tools). A caller that already
    holds a single-rank state (a test process) keeps it: it is neither re-made nor torn down."""
    held = (dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and parallel_state.get_expert_model_parallel_world_size() == 1)
    if not held:
        init_distributed(ParallelLayout(), seed)
    try:
        yield
    finally:
        if not held:
            shutdown()
