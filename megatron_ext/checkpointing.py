"""Distributed checkpoints with Megatron-Core's `dist_checkpointing` (torch_dist format).

Layout (as Megatron-LM):  <root>/iter_0000100/  and  <root>/latest_checkpointed_iteration.txt

A save goes to `iter_XXXXXXX.tmp`, is renamed once every rank has finished writing, and only
then is the 'latest' marker replaced (write-then-rename). A process killed mid-save leaves a
`.tmp` directory that nothing points at; 'latest' still names the last complete checkpoint.

Each checkpoint holds: model weights (resharded freely across TP/PP/EP/DP on load), optimizer
state (fully reshardable with the plain optimizer; DP-reshardable with the distributed one),
scheduler, per-rank RNG state, iteration, consumed samples, and `marco_model.json`, the model
architecture, so that tools can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from megatron_ext.errors import CheckpointError
from megatron_ext.presets import ModelPreset

LATEST_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "marco_model.json"
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    iteration: int = 0
    consumed_samples: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a load found: the saved run's state, and facts about this load (not saved again)."""

    path: str  # the iteration directory read
    state: TrainState
    model_only: bool  # weights only: no optimizer state was loaded (upcycled/imported/--no-load-optim)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _sharding_metadata(optimizer_fully_reshardable: bool = False) -> dict:
    """How the distributed optimizer's state is laid out in the checkpoint.

    dp_reshardable (Megatron-LM's default) writes each rank's buffers as they are: fast, and
    loadable at another DP size only. fully_reshardable gathers them into per-parameter
    tensors on save (slower, more memory on DP rank 0) and loads at any TP/PP/EP/DP layout.
    The plain optimizer's state is per parameter either way. Loads read the choice back from
    the checkpoint's content metadata.
    """
    kind = "fully_reshardable" if optimizer_fully_reshardable else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "singleton_local_shards": False}


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _start_writer_helper_shielded() -> None:
    """Start dist_checkpointing's writer helpers with SIGTERM/SIGUSR1 blocked.

    The torch_dist writer sends its results through a multiprocessing Manager, a *spawned*
    process created at the first save and reused by every later one
    (`filesystem_async._get_write_results_queue`). Slurm delivers `--signal` and
    `scancel --signal` to every process of a job step (proctrack/cgroup), that helper
    included; with the default action it dies, and the save the signal asks for then fails
    with BrokenPipeError (multiprocessing's resource tracker, started alongside, is shielded
    the same way). Blocked signals are inherited through fork+exec and stay pending
    in the helper for its lifetime; in this process they are only deferred (unblocked right
    after), so the trainer's StopSignal still sees them.
    """
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or threading.current_thread() is not threading.main_thread():
        return
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        resource_tracker.ensure_running()  # spawned by the Manager's start otherwise; it
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # unblocks SIGTERM when done: re-block
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_checkpoint(
    root: str,
    state: TrainState,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    model_info: Optional[dict] = None,
    optimizer_fully_reshardable: bool = False,
) -> str:
    """Save on every rank (collective); returns the final checkpoint directory."""
    final = iteration_dir(root, state.iteration)
    tmp = f"{final}.tmp"
    _start_writer_helper_shielded()
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    metadata = _sharding_metadata(optimizer_fully_reshardable)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"] if len(model_chunks) == 1 else sharded, metadata=metadata)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["rng_state"] = _rng_state()
    sharded["train_state"] = dataclasses.asdict(state)
    sharded["checkpoint_version"] = CHECKPOINT_VERSION
    sharded["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    sharded["has_optimizer"] = optimizer is not None

    strategy = get_default_save_sharded_strategy()
    if dist.is_initialized() and _dp_group().size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, _dp_group())
    dist_checkpointing.save(sharded, tmp, sharded_strategy=strategy, content_metadata=metadata)
    _barrier()

    if _rank() == 0:
        if model_info is not None:
            _atomic_write_text(os.path.join(tmp, MODEL_FILE), json.dumps(model_info, indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, LATEST_FILE), str(state.iteration))
    _barrier()
    return final


def resolve_checkpoint_dir(path: str) -> str:
    """`path` may be a checkpoint root (with a 'latest' marker) or one iteration directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path}: no such checkpoint directory")
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    marker = os.path.join(path, LATEST_FILE)
    if not os.path.exists(marker):
        raise CheckpointError(
            f"--load {path}: neither a checkpoint (no metadata.json) nor a checkpoint root "
            f"(no {LATEST_FILE})"
        )
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {path}: {LATEST_FILE} holds {text!r}, not an iteration")
    ckpt = iteration_dir(path, int(text))
    if not os.path.exists(os.path.join(ckpt, "metadata.json")):
        raise CheckpointError(f"--load {path}: {LATEST_FILE} names {ckpt}, which is incomplete")
    return ckpt


def read_model_info(checkpoint: str) -> dict:
    """The architecture recorded with a checkpoint (root or iteration directory)."""
    path = os.path.join(resolve_checkpoint_dir(checkpoint), MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{checkpoint}: no {MODEL_FILE}; cannot tell the model architecture")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(
    path: str,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
) -> LoadedCheckpoint:
    """Load into the given model (and optimizer/scheduler when given and saved)."""
    ckpt = resolve_checkpoint_dir(path)
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as e:  # noqa: BLE001 - any unreadable common state means a bad checkpoint
        raise CheckpointError(f"--load {ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    sharded = _model_sharded_state_dict(model_chunks)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or _sharding_metadata()
    with_optimizer = optimizer is not None and common.get("has_optimizer", False)
    if with_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"] if len(model_chunks) == 1 else sharded, is_loading=True, metadata=metadata
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    # RNG states are per rank: restored only into the same world size, and never from a
    # weights-only checkpoint (upcycled or converted), which has none.
    with_rng = load_rng and common.get("has_optimizer", False) and common.get("world_size") == world
    if with_rng:
        sharded["rng_state"] = _rng_state()

    strategy = get_default_load_sharded_strategy(ckpt)
    if dist.is_initialized() and _dp_group().size() > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, _dp_group())
    try:
        loaded = dist_checkpointing.load(sharded, ckpt, sharded_strategy=strategy)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"--load {ckpt}: checkpoint does not match this model or is corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None

    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and with_optimizer and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    state = TrainState(**loaded.get("train_state", {}))
    return LoadedCheckpoint(ckpt, state, model_only=not with_optimizer)


def model_info(preset: ModelPreset, **extra: Any) -> dict:
    """What `marco_model.json` records: the effective architecture plus free-form extras."""
    return {"preset": dataclasses.asdict(preset), **extra}


def preset_from_checkpoint(path: str) -> ModelPreset:
    """The architecture a checkpoint was saved with (from its `marco_model.json`)."""
    info = read_model_info(path)
    try:
        return ModelPreset(**info["preset"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {MODEL_FILE} does not describe a model ({e})") from None
