#!/usr/bin/env python3
"""Launch a Marco training stage with NeMo-Run: the runs of slurm/*.sbatch, through NeMo-Run's
LocalExecutor or SlurmExecutor with its torchrun launcher.

    # print the sbatch script NeMo-Run would submit (nothing is submitted)
    python examples/launch_nemo_run.py --model mini --stage 1 --executor slurm \\
        --account ACCT --partition PART --dryrun
    # submit from a login node (LocalTunnel), or from elsewhere with --ssh-host/--ssh-user
    python examples/launch_nemo_run.py --model mini --stage 1 --executor slurm \\
        --account ACCT --partition PART --container-image nvcr.io/nvidia/pytorch:25.09-py3 \\
        --container-mounts /lustre:/lustre
    # this machine, torchrun; MARCO_CPU=1: the tiny preset on 2 CPU processes (gloo)
    MARCO_CPU=1 MARCO_TRAIN_ITERS=3 python examples/launch_nemo_run.py --model mini --stage 1 \\
        --executor local

The training command is taken from slurm/launch.sh (`MARCO_DRY_RUN=nul`), so layout, batch,
schedule, paths and every MARCO_* override (docs/cluster.md) are the same as with sbatch. The
task is slurm/pretrain_stage.py, which resumes from the stage's own checkpoint when one
exists and otherwise starts from the previous stage's final one.

Requeue works differently from the sbatch scripts: NeMo-Run's batch script requeues a job
whose command exited non-zero, up to --max-retries times. Here torchrun handles SIGUSR1
(PET_SIGNALS_TO_HANDLE): at `--signal USR1@<grace>` it forwards the signal to the trainer,
which saves and exits 0, and waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT for that; torchrun then
exits non-zero and NeMo-Run requeues the job, which resumes from that checkpoint. A finished
stage exits 0 and is not requeued. Crashes are retried too, each resuming from the last
checkpoint. NeMo-Run needs `leptonai<0.47` to import (requirements/cpu.txt pins both).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_ext.cli import (  # noqa: E402  (after the path set-up above)
    RawDescriptionHelpFormatter,
    run_tool,
)
from megatron_ext.errors import UsageError  # noqa: E402
from megatron_ext.recipes import available, load_recipe  # noqa: E402

# Each model's stages, from its recipe (configs/recipes/MODEL.yaml), as slurm/launch.sh reads them.
STAGES = {model: load_recipe(model)["stages"] for model in available()}
# launch.sh's rendezvous variables: NeMo-Run's torchrun launcher sets up its own.
_LAUNCHER_ONLY = {"MARCO_PYTHON", "MARCO_REPO", "MARCO_NNODES", "MARCO_NPROC_PER_NODE",
                  "MASTER_ADDR", "MASTER_PORT"}


def launch_plan(model: str, stage: int, nodes: int | None, nproc: int | None) -> dict:
    """Settings, environment and stage command of `bash slurm/launch.sh MODEL STAGE`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["MARCO_DRY_RUN"] = "nul"
    if nodes is not None:
        env["MARCO_NNODES"] = str(nodes)
    if nproc is not None:
        env["MARCO_NPROC_PER_NODE"] = str(nproc)
    out = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), model, str(stage)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        message = out.stderr.strip().splitlines()
        raise UsageError(message[-1] if message else f"slurm/launch.sh failed ({out.returncode})")
    plan = parse_dry_run(out.stdout)
    plan["env"] = {k: v for k, v in plan["env"].items() if k not in _LAUNCHER_ONLY}
    return plan


def parse_dry_run(text: str) -> dict:
    """launch.sh's MARCO_DRY_RUN=nul output (NUL-terminated `key=value` records) as
    {"env": {NAME: value}, "args": [stage command], setting: value, ...}."""
    plan = {"env": {}, "args": []}
    for record in text.split("\0")[:-1]:
        key, _, value = record.partition("=")
        if key == "env":
            name, _, val = value.partition("=")
            plan["env"][name] = val
        elif key == "arg":
            plan["args"].append(value)
        else:
            plan[key] = value
    return plan


# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; 0, INFINITE or UNLIMITED for no limit.
_TIME = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<h>\d+):(?P<hm>\d+):(?P<hs>\d+)|(?P<m>\d+)(?::(?P<ms>\d+))?)")


def time_limit_seconds(text: str) -> float:
    """Seconds of an sbatch --time value (inf for no limit); UsageError if Slurm would refuse it."""
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return float("inf")
    match = _TIME.fullmatch(text)
    if match is None:
        raise UsageError(f"--time {text}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                         "D-HH:MM:SS, or INFINITE)")
    f = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if any(f.get(k, 0) > 59 for k in ("dm", "ds", "hm", "hs", "ms")) or f.get("dh", 0) > 23:
        raise UsageError(f"--time {text}: hours go up to 23 after days, minutes and seconds up to 59")
    seconds = (f.get("d", 0) * 86400 + (f.get("dh", 0) + f.get("h", 0)) * 3600
               + (f.get("dm", 0) + f.get("hm", 0) + f.get("m", 0)) * 60
               + f.get("ds", 0) + f.get("hs", 0) + f.get("ms", 0))
    return seconds or float("inf")  # Slurm: a limit of 0 means none


def check_args(a: argparse.Namespace) -> None:
    """What Slurm, slurm/launch.sh or torchrun would refuse later, refused before anything is
    built or submitted (one line naming the flag)."""
    if a.stage not in STAGES[a.model]:
        raise UsageError(f"--stage {a.stage}: {a.model} has stages "
                         f"{', '.join(map(str, STAGES[a.model]))}")
    for flag, value in (("--nodes", a.nodes), ("--gpus-per-node", a.gpus_per_node)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if a.max_retries < 0:
        raise UsageError(f"--max-retries {a.max_retries}: must be 0 or more")
    if not 0 <= a.signal_grace <= 65535:
        raise UsageError(f"--signal-grace {a.signal_grace}: must be 0-65535 seconds (sbatch --signal)")
    limit = time_limit_seconds(a.time)
    if a.signal_grace >= limit:
        raise UsageError(f"--signal-grace {a.signal_grace}: the signal must come before the end of "
                         f"--time {a.time} ({limit:.0f} s)")
    if a.executor == "slurm" and not a.account and not a.dryrun:
        raise UsageError("--account: required to submit to Slurm (or --dryrun)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(STAGES), help="the model's stage chain")
    p.add_argument("--stage", type=int, required=True, help="1-based curriculum stage")
    p.add_argument("--executor", choices=["local", "slurm"], default="slurm",
                   help="NeMo-Run executor: this machine, or sbatch (over SSH with --ssh-host)")
    p.add_argument("--dryrun", action="store_true", help="print what would run; run nothing")
    p.add_argument("--nodes", type=int, help="default: the model's recipe (configs/recipes); local: 1")
    p.add_argument("--gpus-per-node", type=int,
                   help="processes per node (default: the model's; MARCO_CPU=1: 2)")
    g = p.add_argument_group("slurm")
    g.add_argument("--account", help="sbatch --account (default: the cluster's)")
    g.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
    g.add_argument("--time", default="24:00:00", help="sbatch --time (e.g. 24:00:00, 2-00:00:00)")
    g.add_argument("--signal-grace", type=int, default=300,
                   help="seconds: --signal=USR1@GRACE; torchrun waits up to GRACE - 60 for the save")
    g.add_argument("--max-retries", type=int, default=50,
                   help="requeues after a signal or a failure")
    g.add_argument("--container-image", help="container for the job (pyxis/enroot; default: none)")
    g.add_argument("--container-mounts", default="", help="comma-separated src:dst")
    g.add_argument("--remote-repo", help="this repository's path on the cluster (default: here)")
    g.add_argument("--job-dir", default=str(REPO / "runs" / "nemo_run"),
                   help="NeMo-Run's job directory (on the cluster with --ssh-host)")
    g.add_argument("--ssh-host", help="submit through SSH to this login node (default: local sbatch)")
    g.add_argument("--ssh-user", help="user name on --ssh-host")
    g.add_argument("--sbatch-out", help="with --dryrun: also write the sbatch script here")
    return p


def slurm_executor(a, plan: dict):
    import nemo_run as run
    from nemo_run.core.packaging.git import GitArchivePackager

    remote_repo = a.remote_repo or str(REPO)
    env = dict(plan["env"])
    # torchrun forwards SIGUSR1 to the trainer and waits for its save (see the docstring).
    env["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(a.signal_grace - 60, 30))
    if a.ssh_host:
        tunnel = run.SSHTunnel(host=a.ssh_host, user=a.ssh_user or os.environ.get("USER", ""),
                               job_dir=a.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=a.job_dir)
    return run.SlurmExecutor(
        account=a.account or "",
        partition=a.partition,
        nodes=int(plan["nodes"]),
        ntasks_per_node=int(plan["nproc"]),  # torchrun: one task per node, nproc workers
        gpus_per_node=None if os.environ.get("MARCO_CPU") == "1" else int(plan["nproc"]),
        time=a.time,
        exclusive=True,
        mem="0",
        signal=f"USR1@{a.signal_grace}",
        container_image=a.container_image,
        container_mounts=[m for m in a.container_mounts.split(",") if m],
        env_vars=env,
        retries=a.max_retries,
        job_name_prefix="marco-",
        tunnel=tunnel,
        # The job's code directory is a link to the checkout on the cluster's shared
        # filesystem (nothing is archived or copied).
        packager=GitArchivePackager(symlink_from_remote_dir=remote_repo),
        launcher="torchrun",
    ), remote_repo


def launch(a: argparse.Namespace) -> int:
    check_args(a)
    nodes = 1 if a.executor == "local" else a.nodes
    plan = launch_plan(a.model, a.stage, nodes, a.gpus_per_node)

    import nemo_run as run

    script_path, args = plan["args"][0], plan["args"][1:]  # slurm/pretrain_stage.py, its flags
    if a.executor == "slurm":
        executor, remote_repo = slurm_executor(a, plan)
        args = [x.replace(str(REPO), remote_repo) for x in args]  # local paths -> cluster paths
    else:
        executor = run.LocalExecutor(ntasks_per_node=int(plan["nproc"]), launcher="torchrun",
                                     env_vars=plan["env"])
        script_path = str(REPO / script_path)
    script = run.Script(path=script_path, args=args, entrypoint="python")
    name = f"{a.model}-stage{a.stage}"
    if a.dryrun:
        return dry_run(a, executor, script, name)
    # NeMo-Run's layout: <job dir>/<title>/<title>_<time>/<task>/ (the task names the stage once).
    with run.Experiment("marco", executor=executor, log_level="WARN") as exp:
        exp.add(script, name=name)
        exp.run(detach=a.executor == "slurm", tail_logs=a.executor == "local")
    if a.executor == "local":
        states = {task: str(info["status"]) for task, info in exp.status(return_dict=True).items()}
        print(f"{name}: {states}")
        return 0 if all(s.upper().startswith("SUCCEEDED") for s in states.values()) else 1
    return 0


def dry_run(a: argparse.Namespace, executor, script, name: str) -> int:
    """Print what would be submitted; NeMo-Run's experiment directory goes to a temporary
    directory that is removed afterwards (a dry run leaves nothing behind)."""
    import tempfile

    import nemo_run as run

    with tempfile.TemporaryDirectory(prefix="marco-nemo-dryrun-") as base:
        with run.Experiment("marco", executor=executor, log_level="WARN", base_dir=base,
                            skip_status_at_exit=True, enable_goodbye_message=False) as exp:
            exp.add(script, name=name)
            exp.dryrun(log=True, delete_exp_dir=False)
            if a.executor == "slurm":
                sbatch = next(Path(exp._exp_dir).glob("*_sbatch.sh"))
                print(sbatch.read_text())
                if a.sbatch_out:
                    shutil.copyfile(sbatch, a.sbatch_out)
    return 0


def main(argv=None) -> int:
    return run_tool(launch, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
