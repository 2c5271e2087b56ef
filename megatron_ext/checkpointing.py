"""Distributed checkpoints with Megatron-Core's `dist_checkpointing` (torch_dist format).

Layout (as Megatron-LM):  <root>/iter_0000100/  and  <root>/latest_checkpointed_iteration.txt

A save goes to `iter_XXXXXXX.tmp`, is renamed once every rank has finished writing, and only
then is the 'latest' marker replaced (write-then-rename). A process killed mid-save leaves a
`.tmp` directory that nothing points at; 'latest' still names the last complete checkpoint.
A save that fails (disk full, I/O error) removes its `.tmp` and raises one CheckpointError;
the run then stops (as Megatron-LM and torchtitan do), and 'latest' still names the last
good checkpoint.

Each checkpoint holds: model weights (resharded freely across TP/PP/EP/DP on load), optimizer
state (fully reshardable with the plain optimizer; DP-reshardable with the distributed one),
scheduler, per-rank RNG state, iteration, consumed samples, and `marco_model.json`, the model
architecture, so that tools can rebuild the model from the checkpoint alone.

The save directory belongs to one run at a time (`claim_save_directory`, before step 1):

* an advisory lock (`flock` on `<root>/.marco_save.lock`, naming the holder's host and PID),
  which the kernel drops when the holder dies however it dies: a second run on the same
  directory is a one-line error, a crashed or killed one never leaves it held;
* a directory that holds checkpoints is refused unless this run resumes from it (`--load`
  names it or one of its iterations) or `--overwrite-save` says to replace them; a resume from
  an iteration older than the directory's 'latest' (a rewind) needs `--overwrite-save` too;
* with `--overwrite-save` the checkpoints this run does not continue stay until its first save
  is complete, and are deleted then: a run that fails early loses nothing;
* leftovers of interrupted saves (`iter_N.tmp`, a checkpoint moved aside while replaced) are
  cleaned or restored under the lock, the directory is checked writable, and its free space
  against the size of one checkpoint (`flops.checkpoint_bytes`).

Each save keeps two invariants on its own (also for callers without a claim): an existing,
committed `iter_N` is replaced only by the run that loaded or wrote it (or with
`--overwrite-save`), and 'latest' never moves back. A replaced `iter_N` is moved aside and
deleted only after its successor is in place.

The checkpoint writer's helper processes (a Manager spawned at the first save with SIGTERM
and SIGUSR1 blocked, so that Slurm's signal cannot kill the save it asks for, and the workers
it forks during a save) die with the trainer, kill -9 included (`megatron_ext/lifeline.py`).

`--load` is checked before any model is built (`check_loadable`): the files a torch_dist
checkpoint needs (metadata.json, common.pt, .metadata, and every tensor file as long as
.metadata indexes it) and the architecture in `marco_model.json` against this run's model.
torch's `CheckpointException` derives from BaseException; it is caught by name.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext import lifeline
from megatron_ext.cli import human_bytes
from megatron_ext.errors import CheckpointError
from megatron_ext.presets import PRESETS, ModelPreset

log = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "marco_model.json"
RUN_CONFIG_FILE = "marco_run_config.json"  # the run's whole RunConfig (config.RunConfig.to_json)
LOCK_FILE = ".marco_save.lock"
CHECKPOINT_VERSION = 1
_ITER = re.compile(r"iter_(\d{7})")
_ASIDE = re.compile(r"(iter_\d{7})\.old-\d+")  # a checkpoint moved aside while being replaced


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


def _agree(error: Optional[str]) -> None:
    """Raise CheckpointError(error) on every rank when rank 0 found one (collective)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)


def _cause(e: BaseException) -> str:
    """The root failure of a save or load, in one line (CheckpointException wraps per-rank ones)."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            return _cause(failure[0] if isinstance(failure, tuple) else failure)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    cause = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    if not text and cause is not None:
        return _cause(cause)
    if text and "unexpected pos" in text[0]:  # torch's zip writer after a failed write()
        return f"a file write was cut short: {text[0]}"
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------
# The writer helper
# ------------------------------------------------------------------------------------------
_WRITER_MANAGER = None  # the Manager serving dist_checkpointing's write-results queue
_SAVING = False  # dist_checkpointing.save is running (its writer forks worker processes)
_FORK = {"from_main": False, "parent": 0}  # set in the parent just before each fork


def _before_fork() -> None:
    _FORK["from_main"] = threading.current_thread() is threading.main_thread()
    _FORK["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    """The torch_dist writer forks its worker processes (`write_preloaded_data_multiproc`);
    one whose parent is killed mid-save waits forever on a queue lock the parent held. Forks
    made during a save, from the main thread (the death signal follows the forking thread),
    die with the trainer."""
    _close_locks_in_child()
    if _SAVING and _FORK["from_main"]:
        lifeline.die_with_parent(_FORK["parent"])


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _start_writer_helper_shielded() -> None:
    """Start dist_checkpointing's writer helpers with SIGTERM/SIGUSR1 blocked, tied to this
    process's life.

    The torch_dist writer sends its results through a multiprocessing Manager, a *spawned*
    process created at the first save and reused by every later one
    (`filesystem_async._get_write_results_queue`). Slurm delivers `--signal` and
    `scancel --signal` to every process of a job step (proctrack/cgroup), that helper
    included; with the default action it dies, and the save the signal asks for then fails
    with BrokenPipeError (multiprocessing's resource tracker, started alongside, is shielded
    the same way). Blocked signals are inherited through fork+exec and stay pending
    in the helper for its lifetime; in this process they are only deferred (unblocked right
    after), so the trainer's StopSignal still sees them.

    Because the helper ignores SIGTERM, it must not outlive the trainer: we start the Manager
    ourselves (what `_get_write_results_queue` does, plus an initializer) so that it dies with
    its parent (`lifeline.die_with_parent`: PR_SET_PDEATHSIG); the resource tracker exits by
    itself once the trainer and the helper, the holders of its pipe, are gone.
    """
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if (filesystem_async._results_queue is not None
            or threading.current_thread() is not threading.main_thread()):
        return
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        resource_tracker.ensure_running()  # spawned by the Manager's start otherwise; it
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # unblocks SIGTERM when done: re-block
        filesystem_async._results_queue = _writer_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _writer_results_queue():
    from multiprocessing.managers import SyncManager


    global _WRITER_MANAGER
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=lifeline.die_with_parent, initargs=(os.getpid(),))
    _WRITER_MANAGER = manager
    return manager.Queue()


# ------------------------------------------------------------------------------------------
# The save directory: one run at a time, nothing of another run replaced
# ------------------------------------------------------------------------------------------
@dataclass
class SaveDirectory:
    """A run's claim on its --save directory (the decisions are rank 0's)."""

    root: str
    overwrite: bool = False  # --overwrite-save, until this run's first save is complete
    resumed_from: Optional[int] = None  # the iteration of this directory the run loaded
    locked: bool = False
    saved: set = field(default_factory=set)  # iterations this run (process) wrote here
    stale: list = field(default_factory=list)  # deleted after the first save (--overwrite-save)

    def may_replace(self, iteration: int) -> bool:
        return self.overwrite or iteration == self.resumed_from or iteration in self.saved


_UNCLAIMED: dict[str, SaveDirectory] = {}  # saves by callers without a claim (tools, tests)
_LOCKS: dict[str, int] = {}  # realpath of a save root -> the fd of its lock, held by this process


def _latest(root: str) -> tuple[bool, Optional[int]]:
    """(marker exists, the iteration it names or None when unreadable)."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.exists(path):
        return False, None
    try:
        text = open(path).read().strip()
    except OSError:
        return True, None
    return True, int(text) if text.isdigit() else None


def _is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, "metadata.json"))


def _complete_iterations(root: str) -> list[int]:
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _ITER.fullmatch(name)
        if match and _is_complete(os.path.join(root, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def _close_locks_in_child() -> None:
    # A forked child shares the lock's open file description: were it to outlive the run, the
    # directory would stay locked. Its copy is closed; the parent's lock is unaffected.
    for fd in _LOCKS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKS.clear()


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    for _ in range(20):  # the holder writes right after taking the lock
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError, UnicodeDecodeError):
            info = None
        if isinstance(info, dict):
            return f"host {info.get('host')}, PID {info.get('pid')}, since {info.get('since')}"
        time.sleep(0.05)
    return "holder unknown"


def _lock(root: str) -> bool:
    """Take the directory's advisory lock; False where the file system has no flock."""
    key = os.path.realpath(root)
    if key in _LOCKS:  # this process holds it already (a second trainer in one process)
        return True
    path = os.path.join(root, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"--save {root} is not writable ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise CheckpointError(
            f"--save {root} is in use by another run ({holder}; lock {path}); wait for it to "
            "end or choose another --save directory") from None
    except OSError as e:  # e.g. NFS/Lustre mounted without flock support
        os.close(fd)
        log.warning(f"--save {root}: cannot lock the directory ({e.strerror}); make sure no "
                    "other run saves there")
        return False
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    except OSError:
        pass  # a full disk: the space check below says so
    _LOCKS[key] = fd  # forked children close their copy (_after_fork_in_child)
    return True


def release_save_directory(root: str) -> None:
    """Drop this process's lock on `root` (process exit does the same)."""
    fd = _LOCKS.pop(os.path.realpath(root), None)
    if fd is not None:
        os.close(fd)


def _check_writable(root: str) -> None:
    probe = os.path.join(root, f".marco_write_probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"--save {root} is not writable ({e.strerror})") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _clean_interrupted(root: str) -> None:
    """Leftovers of saves that were killed (only ever called under the lock)."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        aside = _ASIDE.fullmatch(name)
        if aside:
            final = os.path.join(root, aside.group(1))
            if not os.path.exists(final) and _is_complete(path):
                os.replace(path, final)  # killed between the two renames of a replacement
                log.warning(f"restored {final} (moved aside by a save that was interrupted)")
                continue
        elif not ((name.endswith(".tmp") and _ITER.fullmatch(name[:-4]))
                  or name == f"{LATEST_FILE}.tmp" or name.startswith(".marco_write_probe-")):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        log.info(f"removed {path} (left by an interrupted save)")


def _resumed_iteration(root: str, load: Optional[str]) -> Optional[int]:
    """The iteration of `root` that --load names, if it names one."""
    if not load:
        return None
    try:
        ckpt = resolve_checkpoint_dir(load)
    except CheckpointError:
        return None
    parent, name = os.path.split(os.path.realpath(ckpt))
    match = _ITER.fullmatch(name)
    return int(match.group(1)) if match and parent == os.path.realpath(root) else None


def _loads_from(root: str, load: Optional[str]) -> bool:
    """--load names `root` or one of its iterations."""
    if not load:
        return False
    try:
        ckpt = os.path.realpath(resolve_checkpoint_dir(load))
    except CheckpointError:
        return False
    return os.path.realpath(root) in (ckpt, os.path.dirname(ckpt))


def _check_ownership(d: SaveDirectory, load: Optional[str]) -> None:
    has_marker, latest = _latest(d.root)
    complete = _complete_iterations(d.root)
    if not (has_marker or complete):
        return
    held = (f"latest iteration {latest}" if latest is not None
            else f"{len(complete)} checkpoint(s), no readable {LATEST_FILE}")
    if d.resumed_from is None:
        if not d.overwrite and _loads_from(d.root, load):  # a fine-tune of its own directory
            raise CheckpointError(
                f"--save {d.root} holds the checkpoints --load {load} reads ({held}); this run "
                "starts a new run from their weights, so save to another directory, or pass "
                "--overwrite-save to replace them")
        if not d.overwrite:
            raise CheckpointError(
                f"--save {d.root} already holds checkpoints ({held}) that this run does not "
                f"resume (--load {load or 'not given'}); resume with --load {d.root}, save to "
                "an empty directory, or pass --overwrite-save to replace them")
        d.stale = complete
    elif latest is not None and latest > d.resumed_from:
        if not d.overwrite:
            raise CheckpointError(
                f"--load starts from iteration {d.resumed_from} of --save {d.root}, which holds "
                f"later checkpoints ({held}); saving here would replace them: pass "
                "--overwrite-save to rewind (the later ones are deleted at this run's first "
                "save) or choose another --save directory")
        d.stale = [n for n in complete if n > d.resumed_from]


def _check_space(root: str, needed: Optional[tuple[int, str]]) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(root).free
    if free < needed[0]:
        raise CheckpointError(
            f"--save {root}: {human_bytes(free)} free on its file system, but one checkpoint "
            f"needs about {human_bytes(needed[0])} ({needed[1]}); free some space or choose "
            "another --save directory")


def _claim(d: SaveDirectory, load: Optional[str], needed) -> None:
    created = not os.path.isdir(d.root)
    try:
        os.makedirs(d.root, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--save {d.root}: cannot create the directory ({e.strerror})") from None
    held_before = os.path.realpath(d.root) in _LOCKS
    try:
        d.locked = _lock(d.root)
        _check_writable(d.root)
        if d.locked:
            _clean_interrupted(d.root)
        _check_ownership(d, load)
        _check_space(d.root, needed)
    except BaseException:
        if not held_before:
            release_save_directory(d.root)
        if created:
            shutil.rmtree(d.root, ignore_errors=True)
        raise


def claim_save_directory(root: str, *, load: Optional[str] = None, finetune: bool = False,
                         overwrite: bool = False,
                         needed: Optional[tuple[int, str]] = None) -> SaveDirectory:
    """Make `root` this run's save directory, before step 1 (collective; see the module
    docstring). `load`/`finetune`: the run's --load and --finetune (a fine-tune starts a new
    run even from its own directory); `needed`: `flops.checkpoint_bytes(...)`. Raises one
    CheckpointError on every rank."""
    d = SaveDirectory(root, overwrite=overwrite,
                      resumed_from=None if finetune else _resumed_iteration(root, load))
    error = None
    if _rank() == 0:
        try:
            _claim(d, load, needed)
        except CheckpointError as e:
            error = str(e)
    _agree(error)
    return d


# ------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------
def _prepare_save(d: SaveDirectory, iteration: int, tmp: str) -> Optional[str]:
    """Rank 0, before anything is written: the save's two invariants, and a clean `tmp`."""
    root, final = d.root, iteration_dir(d.root, iteration)
    _, latest = _latest(root)
    if latest is not None and iteration < latest and not d.overwrite:
        return (f"--save {root}: its latest checkpoint is iteration {latest}; not saving "
                f"iteration {iteration}, which would move {LATEST_FILE} back (did another run "
                "save into this directory?)")
    committed = latest is None or iteration <= latest
    if _is_complete(final) and committed and not d.may_replace(iteration):
        return (f"--save {root}: {final} is a checkpoint of another run; not replacing it "
                "(--overwrite-save replaces another run's checkpoints)")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    except OSError as e:
        return f"--save {root}: cannot write {tmp} ({e.strerror})"
    return None


def _commit(d: SaveDirectory, iteration: int, tmp: str, model_info: Optional[dict],
            run_config: Optional[dict] = None) -> Optional[str]:
    """Rank 0: tmp -> iter_N (an existing one moved aside first), then 'latest'."""
    final = iteration_dir(d.root, iteration)
    aside, placed, free = None, False, None
    try:
        if model_info is not None:
            _atomic_write_text(os.path.join(tmp, MODEL_FILE), json.dumps(model_info, indent=2))
        if run_config is not None:
            _atomic_write_text(os.path.join(tmp, RUN_CONFIG_FILE), json.dumps(run_config, indent=1))
        if os.path.exists(final):
            aside = f"{final}.old-{os.getpid()}"
            os.replace(final, aside)
        os.replace(tmp, final)
        placed = True
        _atomic_write_text(os.path.join(d.root, LATEST_FILE), str(iteration))
    except OSError as e:
        free = _free(d.root)
        if placed:
            shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(f"{os.path.join(d.root, LATEST_FILE)}.tmp"):
            os.remove(f"{os.path.join(d.root, LATEST_FILE)}.tmp")
        if aside is not None and not os.path.exists(final):
            os.replace(aside, final)
        return _failed(d.root, iteration, _cause(e), free)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    d.saved.add(iteration)
    d.overwrite = False  # replaced what it was told to: from now on the invariants hold
    for n in d.stale:
        if n != iteration:
            shutil.rmtree(iteration_dir(d.root, n), ignore_errors=True)
            log.info(f"removed {iteration_dir(d.root, n)} (--overwrite-save)")
    d.stale = []
    return None


_FULL = 16 << 20  # less free space than this after a failed write: the file system is full


def _free(root: str) -> Optional[int]:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return None


def _failed(root: str, iteration: int, cause: str, free: Optional[int] = None) -> str:
    """The one line of a failed save. torch's writer reports a full disk as a short write
    ("unexpected pos"), without the errno: the free space measured before the partial files
    were removed says it."""
    _, latest = _latest(root)
    kept = (f"{LATEST_FILE} still names iteration {latest}" if latest is not None
            else "no checkpoint was saved before")
    full = ""
    if free is not None and free < _FULL:
        full = f"; the file system is full ({human_bytes(free)} free)"
    return f"--save {root}: saving iteration {iteration} failed ({cause}){full}; nothing written, {kept}"


def keep_iterations(iterations: list[int], keep_last: Optional[int],
                    keep_every: Optional[int]) -> set[int]:
    """The retention rule (--keep-last-checkpoints N, --keep-checkpoint-every K): the last N
    iterations, plus every multiple of K; all of them when N is None."""
    if keep_last is None:
        return set(iterations)
    kept = set(sorted(iterations)[-keep_last:])
    if keep_every:
        kept |= {n for n in iterations if n % keep_every == 0}
    return kept


def apply_retention(root: str, keep_last: Optional[int], keep_every: Optional[int]) -> list[int]:
    """Rank 0, after a commit: delete the complete checkpoints the rule does not keep (never
    the one 'latest' names). Returns the deleted iterations."""
    if keep_last is None:
        return []
    _, latest = _latest(root)
    present = _complete_iterations(root)
    kept = keep_iterations(present, keep_last, keep_every) | {latest}
    removed = [n for n in present if n not in kept]
    for n in removed:
        shutil.rmtree(iteration_dir(root, n), ignore_errors=True)
        log.info(f"removed {iteration_dir(root, n)} (--keep-last-checkpoints {keep_last}"
                 + (f", --keep-checkpoint-every {keep_every})" if keep_every else ")"))
    return removed


class AsyncSaves:
    """--async-save: Megatron-Core's AsyncCallsQueue of checkpoint writes (one forked writer
    per save). A save's commit (rename to iter_N, 'latest', retention) is its finalize step,
    run on every rank once every rank's write is done: at a later step's `poll()`, or at
    `wait()` (before the next save, before exit, and at the end of training)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.pending: list[tuple[str, int, str]] = []  # (root, iteration, tmp) being written

    def schedule(self, request, root: str, iteration: int, tmp: str) -> None:
        self.pending.append((root, iteration, tmp))
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        self._finalize(blocking=False)

    def wait(self) -> None:
        if self.pending:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        global _SAVING
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:
            root, iteration, tmp = self.pending.pop(0)
            free = _free(root)
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_failed(root, iteration, _cause(e), free)) from None
        finally:
            _SAVING = bool(self.queue.get_num_unfinalized_calls())
        del self.pending[:len(done)]


def save_checkpoint(
    root: str,
    state: TrainState,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    model_info: Optional[dict] = None,
    optimizer_fully_reshardable: bool = False,
    directory: Optional[SaveDirectory] = None,
    run_config: Optional[dict] = None,
    retention: tuple[Optional[int], Optional[int]] = (None, None),
    async_saves: Optional[AsyncSaves] = None,
) -> str:
    """Save on every rank (collective); returns the final checkpoint directory. `directory`:
    the run's `claim_save_directory(root)`; without one, the invariants still hold (a
    checkpoint this process did not write is never replaced, 'latest' never moves back).
    `run_config` (RunConfig.to_json) is saved beside `marco_model.json`; `retention`
    (keep last N, keep every K) is applied after the commit. With `async_saves` the write is
    scheduled in the background and committed by `async_saves.poll()/wait()`; the returned
    directory exists only then."""
    if async_saves is not None:
        async_saves.wait()  # one save in flight at a time: the previous one is committed first
    d = directory or _UNCLAIMED.setdefault(os.path.realpath(root), SaveDirectory(root))
    final = iteration_dir(root, state.iteration)
    tmp = f"{final}.tmp"
    _start_writer_helper_shielded()
    _agree(_prepare_save(d, state.iteration, tmp) if _rank() == 0 else None)
    _barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    metadata = _sharding_metadata(optimizer_fully_reshardable)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"] if len(model_chunks) == 1 else sharded, metadata=metadata)
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
    iteration = state.iteration

    def commit() -> None:
        _barrier()
        _agree(_commit(d, iteration, tmp, model_info, run_config) if _rank() == 0 else None)
        if _rank() == 0:
            apply_retention(root, *retention)
        _barrier()

    global _SAVING
    _SAVING = True
    try:
        request = dist_checkpointing.save(sharded, tmp, sharded_strategy=strategy,
                                          content_metadata=metadata,
                                          async_sharded_save=async_saves is not None)
        if async_saves is not None:
            request.add_finalize_fn(commit)
            async_saves.schedule(request, root, iteration, tmp)
            return final
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        free = _free(root)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_failed(root, state.iteration, _cause(e), free)) from None
    finally:
        _SAVING = async_saves is not None and bool(async_saves.pending)
    commit()
    return final


def read_run_config(checkpoint: str) -> dict:
    """The run configuration a checkpoint was saved with (`RUN_CONFIG_FILE`, JSON form of
    config.RunConfig); `checkpoint` is a root or one iteration directory."""
    ckpt = resolve_checkpoint_dir(checkpoint)
    path = os.path.join(ckpt, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt}: no {RUN_CONFIG_FILE} (saved by an older version, or "
                              "converted/upcycled rather than trained)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable run configuration ({e})") from None


# ------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------
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


def verify_checkpoint(ckpt: str, flag: str = "--load") -> None:
    """The files of the torch_dist checkpoint `ckpt` (an iteration directory) are all there
    and as long as its index says; else one CheckpointError naming the file. Reads the
    index (.metadata) and stats the tensor files: no tensor is read."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{flag} {ckpt}: {what}")

    try:
        with open(os.path.join(ckpt, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as e:
        raise bad(f"metadata.json is unreadable ({_cause(e)})") from None
    if not os.path.isfile(os.path.join(ckpt, "common.pt")):
        raise bad("common.pt is missing (iteration, optimizer flags, scheduler); the checkpoint "
                  "is incomplete")
    if backend != "torch_dist":
        return
    if not os.path.isfile(os.path.join(ckpt, ".metadata")):
        raise bad(".metadata is missing (the index of the tensor files); the checkpoint is "
                  "incomplete")
    try:
        index = FileSystemReader(ckpt).read_metadata()
    except (Exception, CheckpointException) as e:
        raise bad(f".metadata is truncated or corrupt ({_cause(e)})") from None
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise bad(f"{name} is missing (.metadata lists it)")
        have = os.path.getsize(path)
        if have < size:
            raise bad(f"{name} is truncated: {have:,} bytes, .metadata indexes {size:,}")


# Fields that do not change the weights: a run may train at another sequence length.
_NOT_ARCHITECTURE = ("name", "description", "seq_length", "max_position_embeddings")
_OVERRIDE_FLAGS = {"num_layers": "--num-layers", "num_experts": "--num-experts",
                   "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
                   "moe_router_topk": "--moe-router-topk"}


def check_model_matches(ckpt: str, preset: ModelPreset, flag: str = "--load") -> None:
    """This run's model against the architecture recorded in the checkpoint's
    marco_model.json (when it has one): one CheckpointError naming the first differing field."""
    path = os.path.join(ckpt, MODEL_FILE)
    if not os.path.exists(path):
        return  # an older checkpoint: the load compares the tensors themselves
    try:
        with open(path) as f:
            saved = ModelPreset(**json.load(f)["preset"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{flag} {ckpt}: {MODEL_FILE} does not describe a model ({_cause(e)})") from None
    for f in dataclasses.fields(ModelPreset):
        if f.name in _NOT_ARCHITECTURE:
            continue
        mine, theirs = getattr(preset, f.name), getattr(saved, f.name)
        if mine == theirs:
            continue
        named = PRESETS.get(preset.name)
        source = (_OVERRIDE_FLAGS[f.name] if f.name in _OVERRIDE_FLAGS and named is not None
                  and getattr(named, f.name) != mine else f"--preset {preset.name}")
        hint = f"; use --preset {saved.name}" if saved.name in PRESETS else ""
        raise CheckpointError(
            f"{flag} {ckpt}: the checkpoint's model has {f.name} = {theirs} ({MODEL_FILE}: "
            f"{saved.name!r}) but this run's has {f.name} = {mine} ({source}){hint}")


def check_loadable(path: str, preset: Optional[ModelPreset] = None) -> str:
    """Before any model is built: the checkpoint `path` resolves, is complete, and (with
    `preset`) holds this model. Returns the iteration directory."""
    ckpt = resolve_checkpoint_dir(path)
    verify_checkpoint(ckpt)
    if preset is not None:
        check_model_matches(ckpt, preset)
    return ckpt


def read_model_info(checkpoint: str) -> dict:
    """The architecture recorded with a checkpoint (root or iteration directory)."""
    path = os.path.join(resolve_checkpoint_dir(checkpoint), MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{checkpoint}: no {MODEL_FILE}; cannot tell the model architecture")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise CheckpointError(f"{path}: not a readable {MODEL_FILE} ({_cause(e)}); expected the "
                              "JSON object a save writes (the checkpoint is damaged)") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: {MODEL_FILE} holds {type(info).__name__}, expected the "
                              "JSON object a save writes (the checkpoint is damaged)")
    return info


# Entries a model may ask for that a checkpoint need not hold (they load as they were built):
#   `_extra_state`  TransformerEngine's FP8 metadata. TE's standalone norms (q/k, pre-MLP, final)
#                   and its core attention carry one; the non-TE spec's RMSNorm and SDPA
#                   attention carry none, so checkpoints of the two specs (CPU runs, upcycled and
#                   imported checkpoints vs TE runs) differ in these entries only.
#   `expert_bias`   a router's aux-loss-free balancing bias (--moe-router-enable-expert-bias):
#                   a checkpoint without one (upcycled, or trained without) starts from zero bias.
_OPTIONAL_ENTRY = re.compile(r"(_extra_state\d*|\.expert_bias)$")


def _optional_entry(key: str) -> bool:
    return bool(_OPTIONAL_ENTRY.search(key))


def _reconcile_model_request(model_parts: list, ckpt: str) -> None:
    """Drop from the model's sharded request the optional entries `ckpt` lacks (Megatron-LM
    instead retries a failed load non-strictly); a checkpoint whose routers carry expert
    biases that this model has no use for is refused (its routing would change silently)."""
    saved = {key.split("/shard_")[0] for key in load_sharded_metadata(ckpt)}
    requested = set()
    for part in model_parts:
        for name, value in list(part.items()):
            if isinstance(value, ShardedBase) and _optional_entry(value.key):
                requested.add(value.key)
                if value.key not in saved:
                    del part[name]
    biased = sorted(k for k in saved if k.endswith(".expert_bias") and k not in requested)
    if biased:
        raise CheckpointError(
            f"--load {ckpt}: its routers carry expert biases ({biased[0]}): load it with "
            "--moe-router-enable-expert-bias --moe-router-score-function sigmoid")


def _load_model_state(module, state: dict, ckpt: str) -> None:
    """`load_state_dict`, strict except for the optional entries above."""
    result = module.load_state_dict(state, strict=False)
    bad = [k for k in (*result.missing_keys, *result.unexpected_keys) if not _optional_entry(k)]
    if bad:
        raise CheckpointError(f"--load {ckpt}: the checkpoint does not match this model "
                              f"({len(bad)} entries differ, e.g. {bad[0]})")


def load_checkpoint(
    path: str,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
    preset: Optional[ModelPreset] = None,
) -> LoadedCheckpoint:
    """Load into the given model (and optimizer/scheduler when given and saved). With
    `preset`, the checkpoint's recorded architecture must be that one (`check_model_matches`)."""
    ckpt = check_loadable(path, preset)
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"--load {ckpt}: common.pt is unreadable ({_cause(e)})") from None
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
        _reconcile_model_request([v for k, v in sharded.items() if k.startswith("model")], ckpt)
        loaded = dist_checkpointing.load(sharded, ckpt, sharded_strategy=strategy)
        for i, chunk in enumerate(model_chunks):
            key = "model" if len(model_chunks) == 1 else f"model{i}"
            _load_model_state(_unwrap(chunk), loaded[key], ckpt)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"--load {ckpt}: the checkpoint does not match this model or is corrupt ({_cause(e)})"
        ) from None

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
