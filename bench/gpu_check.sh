#!/usr/bin/env bash
# One prepared GPU check of this project (docs/gpu.md): on one CUDA GPU with Python 3.12 and a
# CUDA torch, offline, TransformerEngine optional, in at most 6 minutes with the install:
#   1. records the machine (nvidia-smi, Python, torch, CUDA)            -> environment.txt
#   2. installs the wheels carried beside the repo (.whl/, or --wheels DIR) and this project,
#      all with --no-deps, into a target directory                      -> install.log
#   3. what a user runs on a GPU, on the checkpoint the first of them trains -> steps.log
#      train      pretrain_marco.py: bf16 tiny MoE, 20 steps, saved
#      generate   tools/generate.py --load: greedy, two prompts (text and chat)
#      evaluate   tools/evaluate.py --load: one bundled task, 8 examples
#      sft-step   posttrain_marco.py sft: two bf16 steps on the bundled chat sample
#      opd-step   posttrain_marco.py opd: one bf16 step, the trained checkpoint as an
#                 in-process teacher, full-vocabulary reverse KL
#   4. runs the GPU tests: pytest -m gpu tests/test_gpu.py               -> pytest.log, gpu_tests.xml
#   5. with --bench only: the Nano-slice benchmark rows that can run here -> bench.md, bench.log
#   6. writes what passed, failed and took how long                       -> summary.md
# Each step has its own time limit (their sum is 360 s without --bench) and a failed step does
# not stop the next; the exit status is 0 only if every step passed. OUTDIR ends up with those
# files and nothing else; the checkpoints and outputs of step 3 go to MARCO_GPU_WORK
# (default /tmp/marco-gpu-check).
#
#   bash bench/gpu_check.sh OUTDIR [--wheels DIR] [--bench] [--dry-run]
#
# --dry-run prints every command it would run, and the wheels it would install, and runs none
# of them (no GPU needed: tests/test_compat.py runs it on CPU).
set -euo pipefail

usage() {
    echo "usage: bash bench/gpu_check.sh OUTDIR [--wheels DIR] [--bench] [--dry-run]" >&2
    exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
WHEELS="${MARCO_WHEELS:-$REPO/.whl}"
DRY_RUN=0
BENCH=0
PY="${PYTHON:-python3}"
SITE="${MARCO_SITE:-/tmp/marco-gpu-site}"
WORK="${MARCO_GPU_WORK:-/tmp/marco-gpu-check}"
# Seconds per step: their sum is 6 minutes
# (10 + 20 + 25 + 15 + 35 + 20 + 25 + 30 + 40 + 140 = 360); --bench adds 130.
T_ENV=10
T_WHEELS=20
T_PROJECT=25
T_IMPORTS=15
T_TRAIN=35
T_GENERATE=20
T_EVALUATE=25
T_SFT=30
T_OPD=40
T_TESTS=140
T_BENCH=130
T_ROW=40

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --bench) BENCH=1 ;;
        --wheels) [ $# -ge 2 ] || usage; WHEELS="$2"; shift ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage

declare -A STATUS SECONDS_TAKEN
ORDER=()

# step NAME LIMIT LOG CMD...: run CMD under `timeout LIMIT`, output to LOG (appended), record
# the status; in a dry run only print it.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    ORDER+=("$name")
    printf '+ [%s, <= %ss] %s > %s\n' "$name" "$limit" "$*" "$log"
    if [ "$DRY_RUN" = 1 ]; then
        STATUS[$name]="dry run"
        SECONDS_TAKEN[$name]=0
        return 0
    fi
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    case "$rc" in
        0) STATUS[$name]="passed" ;;
        124|137) STATUS[$name]="timed out after ${limit}s" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    echo "  ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
}

shopt -s nullglob
WHEEL_FILES=("$WHEELS"/*.whl)
shopt -u nullglob

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: nothing is executed; OUTDIR $OUT, repo $REPO, python $PY, site $SITE"
    echo "wheels in $WHEELS: ${#WHEEL_FILES[@]}"
    for w in "${WHEEL_FILES[@]}"; do echo "  $(basename "$w")"; done
    if [ "${#WHEEL_FILES[@]}" = 0 ]; then
        echo "  (none: download them first, see docs/gpu.md)"
    fi
else
    mkdir -p "$OUT" "$WORK"
    OUT=$(cd "$OUT" && pwd)
    rm -f "$OUT"/{environment.txt,install.log,steps.log,pytest.log,gpu_tests.xml,bench.md,bench.log,summary.md}
    rm -rf "${WORK:?}"/{ckpt,sft,eval,cache,generations.jsonl}
    printf '%s\n' '{"prompt": "The weather today"}' \
        '{"messages": [{"role": "user", "content": "Say hello."}]}' >"$WORK/prompts.jsonl"
fi

export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MARCO_CACHE="$WORK/cache"
cd "$REPO"

# 1. The machine.
step environment "$T_ENV" "$OUT/environment.txt" bash -c \
    "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'"

# 2. The carried wheels and this project, offline, no dependency resolution.
if [ "${#WHEEL_FILES[@]}" -gt 0 ]; then
    step install-wheels "$T_WHEELS" "$OUT/install.log" "$PY" -m pip install -q --no-index \
        --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEEL_FILES[@]}"
fi
step install-project "$T_PROJECT" "$OUT/install.log" "$PY" -m pip install -q --no-index \
    --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$REPO"
step imports "$T_IMPORTS" "$OUT/install.log" "$PY" -c \
    "import megatron.core, megatron_ext.trainer, transformers; print('megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"

# 3. What a user runs on a GPU, on a checkpoint trained here (each step logs to steps.log).
STEPS_LOG="$OUT/steps.log"
TINY=(--preset tiny --bf16 --seq-length 128 --micro-batch-size 4 --global-batch-size 8
      --log-interval 1)
step train "$T_TRAIN" "$STEPS_LOG" "$PY" pretrain_marco.py "${TINY[@]}" --train-iters 20 \
    --lr 3e-3 --save "$WORK/ckpt"
step generate "$T_GENERATE" "$STEPS_LOG" "$PY" tools/generate.py --load "$WORK/ckpt" \
    --prompts "$WORK/prompts.jsonl" --out "$WORK/generations.jsonl" --overwrite \
    --temperature 0 --max-new-tokens 16 --dtype bf16
step evaluate "$T_EVALUATE" "$STEPS_LOG" "$PY" tools/evaluate.py --load "$WORK/ckpt" \
    --tasks marco_continuation_en --limit 8 --batch-size 4 --bootstrap-iters 0 --dtype bf16 \
    --out "$WORK/eval" --overwrite
step sft-step "$T_SFT" "$STEPS_LOG" "$PY" posttrain_marco.py sft --load "$WORK/ckpt" \
    "${TINY[@]:2}" --train-iters 2 --save "$WORK/sft"
step opd-step "$T_OPD" "$STEPS_LOG" "$PY" posttrain_marco.py opd --load "$WORK/sft" \
    --teacher "$WORK/ckpt" --opd-loss rkl "${TINY[@]:2}" --train-iters 1 \
    --rollout-batch-size 4 --n-samples-per-prompt 2 --rollout-max-prompt-len 96 \
    --rollout-max-response-len 16 --eval-interval 0

# 4. The GPU tests.
step gpu-tests "$T_TESTS" "$OUT/pytest.log" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA \
    -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

# 5. With --bench: the Nano slice, the rows that run without TransformerEngine (its rows join
# where TE is).
if [ "$BENCH" = 1 ]; then
    ROWS=(sequential torch-grouped hf)
    if [ "$DRY_RUN" = 0 ] && "$PY" -c "import transformer_engine" >/dev/null 2>&1; then
        ROWS=(sequential torch-grouped te te+fp8 hf)
    fi
    step nano-slice "$T_BENCH" "$OUT/bench.log" bash -c \
        "$PY bench/bench_gpu_nano_slice.py --num-layers 2 --seq-length 4096 --warmup 2 --steps 5 --timeout $T_ROW --rows ${ROWS[*]} > '$OUT/bench.md'"
fi

# 6. Summary.
summary() {
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---:|"
    for name in "${ORDER[@]}"; do
        echo "| $name | ${STATUS[$name]} | ${SECONDS_TAKEN[$name]} |"
    done
    if [ -f "$OUT/pytest.log" ]; then
        echo
        echo '```'
        grep -E '^(PASSED|FAILED|SKIPPED|ERROR)|[0-9]+ (passed|failed|skipped)' "$OUT/pytest.log" || true
        echo '```'
    fi
    if [ -s "$OUT/bench.md" ]; then
        echo
        cat "$OUT/bench.md"
    fi
}
if [ "$DRY_RUN" = 1 ]; then
    echo "+ [summary] > $OUT/summary.md"
    exit 0
fi
summary >"$OUT/summary.md"
cat "$OUT/summary.md"
for name in "${ORDER[@]}"; do
    [ "${STATUS[$name]}" = passed ] || exit 1
done
exit 0
