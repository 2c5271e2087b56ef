#!/usr/bin/env bash
# Shared launcher of the post-training batch scripts: SFT or on-policy distillation (OPD) of one
# model inside a Slurm job, after its pre-training chain.
#
#   bash slurm/posttrain.sh MODEL sft|opd     MODEL: a recipe configs/recipes/MODEL.yaml
#
# What a launch does (docs/posttraining.md has the recipe, docs/cluster.md the cluster side):
#  1. Settings: configs/recipes/MODEL.yaml (layout, and the sft/opd recipe values, most from
#     configs/posttrain/marco.yaml), then MARCO_* environment overrides.
#  2. What to --load: this run's own checkpoint directory when it has a 'latest' marker (a
#     requeued job resumes itself, exactly), else the step before it: SFT starts from the last
#     pre-training stage's final checkpoint, OPD from the SFT run's. posttrain_marco.py loads a
#     checkpoint of another kind as weights only (fresh optimizer, iteration 0).
#  3. Rendezvous on the first host of the allocation; one srun task per node runs slurm/node.sh
#     (torchrun for the node's GPUs, SIGUSR1 handling) with posttrain_marco.py.
#  4. After srun: stopped before the last iteration (USR1 -> save -> exit 0) -> `scontrol
#     requeue`; the requeued job resumes at step 2.
#
# MARCO_DRY_RUN=1 prints the settings and the srun command instead of running them.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(( $# == 2 )) || die "usage: posttrain.sh MODEL sft|opd (see slurm/*_sft.sbatch, slurm/*_opd.sbatch)"
model=$1
kind=$2
[[ $kind == sft || $kind == opd ]] || die "kind '$kind': expected sft or opd"
load_recipe "$model"

# ---------------------------------------------------------------- settings and overrides
upper=${kind^^}
setting() {  # setting NAME: MARCO_<KIND>_<NAME>, else <KIND>_<NAME> (the recipe's <kind>.<name>)
    local var="${upper}_$1" override="MARCO_${upper}_$1"
    [[ -n ${!var+x} ]] || die "$config sets no $kind.${1,,}"
    echo "${!override:-${!var}}"
}
tp=${MARCO_TP:-$TP}
ep=${MARCO_EP:-$EP}
nproc=${MARCO_NPROC_PER_NODE:-$GPUS_PER_NODE}
require_positive MARCO_NPROC_PER_NODE "$nproc"
output=${MARCO_OUTPUT:-$repo/runs}
ckpt_root=${MARCO_CKPT_ROOT:-$output/checkpoints}
data_root=${MARCO_DATA_ROOT:-/data/marco}
python=${MARCO_PYTHON:-python3}
tokenizer=${MARCO_TOKENIZER:-$data_root/tokenizer}   # Qwen3's (a local HF directory)
save="$ckpt_root/$RUN/$kind"
if [[ $kind == sft ]]; then
    start_from=${MARCO_SFT_CHECKPOINT:-$ckpt_root/$RUN/stage${STAGES[-1]}}
else
    start_from=${MARCO_OPD_CHECKPOINT:-$ckpt_root/$RUN/sft}
fi
load=$start_from
[[ -f $save/latest_checkpointed_iteration.txt ]] && load=$save   # requeued: resume itself

rendezvous
world=$((nnodes * nproc))
(( world % tp == 0 )) || die "world size $world is not divisible by TP $tp"

# ---------------------------------------------------------------- the training command
cmd=(posttrain_marco.py "$kind" --load "$load" --save "$save"
     --tensor-model-parallel-size "$tp" --expert-model-parallel-size "$ep"
     --micro-batch-size "$(setting MICRO_BATCH)" --global-batch-size "$(setting GLOBAL_BATCH)"
     --lr "$(setting LR)" --min-lr "$(setting MIN_LR)"
     --use-distributed-optimizer --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$tokenizer"
     --save-interval "$(setting SAVE_INTERVAL)" --eval-interval "$(setting EVAL_INTERVAL)"
     --log-interval 1 --data-cache-path "$output/data_cache"
     --tensorboard-dir "$output/tensorboard/$RUN/$kind" --log-json "$output/logs/$RUN/$kind.jsonl")
if [[ $kind == sft ]]; then
    total=$(setting ITERS)
    # Marco's SFT: cosine from lr to min lr over the run (the flags' defaults are the recipe's).
    cmd+=(--train-iters "$total" --seq-length "$(setting SEQ_LENGTH)"
          --data-path "$data_root/$(setting DATA)" --valid-data-path "$data_root/$(setting VALID_DATA)")
else
    cascade=$(setting CASCADE)
    [[ $cascade == /* ]] || cascade="$repo/$cascade"
    total=$("$python" -c 'import sys, yaml
print(sum(int(p["steps"]) for p in yaml.safe_load(open(sys.argv[1]))["phases"]))' "$cascade") \
        || die "cannot read the cascade $cascade"
    # Refuse, in one line with the estimate, a layout that does not fit a GPU (80 GB, margin).
    fit=$("$python" "$repo/slurm/memory_estimate.py" opd --check --preset "${MARCO_PRESET:-$PRESET}" \
          --ep "$ep" --dp $((world / tp)) --micro-batch-size "$(setting MICRO_BATCH)" \
          --decode-rows "$(setting DECODE_BATCH)" --cascade "$cascade" 2>&1) || die "${fit#error: }"
    note "$fit" >&2  # stderr: a dry run's stdout stays the command
    cmd+=(--cascade "$cascade" --rollout-decode-batch-size "$(setting DECODE_BATCH)"
          --recompute-granularity full
          --prompt-data "$data_root/$(setting PROMPTS)"
          --eval-prompt-data "$data_root/$(setting EVAL_PROMPTS)")
fi
if [[ -n ${MARCO_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<< "$MARCO_EXTRA_ARGS"
    cmd+=("${extra[@]}")
fi

run_env=(PYTHONUNBUFFERED=1 "MARCO_PYTHON=$python" "MARCO_REPO=$repo" "MARCO_NNODES=$nnodes"
         "MARCO_NPROC_PER_NODE=$nproc" "MASTER_ADDR=$master_addr" "MASTER_PORT=$master_port"
         "MARCO_DATA_ROOT=$data_root"
         "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
         "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
         "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
         "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}")
srun_command -- "${cmd[@]}"

if [[ -n $dry_run ]]; then
    show_dry_run "$model $kind: $nnodes nodes x $nproc processes = $world; TP $tp EP $ep;" \
        "$total steps; --load $load; checkpoints $save"
fi

# ---------------------------------------------------------------- run, then requeue or finish
latest_file="$save/latest_checkpointed_iteration.txt"
before=$(read_iteration "$latest_file")
if (( before >= total )); then note "$model $kind is complete ($before of $total steps)"; exit 0; fi
[[ $load == "$save" || -f $load/latest_checkpointed_iteration.txt ]] ||
    die "$model $kind starts from $load, which holds no checkpoint (set MARCO_${upper}_CHECKPOINT)"
mkdir -p "$save" "$output/logs/$RUN" "$output/tensorboard/$RUN"
export "${run_env[@]}"
note "$model $kind, job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes nodes x $nproc," \
     "TP $tp EP $ep, from $load (iteration $before of $total)"
run_training
latest=$(read_iteration "$latest_file")
if (( latest >= total )); then note "$model $kind finished at iteration $latest"; exit 0; fi
if (( latest <= before )); then note "no progress since iteration $before: not requeued"; exit 1; fi
requeue "stopped at iteration $latest of $total (signal)"
