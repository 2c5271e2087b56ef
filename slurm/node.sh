#!/usr/bin/env bash
# One srun task per node (slurm/launch.sh): torchrun for this node's ranks.
#
#   bash slurm/node.sh SCRIPT [ARGS...]     (environment: MARCO_PYTHON, MARCO_REPO,
#                                           MARCO_NNODES, MARCO_NPROC_PER_NODE, MASTER_ADDR,
#                                           MASTER_PORT; SLURM_NODEID from srun)
#
# How SIGUSR1 reaches the training processes. `#SBATCH --signal=USR1@<grace>` and
# `scancel --signal=USR1 JOB` signal the job's steps, not the batch shell; with Slurm's usual
# proctrack/cgroup plugin every process of the step gets the signal: this script, torchrun's
# agent and the workers (each in its own session; torchrun starts them with setsid).
#  - The workers are the ones that act: the trainer finishes its step, saves, exits 0.
#  - torchrun's agent must survive it: SIGUSR1's default action would kill the agent, and
#    srun would then tear down the step in the middle of the save. torchrun does not handle
#    SIGUSR1 unless asked, so it is started with SIGUSR1 ignored, a disposition it inherits.
#    (Its workers inherit it too, until the trainer installs its handler at the end of its
#    setup: a USR1 that arrives during the setup is ignored, and the job is then stopped at
#    its time limit without a requeue. A grace of minutes before a 24-hour limit avoids it.)
#  - Where the proctrack plugin signals only the task's process group (proctrack/pgid), only
#    this script and the agent get it: this script forwards SIGUSR1 to torchrun's children.
#    A worker that gets it twice saves once.
# SIGTERM (preemption, scancel): forwarded to torchrun, which stops its workers with SIGTERM
# (the trainer saves if it can before torchrun's shutdown timeout and Slurm's KillWait).
set -euo pipefail

: "${MARCO_NNODES:?}" "${MARCO_NPROC_PER_NODE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
node_rank=${SLURM_NODEID:?slurm/node.sh runs as an srun task}
cd "${MARCO_REPO:?}"

trap '' USR1
"${MARCO_PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "$MARCO_NNODES" --node-rank "$node_rank" --nproc-per-node "$MARCO_NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts 0 \
    "$@" &
agent=$!

forward() {  # $1: signal name; the agent's children are this node's training processes
    if [[ $1 == USR1 ]]; then
        pkill "-$1" -P "$agent" || true
    else
        kill "-$1" "$agent" 2>/dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while true; do
    rc=0
    wait "$agent" || rc=$?
    # wait returns early (status > 128) when a trapped signal arrives; the agent lives on.
    if (( rc > 128 )) && kill -0 "$agent" 2>/dev/null; then
        continue
    fi
    exit "$rc"
done
