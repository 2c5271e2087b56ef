#!/usr/bin/env bash
# Shared launcher of slurm/*.sbatch: runs one curriculum stage of one model inside a Slurm job.
#
#   bash slurm/launch.sh MODEL STAGE        MODEL: a recipe configs/recipes/MODEL.yaml; STAGE:
#                                           1-based stage of that model's curriculum
#
# What a launch does (docs/cluster.md has the why):
#  1. Settings: configs/recipes/MODEL.yaml, then MARCO_* environment overrides (MARCO_CPU=1: the
#     tiny preset on CPU processes, gloo, for tests and CPU partitions).
#  2. Rendezvous: the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"` is
#     MASTER_ADDR; one srun task per node runs slurm/node.sh, i.e. torchrun for the node's GPUs.
#  3. Every rank runs slurm/pretrain_stage.py, which picks what to --load: this stage's own
#     checkpoint directory when it has a 'latest' marker (a requeued job resumes), else the
#     previous stage's final checkpoint (stage 1: the upcycled checkpoint).
#  4. After srun: if training stopped before the stage's final iteration (USR1 from
#     `#SBATCH --signal`, or `scancel --signal=USR1 JOB`: the trainer finishes the step, saves,
#     exits 0), `scontrol requeue "$SLURM_JOB_ID"`; the requeued job resumes at step 3.
#
# MARCO_DRY_RUN=1 prints the settings and the srun command instead of running them;
# MARCO_DRY_RUN=nul prints them as NUL-separated records for examples/launch_nemo_run.py.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(( $# == 2 )) || die "usage: launch.sh MODEL STAGE (see slurm/*.sbatch)"
model=$1
stage=$2
load_recipe "$model"
[[ " ${STAGES[*]} " == *" $stage "* ]] || die "$model runs stages ${STAGES[*]}, not '$stage'"

# ---------------------------------------------------------------- settings and overrides
if [[ ${MARCO_CPU:-0} == 1 ]]; then
    # CPU profile: same scripts and chain, a model that trains in seconds on a few cores, on
    # one node: submit with `sbatch --nodes=1 --gpus-per-node=0` (the scripts ask for 8 GPU
    # nodes) or `MARCO_CPU=1 bash slurm/submit_chain.sh`, which adds both.
    PRESET=tiny TP=1 PP=1 EP=1 MICRO_BATCH=2 GLOBAL_BATCH=8 SEQ_LENGTH=256
    GPUS_PER_NODE=2 LR=3e-3 MIN_LR=3e-4 WARMUP_ITERS=2 SAVE_INTERVAL=0 EVAL_INTERVAL=0
    LOG_INTERVAL=1 NODES=1
    if [[ $model == mini_global ]]; then
        CURRICULUM=configs/curriculum/tiny_global.yaml
    else
        CURRICULUM=configs/curriculum/tiny.yaml
    fi
    [[ $stage == "${STAGES[0]}" && $model != mini_global ]] && INIT_CHECKPOINT=none
fi
preset=${MARCO_PRESET:-$PRESET}
tp=${MARCO_TP:-$TP}
pp=${MARCO_PP:-$PP}
ep=${MARCO_EP:-$EP}
nproc=${MARCO_NPROC_PER_NODE:-$GPUS_PER_NODE}
require_positive MARCO_NPROC_PER_NODE "$nproc"
micro_batch=${MARCO_MICRO_BATCH:-$MICRO_BATCH}
global_batch=${MARCO_GLOBAL_BATCH:-$GLOBAL_BATCH}
seq_length=${MARCO_SEQ_LENGTH:-$SEQ_LENGTH}
curriculum=${MARCO_CURRICULUM:-$CURRICULUM}
[[ $curriculum == /* ]] || curriculum="$repo/$curriculum"
output=${MARCO_OUTPUT:-$repo/runs}
ckpt_root=${MARCO_CKPT_ROOT:-$output/checkpoints}
tb_root=${MARCO_TB_ROOT:-$output/tensorboard}
log_root=${MARCO_LOG_ROOT:-$output/logs}
data_cache=${MARCO_DATA_CACHE:-$output/data_cache}
export MARCO_DATA_ROOT=${MARCO_DATA_ROOT:-/data/marco}   # read by the curriculum files
python=${MARCO_PYTHON:-python3}

save_dir="$ckpt_root/$RUN/stage$stage"
if [[ $stage == "${STAGES[0]}" ]]; then
    start_from=${MARCO_INIT_CHECKPOINT:-$INIT_CHECKPOINT}
    [[ $start_from == none || $start_from == /* ]] || start_from="$ckpt_root/$start_from"
    weights_only=$INIT_WEIGHTS_ONLY
else
    start_from="$ckpt_root/$RUN/stage$((stage - 1))"
    weights_only=0
fi

rendezvous
world=$((nnodes * nproc))
(( world % (tp * pp) == 0 )) || die "world size $world is not divisible by TP $tp x PP $pp"
dp=$((world / (tp * pp)))
cpu_hint=""
[[ ${MARCO_CPU:-0} == 1 ]] && cpu_hint=" (MARCO_CPU=1 is sized for one node: sbatch --nodes=1)"
(( global_batch % (micro_batch * dp) == 0 )) ||
    die "global batch $global_batch is not divisible by micro batch $micro_batch x DP $dp" \
        "($nnodes nodes x $nproc): set MARCO_GLOBAL_BATCH or change --nodes$cpu_hint"

# ---------------------------------------------------------------- the training command
pretrain=(
    --preset "$preset"
    --tensor-model-parallel-size "$tp"
    --pipeline-model-parallel-size "$pp"
    --expert-model-parallel-size "$ep"
    --micro-batch-size "$micro_batch"
    --global-batch-size "$global_batch"
    --seq-length "$seq_length"
    --lr "${MARCO_LR:-$LR}"
    --min-lr "${MARCO_MIN_LR:-$MIN_LR}"
    --lr-decay-style "${MARCO_LR_DECAY_STYLE:-$LR_DECAY_STYLE}"
    --lr-warmup-iters "${MARCO_WARMUP_ITERS:-$WARMUP_ITERS}"
    --curriculum "$curriculum"
    --data-cache-path "$data_cache"
    --save "$save_dir"
    --tensorboard-dir "$tb_root/$RUN/stage$stage"
    --log-json "$log_root/$RUN/stage$stage.jsonl"
    --log-interval "${MARCO_LOG_INTERVAL:-$LOG_INTERVAL}"
)
save_interval=${MARCO_SAVE_INTERVAL:-$SAVE_INTERVAL}
(( save_interval > 0 )) && pretrain+=(--save-interval "$save_interval")
eval_interval=${MARCO_EVAL_INTERVAL:-$EVAL_INTERVAL}
(( eval_interval > 0 )) && pretrain+=(--eval-interval "$eval_interval")
[[ -n ${MARCO_TRAIN_ITERS:-} ]] && pretrain+=(--train-iters "$MARCO_TRAIN_ITERS")
tokenizer=${MARCO_TOKENIZER:-}
if [[ ${MARCO_CPU:-0} != 1 ]]; then
    # Qwen3's tokenizer (vocab 151,936), a local Hugging Face directory.
    tokenizer=${tokenizer:-$MARCO_DATA_ROOT/tokenizer}
    pretrain+=(--use-distributed-optimizer)
fi
[[ -n $tokenizer ]] && pretrain+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$tokenizer")
if [[ -n ${MARCO_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<< "$MARCO_EXTRA_ARGS"
    pretrain+=("${extra[@]}")
fi
stage_cmd=(slurm/pretrain_stage.py --stage "$stage" --start-from "$start_from"
           --lr-schedule "$LR_SCHEDULE")
(( weights_only )) && stage_cmd+=(--weights-only)
stage_cmd+=(-- "${pretrain[@]}")

# ---------------------------------------------------------------- environment of the ranks
run_env=(PYTHONUNBUFFERED=1 "MARCO_PYTHON=$python" "MARCO_REPO=$repo"
         "MARCO_NNODES=$nnodes" "MARCO_NPROC_PER_NODE=$nproc"
         "MASTER_ADDR=$master_addr" "MASTER_PORT=$master_port"
         "MARCO_DATA_ROOT=$MARCO_DATA_ROOT")
if [[ ${MARCO_CPU:-0} == 1 ]]; then
    run_env+=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
else
    run_env+=(
        "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron comm/compute order
        "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail, don't hang
        "TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"  # less memory
        "NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}"                  # ride out short fabric hiccups
        "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
    )
    # Cluster-specific NCCL_SOCKET_IFNAME / NCCL_IB_HCA / ... pass through srun's environment.
fi

cpus=()
[[ -n ${SLURM_CPUS_ON_NODE:-} ]] && cpus=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
srun_command "${cpus[@]}" -- "${stage_cmd[@]}"

if [[ $dry_run == nul ]]; then
    printf '%s\0' "model=$model" "stage=$stage" "run=$RUN" "nodes=$nnodes" "nproc=$nproc" \
        "tp=$tp" "pp=$pp" "ep=$ep" "dp=$dp" "save=$save_dir"
    printf 'env=%s\0' "${run_env[@]}"
    printf 'arg=%s\0' "${stage_cmd[@]}"
    exit 0
elif [[ -n $dry_run ]]; then
    # The stage's steps and the flags pretrain_stage.py adds (--train-iters, the LR decay), and
    # every input it reads that is missing; MARCO_DRY_RUN=check exits 2 if one is.
    checked=0
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" "$repo/slurm/pretrain_stage.py" \
        "${stage_cmd[@]:1:$((${#stage_cmd[@]} - ${#pretrain[@]} - 2))}" --check -- "${pretrain[@]}" \
        2>&1 | sed 's/^/# /' || checked=$?
    [[ $dry_run == check && $checked != 0 ]] && die "inputs of $model stage $stage are missing (above)"
    show_dry_run "$model stage $stage: $nnodes nodes x $nproc processes = $world;" \
        "TP $tp PP $pp EP $ep DP $dp; checkpoints $save_dir"
fi

# ---------------------------------------------------------------- run, then requeue or finish
latest_file="$save_dir/latest_checkpointed_iteration.txt"
final_file="$save_dir/stage_final_iteration.txt"
before=$(read_iteration "$latest_file")
final=$(read_iteration "$final_file")
if (( before >= 0 && final >= 0 && before >= final )); then
    note "$model stage $stage is complete (iteration $before of $final): nothing to do"
    exit 0
fi
mkdir -p "$save_dir" "$log_root/$RUN" "$tb_root/$RUN"
export "${run_env[@]}"
note "$model stage $stage, job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}):" \
     "$nnodes nodes x $nproc, TP $tp PP $pp EP $ep DP $dp, master $master_addr:$master_port;" \
     "own checkpoint: $( (( before >= 0 )) && echo "iteration $before" || echo none)"
run_training
latest=$(read_iteration "$latest_file")
final=$(read_iteration "$final_file")
if (( final < 0 || latest < 0 )); then
    note "no checkpoint or final iteration in $save_dir after a clean exit: not requeued"
    exit 1
elif (( latest >= final )); then
    note "$model stage $stage finished at iteration $latest"
    exit 0
elif (( latest <= before )); then
    note "stopped at iteration $latest without progress since $before: not requeued"
    exit 1
fi
requeue "stopped at iteration $latest of $final (signal or --exit-interval)"
