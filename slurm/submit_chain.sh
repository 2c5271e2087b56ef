#!/usr/bin/env bash
# Submit batch scripts as one chain: each job starts only after the previous one has
# succeeded (afterok). A requeued job is not finished, so its successor keeps waiting.
#
#   bash slurm/submit_chain.sh slurm/mini_stage{1,2,3,4}.sbatch [slurm/mini_global.sbatch]
#   bash slurm/submit_chain.sh slurm/nano_stage{2,3,4}.sbatch        # resume a chain at stage 2
#
# Account, partition, etc.: sbatch's own SBATCH_ACCOUNT, SBATCH_PARTITION, ... variables.
set -euo pipefail

(( $# > 0 )) || { echo "usage: submit_chain.sh SCRIPT.sbatch..." >&2; exit 2; }
for script in "$@"; do
    [[ -f $script ]] || { echo "submit_chain.sh: error: no such file $script" >&2; exit 2; }
done
dependency=()
for script in "$@"; do
    out=$(sbatch --parsable "${dependency[@]}" "$script")
    job=${out%%;*}   # --parsable prints JOBID or JOBID;CLUSTER
    echo "$script: job $job${dependency[*]:+ (${dependency[*]})}"
    dependency=(--dependency="afterok:$job")
done
