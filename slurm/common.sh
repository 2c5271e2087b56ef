# shellcheck shell=bash disable=SC2034,SC2154  # globals set for / by the launcher sourcing this
# What the launchers slurm/launch.sh (pre-training stages) and slurm/posttrain.sh (SFT, OPD)
# share; each sources this first:
#   prog, die, note           the launcher's name; an error line (exit 2); a timestamped line
#   repo, dry_run             the repository root; MARCO_DRY_RUN
#   require_positive          a MARCO_* count that must be a positive integer
#   load_recipe MODEL         sets `config`, the path of configs/recipes/MODEL.yaml, and the
#                             recipe's values as globals (RUN, PRESET, TP, ..., SFT_*, OPD_*;
#                             megatron_ext/recipes.py); a bad recipe is one error line
#   rendezvous                nnodes, master_addr, master_port: inside a Slurm job from its node
#                             list, in a dry run (MARCO_DRY_RUN) from MARCO_NNODES or NODES
#   srun_command              srun_cmd: one task per node running slurm/node.sh (torchrun)
#   show_dry_run              print the plan, the ranks' environment and the srun command
#   read_iteration, run_training, requeue
#                             the run-then-requeue-or-finish end of a launch

prog=$(basename "${BASH_SOURCE[1]}" .sh)
die() { echo "$prog.sh: error: $*" >&2; exit 2; }
note() { echo "[$prog $(date '+%F %T')] $*"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=${MARCO_DRY_RUN:-}

require_positive() {  # require_positive NAME VALUE
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1=$2: expected a positive integer"
}

load_recipe() {  # load_recipe MODEL: the recipe's NAME=value lines, evaluated as globals
    local values
    config="$repo/configs/recipes/$1.yaml"
    values=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "${MARCO_PYTHON:-python3}" \
             -m megatron_ext.recipes "$1" 2>&1) || die "${values#error: }"
    eval "$values"
}

rendezvous() {  # uses dry_run and NODES (the recipe's)
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        local hosts
        mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not set in a Slurm job}")
        (( ${#hosts[@]} > 0 )) || die "scontrol show hostnames returned no host"
        nnodes=${#hosts[@]}
        master_addr=${hosts[0]}
        master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    elif [[ -n $dry_run ]]; then
        nnodes=${MARCO_NNODES:-$NODES}
        require_positive MARCO_NNODES "$nnodes"
        master_addr='<first host>'
        master_port=${MASTER_PORT:-29500}
    else
        die "not inside a Slurm job (no SLURM_JOB_ID): submit with sbatch, or set MARCO_DRY_RUN=1"
    fi
}

srun_command() {  # srun_command [SRUN_OPTION...] -- NODE_ARG...: sets srun_cmd
    srun_cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=300)
    while [[ $1 != -- ]]; do
        srun_cmd+=("$1")
        shift
    done
    shift
    if [[ -n ${MARCO_SRUN_ARGS:-} ]]; then   # e.g. "--container-image=... --container-mounts=..."
        local srun_extra
        read -r -a srun_extra <<< "$MARCO_SRUN_ARGS"
        srun_cmd+=("${srun_extra[@]}")
    fi
    srun_cmd+=(bash "$repo/slurm/node.sh" "$@")
}

show_dry_run() {  # show_dry_run SUMMARY...: prints "# SUMMARY", run_env and srun_cmd; exits 0
    echo "# $*"
    printf 'export %q\n' "${run_env[@]}"
    printf '%q ' "${srun_cmd[@]}"
    echo
    exit 0
}

read_iteration() {  # the integer in file $1, or -1 when there is none
    local text=""
    [[ -f $1 ]] && text=$(<"$1")
    if [[ $text =~ ^[0-9]+$ ]]; then echo "$text"; else echo -1; fi
}

run_training() {  # runs srun_cmd; a failure is not requeued: exits with its status
    local rc=0
    "${srun_cmd[@]}" || rc=$?
    if (( rc != 0 )); then
        note "training exited with status $rc: not requeued (fix, then resubmit; it resumes)"
        exit "$rc"
    fi
}

requeue() {  # requeue WHY...: the job goes back to the queue (it resumes); exits 0
    note "$*: requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
