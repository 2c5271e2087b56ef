"""Shared test helpers: one Megatron process-group setup per test process, and runners for
`pretrain_marco.py` in a subprocess (the way users run it): to completion (`run_pretrain`,
`pretrained_checkpoint`) or in the background (`start_pretrain`, `wait_for`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- CPU pin
# The suite is a CPU suite: on a GPU host a visible device would switch the defaults to
# bf16/NCCL and make every 2-process test ask for device 1. Unless the run selects GPU tests
# (`pytest -m gpu`), every test process and its subprocesses see no GPU. GPU tests
# (tests/test_gpu.py, marker `gpu`) are skipped, never run, in a CPU run, and skip themselves
# where CUDA is absent.
def _gpu_run(config) -> bool:
    expr = config.getoption("markexpr", "") or ""
    return "gpu" in expr.replace("not gpu", "")


def pytest_configure(config):
    if not _gpu_run(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


# ----------------------------------------------------------------------------- tests by kind
# `pytest -m unit`: in-process tests of one component, about a minute on 2 cores (the
# developer's loop). `pytest -m integration`: what starts processes (torchrun ranks, the entry
# points and tools as users run them, Slurm), trains a model as a fixture, or runs a pipeline
# end to end. A test is integration when its module is listed here or it is marked `slow`;
# every other test is unit. `pytest tests` (README, CI) runs both.
INTEGRATION_MODULES = frozenset({
    "test_bench", "test_cluster_path", "test_compat", "test_data_corpus", "test_data_pretraining",
    "test_docs", "test_evaluate", "test_generation", "test_gpu_path", "test_layout",
    "test_model_describe", "test_opd", "test_opd_steps", "test_parallel_layouts",
    "test_posttrain_sft", "test_precision", "test_quickstart", "test_reliability",
    "test_routing_replay", "test_run_features", "test_slurm", "test_slurm_preprocess",
    "test_slurm_real", "test_stage_check", "test_trainer", "test_upcycling_cli",
    "test_upcycling_layouts",
})


def kind_of(item) -> str:
    module = Path(str(item.fspath)).stem
    slow = item.get_closest_marker("slow") is not None
    return "integration" if slow or module in INTEGRATION_MODULES else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(kind_of(item))
    if _gpu_run(config):
        return
    skip = pytest.mark.skip(reason="GPU test: run with `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def load_tool(name: str):
    """tools/NAME.py as a module: its `main(argv)` runs in this process (no interpreter start)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "2")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_pretrain(*args: str, timeout: int = 600, env: dict | None = None, nproc: int = 1):
    """Run pretrain_marco.py (under torchrun when nproc > 1); returns CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), str(REPO / "pretrain_marco.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "pretrain_marco.py"), *args]
    # One thread per process when several share the 2 cores: oversubscribed OpenMP threads
    # spin against each other and can slow a step tenfold.
    env = env or subprocess_env(OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def pretrained_checkpoint(root: Path, *args: str) -> Path:
    """`pretrain_marco.py ARGS --save ROOT`, which must succeed; returns ROOT (the small
    checkpoint a module's tests share, made by a module-scoped fixture)."""
    result = run_pretrain(*args, "--save", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def start_pretrain(args: list[str], **env: str) -> subprocess.Popen:
    """pretrain_marco.py in the background (subprocess_env plus `env`), output piped, in a
    session of its own, so that a test can signal it (and its children) mid-run."""
    return subprocess.Popen([sys.executable, str(REPO / "pretrain_marco.py"), *args], cwd=REPO,
                            env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.05) -> bool:
    """Poll `predicate` every `poll` seconds: True once it holds; False when `proc` exits first
    or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_single_rank = {"made": False}


def _init_single_rank() -> None:
    from megatron_ext import parallel
    from megatron_ext.parallel import ParallelLayout

    parallel.init_distributed(ParallelLayout(), seed=1234)


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron's parallel state for one process (gloo), set up once per test session (and
    made again before a test that uses it when an in-process run before it tore it down:
    pytest_runtest_setup below), so no test depends on which tests ran before it."""
    warnings.filterwarnings("ignore", category=UserWarning)
    from megatron_ext import parallel

    _init_single_rank()
    _single_rank["made"] = True
    yield
    _single_rank["made"] = False
    parallel.shutdown()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if not (_single_rank["made"] and "megatron_single_rank" in item.fixturenames):
        return
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        _init_single_rank()


@pytest.fixture
def fresh_moe_tracker():
    """Megatron's MoE globals as a fresh process has them (parallel_harness.reset_process_globals:
    the aux-loss tracker, sized by the first model built, and the aux-loss scale)."""
    from parallel_harness import reset_process_globals

    reset_process_globals()
    yield
    reset_process_globals()


@contextlib.contextmanager
def signal_handlers_given_back():
    """The block must leave the process's SIGTERM/SIGUSR1 handlers as it found them (a Trainer
    holds them only until train() ends or its set-up fails; a swallowed SIGTERM once hung a
    tool's worker pool). They are put back either way; a leftover fails the caller."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        left = {s: signal.getsignal(s) for s in saved}
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert left == saved, f"signal handlers left installed: {left}"


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
    """No test may leave a SIGTERM/SIGUSR1 handler in the test process."""
    with signal_handlers_given_back():
        yield
