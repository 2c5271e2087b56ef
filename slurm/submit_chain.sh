#!/usr/bin/env bash
# Submit batch scripts as one chain: each job starts only after the previous one has
# succeeded (afterok). A requeued job is not finished, so its successor keeps waiting.
#
#   bash slurm/submit_chain.sh [SBATCH_OPTION...] -- SCRIPT_OR_MODEL...
#   bash slurm/submit_chain.sh SCRIPT_OR_MODEL...                      (no sbatch options)
#
#   bash slurm/submit_chain.sh mini mini_global        # Mini's four stages, then Mini-Global
#   bash slurm/submit_chain.sh --nodes=16 -- nano      # every job of the chain on 16 nodes
#   bash slurm/submit_chain.sh slurm/nano_stage{2,3,4}.sbatch          # resume a chain at stage 2
#   MARCO_CPU=1 bash slurm/submit_chain.sh --time=00:30:00 -- mini     # CPU profile: one node, no GPUs
#   bash slurm/submit_chain.sh --test-only -- mini     # sbatch --test-only each job; submit nothing
#
# A MODEL (a recipe configs/recipes/MODEL.yaml) stands for its scripts in stage order:
# slurm/MODEL.sbatch if there is one (mini_global), else slurm/MODEL_stage<k>.sbatch.
# The SBATCH_OPTIONs go to every sbatch call, after the CPU profile's request under
# MARCO_CPU=1 (--nodes=1 --gpus-per-node=0), so they win, and before the chain's
# --dependency, so that a --dependency given here holds back the first job only. Slurm has no
# environment variable for --nodes: this is the way to change a chain's node count. Account,
# partition, time: options here, or sbatch's own SBATCH_ACCOUNT, SBATCH_PARTITION,
# SBATCH_TIMELIMIT, ... variables.
set -euo pipefail

die() { echo "submit_chain.sh: error: $*" >&2; exit 2; }
usage="usage: submit_chain.sh [SBATCH_OPTION...] -- SCRIPT_OR_MODEL... (see the header)"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

options=()
targets=("$@")
for i in "${!targets[@]}"; do
    if [[ ${targets[i]} == -- ]]; then
        options=("${targets[@]:0:i}")
        targets=("${targets[@]:i+1}")
        break
    fi
done
(( ${#targets[@]} > 0 )) || die "no script or model given; $usage"

scripts=()
for target in "${targets[@]}"; do
    if [[ $target == -* ]]; then
        die "'$target' after the scripts: sbatch options go before '--'; $usage"
    elif [[ -f $target ]]; then
        scripts+=("$target")
    elif [[ $target =~ ^[A-Za-z0-9_]+$ && -f $repo/configs/recipes/$target.yaml ]]; then
        if [[ -f $repo/slurm/$target.sbatch ]]; then
            scripts+=("$repo/slurm/$target.sbatch")
        else
            found=("$repo/slurm/${target}_stage"[0-9]*.sbatch)
            [[ -f ${found[0]} ]] || die "model $target has no slurm/${target}_stage<k>.sbatch"
            mapfile -t found < <(printf '%s\n' "${found[@]}" | sort -V)
            scripts+=("${found[@]}")
        fi
    else
        models=("$repo"/configs/recipes/*.yaml)
        models=("${models[@]##*/}")
        die "no such file or model '$target' (models: ${models[*]%.yaml})"
    fi
done

profile=()
if [[ ${MARCO_CPU:-0} == 1 ]]; then
    # slurm/launch.sh's CPU profile runs on one node, without GPUs.
    profile=(--nodes=1 --gpus-per-node=0)
fi
# The spooled copies of the scripts find the launcher here, wherever this is run from.
export MARCO_REPO=${MARCO_REPO:-$repo}
if [[ " ${options[*]} " == *" --test-only "* ]]; then
    # Check every request (sbatch prints when and where it would start); submit nothing.
    status=0
    for script in "${scripts[@]}"; do
        sbatch "${profile[@]}" "${options[@]}" "$script" 2>&1 | sed "s|^|$script: |" || status=1
    done
    exit "$status"
fi
dependency=()
for script in "${scripts[@]}"; do
    out=$(sbatch --parsable "${profile[@]}" "${options[@]}" "${dependency[@]}" "$script")
    job=${out%%;*}   # --parsable prints JOBID or JOBID;CLUSTER
    [[ $job =~ ^[0-9]+$ ]] || die "sbatch printed no job id for $script (got '$out')"
    echo "$script: job $job${dependency[*]:+ (${dependency[*]})}"
    dependency=(--dependency="afterok:$job")
done
