#!/usr/bin/env bash
# Submit the preprocessing of a data manifest: a job array of its unfinished tasks
# (slurm/preprocess.sbatch, one task per shard), then the final step, which runs after every
# task has succeeded (afterok) and merges each source into the curriculum's prefix.
#
#   bash slurm/preprocess.sh MANIFEST OUTPUT_DIR [SBATCH_OPTION...]
#
#   bash slurm/preprocess.sh my_manifest.yaml /lustre/data/marco --partition=cpu
#   MARCO_ARRAY_LIMIT=200 bash slurm/preprocess.sh ...    # at most 200 tasks at a time (%200)
#
# Run it again after a failed or cancelled task: finished shards are not submitted again, only
# the tasks that did not finish (and the final step). The SBATCH_OPTIONs go to both jobs
# (account, partition, --cpus-per-task, --time, ...). Prints the job ids.
set -euo pipefail

die() { echo "preprocess.sh: error: $*" >&2; exit 2; }
(( $# >= 2 )) || die "usage: preprocess.sh MANIFEST OUTPUT_DIR [SBATCH_OPTION...]"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
manifest=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
shift 2
python=${MARCO_PYTHON:-python3}
export MARCO_MANIFEST=$manifest MARCO_PREPROCESS_OUT=$out MARCO_REPO=$repo

todo=$("$python" "$repo/tools/preprocess_data.py" --manifest "$manifest" --output-dir "$out" --pending)
dependency=()
if [[ -n $todo ]]; then
    array=$(sbatch --parsable --array="$todo${MARCO_ARRAY_LIMIT:+%$MARCO_ARRAY_LIMIT}" "$@" \
        "$repo/slurm/preprocess.sbatch")
    array=${array%%;*}
    echo "preprocess.sh: tasks $todo: job $array"
    dependency=(--dependency="afterok:$array" --kill-on-invalid-dep=yes)
else
    echo "preprocess.sh: every task has finished"
fi
final=$(sbatch --parsable --job-name=marco-preprocess-final --output=slurm-%x-%j.out "${dependency[@]}" "$@" \
    "$repo/slurm/preprocess.sbatch" finalize)
echo "preprocess.sh: final step: job ${final%%;*}"
