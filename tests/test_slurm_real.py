"""The Slurm scripts on a real Slurm: a private one-node cluster started for this module.

tests/test_slurm.py runs the scripts with stand-ins for sbatch, srun, scontrol and scancel; what
only Slurm itself can check is here (issue 19): that Slurm accepts every script's request with
the overrides docs/cluster.md gives (`sbatch --test-only`), and that the documented CPU
commands train: one stage, signalled with `scancel --signal=USR1`, saves, requeues itself and
resumes exactly (its losses equal an uninterrupted job's), and in a two-stage chain stage 2
starts only after stage 1 has finished, from stage 1's final checkpoint.

The cluster: munged, slurmctld and slurmd from Debian's `munge` and `slurm-wlm` (.ci/run
installs them when it runs as root with apt), configured under a temporary directory with
free ports, one node named localhost (`slurmd -C` describes it) with 8 stand-in GPUs (GRES
device files that point to /dev/null) so that the scripts' GPU request can be checked too.
Everything is stopped by PID at the end, whatever happened, jobs first. Without the binaries,
or when the daemons do not come up, the module is skipped, unless MARCO_REQUIRE_SLURM=1 (set
by .ci/run after installing them), which turns that into a failure.

Slurm holds a requeued job for about two minutes (Reason=BeginTime: the credential lifetime,
docs/cluster.md); the test releases it with `scontrol update JobId=N StartTime=now`, as a user
can, a few seconds after the requeue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, _free_port, subprocess_env

DOCS = (REPO / "docs" / "cluster.md").read_text()
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "squeue", "scontrol", "scancel", "srun")
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "DependencyNeverSatisfied"}
TAG = "MARCO_SLURM_TEST"  # in the environment of the daemons and of every job: cleanup finds them

# The commands docs/cluster.md gives (the tests check that they are there, then run them).
TEST_ONLY_CPU = "MARCO_CPU=1 bash slurm/submit_chain.sh --test-only --time=00:30:00 -- nano mini mini_global"
TEST_ONLY_GPU = "bash slurm/submit_chain.sh --test-only --nodes=1 -- nano mini mini_global"
ONE_STAGE = "MARCO_CPU=1 sbatch --nodes=1 --gpus-per-node=0 --time=00:30:00 slurm/mini_stage1.sbatch"
CHAIN = "MARCO_CPU=1 bash slurm/submit_chain.sh --time=00:30:00 -- slurm/mini_stage{1,2}.sbatch"
RELEASE = "scontrol update JobId=<jobid> StartTime=now"

# Two short stages over the bundled corpus: the CPU profile's 8 x 256 = 2048 tokens per step
# make stage 1 steps 1-12 and stage 2 steps 13-14.
CURRICULUM = """
data_root: "@sample"
sources:
  en: {prefix: en_train_text_document, lang: en}
  de: {prefix: de_train_text_document, lang: de}
stages:
  - {name: one, end: 24576, blend: {en: 3, de: 1}}
  - {name: two, end: 28672, blend: {en: 1, de: 3}}
"""
STAGE1_END, STAGE2_END = 12, 14
JOB_TIMEOUT = 600  # seconds; a job takes well under a minute on 2 idle cores


# ----------------------------------------------------------------------------- the cluster
class Cluster:
    """A running one-node Slurm under `root`; `env` is what its clients and jobs need."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in subprocess_env().items()
                    if not k.startswith(("SLURM_", "SBATCH_", "MARCO_", "SQUEUE_"))}
        path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/sbin", "/sbin",
                                self.env.get("PATH", "/usr/bin:/bin")])
        self.env.update(PATH=path, SLURM_CONF=str(root / "slurm.conf"), OMP_NUM_THREADS="1",
                        **{TAG: str(root)})

    def run(self, command: str | list[str], check: bool = True, timeout: float = 60,
            **env: str) -> subprocess.CompletedProcess:
        """A command (a string: through bash, as a user types it) from the repository root."""
        argv = ["bash", "-c", command] if isinstance(command, str) else command
        out = subprocess.run(argv, cwd=REPO, env={**self.env, **env}, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode:
            raise AssertionError(f"{command}: exit {out.returncode}\n{out.stdout}{out.stderr}")
        return out

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (completed jobs stay listed for MinJobAge). A query
        that fails is asked again: on a loaded machine an RPC can time out or break off."""
        for attempt in range(10):
            out = self.run(["scontrol", "-o", "show", "job", job], check=attempt == 9)
            if out.returncode == 0:
                return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)
            time.sleep(1)

    def wait_job(self, job: str, until, timeout: float, what: str) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job)
            if until(info):
                return info
            # e.g. an 8-node request on this one-node cluster: PENDING (PartitionConfig) forever
            if info["Reason"] in NEVER_STARTS or time.time() > deadline:
                raise AssertionError(f"job {job}: not {what} after {timeout:.0f} s: {info}\n"
                                     f"{self.tail()}")
            time.sleep(0.5)

    def tail(self, lines: int = 40) -> str:
        """The last lines of every job output and daemon log (for assertion messages)."""
        parts = []
        for path in sorted([*self.root.glob("*.out"), *self.root.glob("log/*.log")]):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _write_config(root: Path, user: str) -> None:
    (root / "munge").mkdir(mode=0o755)
    for sub in ("state", "spool", "log", "out"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # The node as slurmd sees it (CPUs, sockets, cores, memory), named localhost.
    hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30)
    node = hardware.stdout.splitlines()[0].split(None, 1)[1] if hardware.returncode == 0 else "CPUs=1"
    node = re.sub(r"RealMemory=\d+", "RealMemory=1000", node)
    ctld_port, slurmd_port = _free_port(), _free_port()
    # 8 "GPUs" for the scripts' --gpus-per-node=8 (test-only); slurmd wants device files.
    for i in range(8):
        (root / f"gpu{i}").symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=localhost Name=gpu File={root}/gpu[0-7]\n")
    (root / "slurm.conf").write_text(f"""\
ClusterName=marcotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 Gres=gpu:8 {node} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")


def _die_with_parent() -> None:
    """In a daemon before exec: SIGTERM when this test process dies, even if killed outright
    (its finalizers then do not run)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(cluster: Cluster) -> None:
    root, env = cluster.root, {**cluster.env}
    munge = root / "munge"
    daemons = {
        "munged": ["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                   f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                   f"--log-file={root}/log/munged.log", f"--seed-file={munge}/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(root / "slurm.conf")],
        "slurmd": ["slurmd", "-D", "-N", "localhost", "-f", str(root / "slurm.conf")],
    }
    for name, argv in daemons.items():
        out = open(root / "log" / f"{name}.stderr", "w")
        cluster.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               preexec_fn=_die_with_parent)
        if name == "munged":
            deadline = time.time() + 15
            while not (munge / "munge.socket").exists() and time.time() < deadline:
                time.sleep(0.1)
    deadline = time.time() + 40
    while time.time() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n"
                                   + (root / "log" / f"{name}.stderr").read_text()[-2000:])
        state = cluster.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.split()
        if state == ["idle"]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node is not idle after 40 s (sinfo: {state})")


def _tagged_processes(root: Path) -> list[int]:
    """PIDs of processes carrying this cluster's tag: slurmstepd and the jobs' processes."""
    tag, pids = f"{TAG}={root}".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _stop(cluster: Cluster) -> None:
    """Cancel every job, stop the daemons by PID, kill what is left of the jobs by PID."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        jobs = cluster.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20).stdout.split()
        if jobs:
            cluster.run(["scancel", *jobs], check=False, timeout=20)
            deadline = time.time() + 30
            while time.time() < deadline and cluster.run(
                    ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"], check=False,
                    timeout=20).stdout.strip():
                time.sleep(0.5)
    for name in reversed(DAEMONS):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in _tagged_processes(cluster.root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _unavailable(reason: str):
    if os.environ.get("MARCO_REQUIRE_SLURM") == "1":
        pytest.fail(f"MARCO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(request):
    missing = [b for b in (*DAEMONS, *CLIENTS, "sinfo") if not shutil.which(b, path=f"/usr/sbin:/sbin:"
                                                                              f"{os.environ['PATH']}")]
    if missing:
        _unavailable(f"no Slurm here (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    import pwd

    # A short path: munge's socket path must fit in a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="marco-slurm-"))
    root.chmod(0o755)
    c = Cluster(root)
    request.addfinalizer(lambda: (_stop(c), shutil.rmtree(root, ignore_errors=True)))
    try:
        _write_config(root, pwd.getpwuid(os.getuid()).pw_name)
        _start(c)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _unavailable(f"the Slurm daemons did not start: {e}")
    return c


def _docs_command(command: str) -> str:
    assert command in DOCS, f"docs/cluster.md no longer shows `{command}`"
    return command


# ----------------------------------------------------------------------------- requests
SCRIPTS = [f"{m}_stage{k}.sbatch" for m in ("nano", "mini") for k in (1, 2, 3, 4)] + ["mini_global.sbatch"]


def test_slurm_accepts_every_script_with_the_documented_overrides(cluster):
    # CPU profile: one node, no GPUs, every script of every chain.
    out = cluster.run(_docs_command(TEST_ONLY_CPU)).stdout
    lines = out.splitlines()
    assert sorted(line.split(":")[0].rsplit("/", 1)[1] for line in lines) == sorted(SCRIPTS), out
    assert all(re.search(r"sbatch: Job \d+ to start at .* on nodes localhost", x) for x in lines), out
    # The scripts' own request (8 GPUs per node, exclusive) with `--nodes N`.
    out = cluster.run(_docs_command(TEST_ONLY_GPU)).stdout
    assert len(out.splitlines()) == 9 and "error" not in out, out
    # Without --nodes they ask for 8 nodes, which this one-node cluster does not have.
    out = cluster.run("bash slurm/submit_chain.sh --test-only -- slurm/mini_stage1.sbatch", check=False)
    assert out.returncode == 1 and "Requested node configuration is not available" in out.stdout, out


# ----------------------------------------------------------------------------- jobs
def _losses(log: Path) -> list[tuple[int, float, int]]:
    """(step, lm loss, curriculum_stage) of every training record of a --log-json file."""
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [(r["step"], r["lm_loss"], r["curriculum_stage"]) for r in records if "lm_loss" in r]


def _submitted(text: str) -> list[str]:
    """Job ids printed by sbatch ("Submitted batch job N") or submit_chain.sh ("...: job N")."""
    return re.findall(r"(?:Submitted batch job|: job) (\d+)", text)


def _ended(job: dict) -> bool:
    return job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED")


def _output(root: Path, name: str, job: str) -> str:
    """A job's output file (SBATCH_OUTPUT=%x-%j.out, appended across requeues)."""
    return (root / f"{name}-{job}.out").read_text()


@pytest.mark.slow
def test_requeue_on_usr1_resumes_exactly_and_the_chain_continues_from_stage1(cluster):
    root = cluster.root
    curriculum = root / "curriculum.yaml"
    curriculum.write_text(CURRICULUM)
    cache = os.environ.get("MARCO_CACHE") or str(Path.home() / ".cache" / "marco-megatron")
    common = dict(MARCO_CURRICULUM=str(curriculum), MARCO_DATA_CACHE=cache,
                  MARCO_PYTHON=sys.executable, SBATCH_OUTPUT=str(root / "%x-%j.out"))

    # An uninterrupted stage 1, submitted as docs/cluster.md says: the reference.
    ref = root / "reference"
    (ref_job,) = _submitted(cluster.run(_docs_command(ONE_STAGE), **common, MARCO_SAVE_INTERVAL="0",
                                        MARCO_OUTPUT=str(ref)).stdout)
    # The chain of stages 1 and 2, queued behind it (--exclusive: one job at a time), saving
    # every 4 steps.
    out = root / "chain"
    s1, s2 = _submitted(cluster.run(_docs_command(CHAIN), **common, MARCO_SAVE_INTERVAL="4",
                                    MARCO_OUTPUT=str(out)).stdout)
    assert cluster.job(s2)["Dependency"] == f"afterok:{s1}(unfulfilled)"

    done = cluster.wait_job(ref_job, _ended, JOB_TIMEOUT, "finished")
    assert (done["JobState"], done["ExitCode"], done["NumNodes"]) == ("COMPLETED", "0:0", "1"), cluster.tail()
    reference = _losses(ref / "logs" / "mini" / "stage1.jsonl")
    assert [(s, k) for s, _, k in reference] == [(s, 0) for s in range(1, STAGE1_END + 1)], cluster.tail()

    # Stage 1 of the chain: after its periodic save at step 4, `scancel --signal=USR1`.
    save1 = out / "checkpoints" / "mini" / "stage1"
    latest = save1 / "latest_checkpointed_iteration.txt"
    deadline = time.time() + JOB_TIMEOUT
    while not (latest.exists() and latest.read_text() == "4"):
        job = cluster.job(s1)
        assert time.time() < deadline and not _ended(job) and job["Reason"] not in NEVER_STARTS, (
            f"{job}\n{cluster.tail()}")
        time.sleep(0.1)
    cluster.run(["scancel", "--signal=USR1", s1])
    # It saves, requeues itself and waits out Slurm's requeue hold; stage 2 keeps waiting.
    held = cluster.wait_job(s1, lambda j: (j["JobState"], j["Reason"], j["Restarts"]) == (
        "PENDING", "BeginTime", "1"), JOB_TIMEOUT, "requeued and held")
    assert datetime.fromisoformat(held["StartTime"]).timestamp() - time.time() > 60, held  # ~2 minutes
    assert cluster.job(s2)["Reason"] == "Dependency"
    stopped = int(latest.read_text())
    assert 4 < stopped < STAGE1_END, cluster.tail()
    # Released in the second of its requeue, the job would fail ("Job credential revoked").
    time.sleep(3)
    cluster.run(_docs_command(RELEASE).replace("<jobid>", s1))

    last = cluster.wait_job(s2, _ended, 2 * JOB_TIMEOUT, "finished")
    first = cluster.job(s1)
    assert (first["JobState"], first["ExitCode"], first["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        cluster.tail())
    assert (last["JobState"], last["ExitCode"]) == ("COMPLETED", "0:0"), cluster.tail()

    # Stage 1: stopped, resumed at the next step, and the same losses as the uninterrupted job.
    log1 = _output(root, "marco-mini-s1", s1)
    for line in (f"signal 10: saved at iteration {stopped}, exiting",
                 f"stopped at iteration {stopped} of {STAGE1_END} (signal or --exit-interval): requeueing",
                 f"resume from {save1} at iteration {stopped}",
                 f"mini stage 1 finished at iteration {STAGE1_END}"):
        assert line in log1, f"{line!r} not in the job's output:\n{log1[-4000:]}"
    assert re.search(rf"step +{STAGE1_END}/\d+ \| .* \| lm loss .* \| stage 1$", log1, re.M), log1[-2000:]
    chain1 = _losses(out / "logs" / "mini" / "stage1.jsonl")
    assert [s for s, _, _ in chain1] == list(range(1, STAGE1_END + 1)), chain1
    assert [v for _, v, _ in chain1] == pytest.approx([v for _, v, _ in reference], rel=1e-6)

    # Stage 2 started from stage 1's final checkpoint, in the curriculum's second stage.
    log2 = _output(root, "marco-mini-s2", s2)
    for line in (f"start from {save1} at iteration {STAGE1_END}",
                 f"mini stage 2 finished at iteration {STAGE2_END}"):
        assert line in log2, f"{line!r} not in the job's output:\n{log2[-4000:]}"
    assert re.search(rf"step +{STAGE1_END + 1}/\d+ \| .* \| lm loss .* \| stage 2$", log2, re.M), log2[-2000:]
    chain2 = _losses(out / "logs" / "mini" / "stage2.jsonl")
    assert [(s, k) for s, _, k in chain2] == [(s, 1) for s in range(STAGE1_END + 1, STAGE2_END + 1)]
    assert (out / "checkpoints" / "mini" / "stage2" / "latest_checkpointed_iteration.txt"
            ).read_text() == str(STAGE2_END)
