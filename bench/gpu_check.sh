#!/usr/bin/env bash
# One prepared GPU check of this project (docs/gpu.md): on one H100/H200 machine with
# Python 3.12 and a CUDA torch, no internet and no TransformerEngine, in at most 8 minutes:
#   1. records the machine (nvidia-smi, Python, torch, CUDA)            -> environment.txt
#   2. installs the wheels carried beside the repo (.whl/, or --wheels DIR: megatron-core
#      0.16.1 for cp312) and this project, all with --no-deps, into a target directory
#                                                                       -> install.log
#   3. runs the GPU tests: pytest -m gpu tests/test_gpu.py               -> pytest.log, gpu_tests.xml
#   4. runs the Nano-slice benchmark rows that can run here               -> bench.md, bench.log
#   5. writes what passed, failed and took how long                       -> summary.md
# Each step has its own time limit and a failed step does not stop the next; the exit status
# is 0 only if every step passed. OUTDIR ends up with those seven files and nothing else (the
# device tool returns at most 8 files).
#
#   bash bench/gpu_check.sh OUTDIR [--wheels DIR] [--dry-run]
#
# --dry-run prints every command it would run, and the wheels it would install, and runs none
# of them (no GPU needed: tests/test_compat.py runs it on CPU).
set -euo pipefail

usage() {
    echo "usage: bash bench/gpu_check.sh OUTDIR [--wheels DIR] [--dry-run]" >&2
    exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
WHEELS="${MARCO_WHEELS:-$REPO/.whl}"
DRY_RUN=0
PY="${PYTHON:-python3}"
SITE="${MARCO_SITE:-/tmp/marco-gpu-site}"
# Seconds per step: their sum is 8 minutes (20 + 30 + 40 + 40 + 220 + 130 = 480).
T_ENV=20
T_WHEELS=30
T_PROJECT=40
T_IMPORTS=40
T_TESTS=220
T_BENCH=130
T_ROW=40

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
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
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    rm -f "$OUT"/{environment.txt,install.log,pytest.log,gpu_tests.xml,bench.md,bench.log,summary.md}
fi

export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
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

# 3. The GPU tests.
step gpu-tests "$T_TESTS" "$OUT/pytest.log" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA \
    -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

# 4. The Nano slice: the rows that run without TransformerEngine (its rows join where TE is).
ROWS=(sequential torch-grouped hf)
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import transformer_engine" >/dev/null 2>&1; then
    ROWS=(sequential torch-grouped te te+fp8 hf)
fi
step nano-slice "$T_BENCH" "$OUT/bench.log" bash -c \
    "$PY bench/bench_gpu_nano_slice.py --num-layers 2 --seq-length 4096 --warmup 2 --steps 5 --timeout $T_ROW --rows ${ROWS[*]} > '$OUT/bench.md'"

# 5. Summary.
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
