#!/usr/bin/env bash
# Every CPU benchmark, one after the other (under 10 minutes on 2 cores); the tables go to
# stdout and to runs/bench/cpu_<date>.md (for bench/RESULTS.md).
#   bash bench/run_cpu.sh            # full: includes upcycling the whole of Marco-Nano (15 GiB)
#   UPCYCLE_LAYERS=2 bash bench/run_cpu.sh   # a quick look
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p runs/bench && OUT=runs/bench/cpu_$(date +%Y%m%d_%H%M).md
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error

run() {
  printf '\n## %s\n\n```\n$ %s\n' "$1" "${*:2}"
  "${@:2}"
  printf '```\n'
}
{
  run "Training step, tiny preset: ours vs Hugging Face" "$PY" bench/bench_cpu_tiny.py
  run "Training step, tiny preset, one thread, with profiles" \
    env OMP_NUM_THREADS=1 "$PY" bench/bench_cpu_tiny.py --profile
  run "Preprocessing throughput" "$PY" bench/bench_preprocess.py
  run "Upcycling Qwen3-0.6B -> Marco-Nano" "$PY" bench/bench_upcycle.py --layers "${UPCYCLE_LAYERS:-28}"
  run "GPU Nano slice" "$PY" bench/bench_gpu_nano_slice.py
} | tee "$OUT"  # progress bars and warnings (stderr) stay on the terminal
echo "wrote $OUT"
