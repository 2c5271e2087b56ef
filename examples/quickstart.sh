#!/usr/bin/env bash
# The Marco-MoE recipe end to end at toy scale, on CPU:
#   tokenizer -> preprocessed corpus -> dense parent (tiny-dense) -> HF qwen3 export ->
#   Drop-Upcycling to a 16-expert MoE (tiny) -> four-stage curriculum -> HF qwen3_moe export ->
#   generation with transformers -> routing analysis.
#
#   bash examples/quickstart.sh                   # everything under runs/quickstart
#
# Environment (defaults in brackets):
#   QUICKSTART_OUT      output directory [<repo>/runs/quickstart]; replaced if a previous run
#                       wrote it, refused if it holds anything else
#   DENSE_ITERS         dense pre-training steps [300]
#   MOE_ITERS           MoE steps of 8 x 256 tokens [499 = the whole tiny curriculum, 1.02M
#                       tokens; fewer stop inside it]
#   UPCYCLE_SCALE       marco | exact | none [marco]
#   UPCYCLE_DROP_RATIO  Drop-Upcycling ratio [0.5]; exact + 0 reproduces the dense model
#   PYTHON              interpreter [python3];  OMP_NUM_THREADS [2]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${QUICKSTART_OUT:-$REPO/runs/quickstart}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute, relative to the caller's directory
cd "$REPO"
DENSE_ITERS=${DENSE_ITERS:-300}
MOE_ITERS=${MOE_ITERS:-499}
UPCYCLE_SCALE=${UPCYCLE_SCALE:-marco}
UPCYCLE_DROP_RATIO=${UPCYCLE_DROP_RATIO:-0.5}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export MARCO_CACHE="$OUT/cache"  # dataset index caches: nothing outside $OUT is assumed or touched
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1  # local files only

START=$SECONDS
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

if [[ -n "$(ls -A "$OUT")" && ! -e "$OUT/.quickstart" ]]; then
  die "QUICKSTART_OUT=$OUT is not empty and was not written by the quickstart"
fi
find "$OUT" -mindepth 1 -delete
touch "$OUT/.quickstart"

TOK="$OUT/tokenizer/marco_tiny_spm.model"
step "1/9 tokenizer: SentencePiece BPE, 8192 pieces, byte fallback"
"$PY" tools/train_tokenizer.py --output-prefix "${TOK%.model}"

step "2/9 preprocess the sample corpus (19 languages) into Megatron indexed datasets"
mkdir -p "$OUT/data"
for split in train valid; do
  "$PY" tools/preprocess_data.py --input data/corpus/*."$split".jsonl.gz --lang-key lang \
    --output-prefix "$OUT/data/$split" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$TOK" --append-eod --workers 2 --no-progress | tee "$OUT/data/$split.log"
done
# The dense parent sees the natural language mix: 'tokens prefix' pairs for --data-path.
mapfile -t DENSE_BLEND < <(sed -n 's|^wrote \(.*\)\.bin/\.idx (\([0-9]*\) tokens)$|\2\n\1|p' "$OUT/data/train.log")
mapfile -t VALID < <(sed -n 's|^wrote \(.*\)\.bin/\.idx (.*$|\1|p' "$OUT/data/valid.log")
VALID_SETS=()  # one validation loss per language ('weight prefix' pairs, weights unused)
for prefix in "${VALID[@]}"; do VALID_SETS+=(1 "$prefix"); done
# The tiny curriculum over these files (same stages and blends as configs/curriculum/tiny.yaml).
"$PY" - "$OUT" <<'EOF'
import re, sys, yaml
out = sys.argv[1]
cur = yaml.safe_load(open("configs/curriculum/tiny.yaml"))
cur["data_root"] = f"{out}/data"
rename = lambda p: re.sub(r"^(\w+?)_(train|valid)_text_document$", r"\2_\1_text_document", p)
for name, src in cur["sources"].items():
    src["prefix"] = rename(src["prefix"])
cur["validation"] = {k: rename(v) for k, v in cur["validation"].items()}
yaml.safe_dump(cur, open(f"{out}/curriculum.yaml", "w"), sort_keys=False)
EOF

# Micro-batches: 4 x 256 tokens for the dense model; 8 for the MoE, whose step time on CPU is
# mostly per-step overhead (8 costs about what 4 does), so the curriculum takes half the steps.
COMMON=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK" --log-interval 50
        --eval-iters 1 --data-cache-path "$OUT/cache")
step "3/9 pre-train the dense parent (tiny-dense, ${DENSE_ITERS} steps)"
"$PY" pretrain_marco.py --preset tiny-dense "${COMMON[@]}" --micro-batch-size 4 --data-path "${DENSE_BLEND[@]}" --split 100,0,0 \
  --valid-data-path "${VALID_SETS[@]}" --train-iters "$DENSE_ITERS" --lr 3e-3 --min-lr 3e-4 \
  --eval-interval "$DENSE_ITERS" --save "$OUT/dense/ckpt" \
  --tensorboard-dir "$OUT/tensorboard/dense" --log-json "$OUT/dense/log.jsonl"

step "4/9 export the dense parent to Hugging Face (qwen3)"
"$PY" tools/export_mcore_to_hf.py --load "$OUT/dense/ckpt" --out "$OUT/dense/hf"

step "5/9 upcycle to tiny (16 experts x 128, top-4): scale ${UPCYCLE_SCALE}, drop ratio ${UPCYCLE_DROP_RATIO}"
"$PY" tools/upcycle_hf_to_mcore.py --hf-dir "$OUT/dense/hf" --save "$OUT/moe/init" --preset tiny \
  --scale "$UPCYCLE_SCALE" --drop-ratio "$UPCYCLE_DROP_RATIO"
# Dense parent after training vs the MoE before its first step, on the same held-out tokens.
"$PY" examples/eval_loss.py --load "$OUT/dense/ckpt" "$OUT/moe/init" --data "${VALID[@]}" \
  --json "$OUT/moe/step0_vs_dense.json"

step "6/9 MoE pre-training on the four-stage curriculum (${MOE_ITERS} steps)"
MOE_EVAL=$((MOE_ITERS >= 6 ? MOE_ITERS / 6 : 1))  # six evaluations: every stage gets one
"$PY" pretrain_marco.py --preset tiny "${COMMON[@]}" --micro-batch-size 8 --load "$OUT/moe/init" \
  --curriculum "$OUT/curriculum.yaml" --train-iters "$MOE_ITERS" --lr 1e-3 --min-lr 1e-4 \
  --eval-interval "$MOE_EVAL" --save "$OUT/moe/ckpt" \
  --tensorboard-dir "$OUT/tensorboard/moe" --log-json "$OUT/moe/log.jsonl"

step "7/9 export the MoE to Hugging Face (qwen3_moe)"
"$PY" tools/export_mcore_to_hf.py --load "$OUT/moe/ckpt" --out "$OUT/moe/hf"

step "8/9 generate with transformers"
"$PY" examples/generate.py --model "$OUT/moe/hf" --langs en de fr es ru zh ja \
  --json "$OUT/generations.json"

step "9/9 routing analysis (language-expert signatures, correlation heatmap)"
"$PY" tools/analyze_routing.py --load "$OUT/moe/ckpt" --out "$OUT/routing" \
  --max-tokens-per-language 8192

"$PY" - "$OUT" "$((SECONDS - START))" <<'EOF'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
def records(path):
    return [r for r in map(json.loads, open(path)) if "lm_loss" in r]
dense, moe = records(f"{out}/dense/log.jsonl"), records(f"{out}/moe/log.jsonl")
held = json.load(open(f"{out}/moe/step0_vs_dense.json"))
(dense_ckpt, dense_eval), (moe_ckpt, moe_eval) = held["losses"].items()
summary = {
    "seconds": seconds,
    "dense_final_train_loss": dense[-1]["lm_loss"], "moe_step0_train_loss": moe[0]["lm_loss"],
    "moe_final_train_loss": moe[-1]["lm_loss"],
    "dense_final_heldout_loss": dense_eval, "moe_step0_heldout_loss": moe_eval,
    "heldout_gap": (moe_eval - dense_eval) / dense_eval, "heldout_tokens": held["tokens"],
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"""
== done in {seconds // 60}m{seconds % 60:02d}s. Artefacts under {out}:
  tokenizer          tokenizer/marco_tiny_spm.model
  indexed data       data/{{train,valid}}_<lang>_text_document.{{bin,idx}}, curriculum.yaml
  dense parent       dense/ckpt (Megatron), dense/hf (HF qwen3), dense/log.jsonl
  upcycled MoE       moe/init (step 0, Megatron)
  trained MoE        moe/ckpt (Megatron), moe/hf (HF qwen3_moe), moe/log.jsonl
  generations        generations.json
  routing analysis   routing/correlation_heatmap.png (+ signatures, clustering, entropy)
  summary            summary.json

  loss                         dense parent, final    MoE, step 0
  training batch (own data)    {dense[-1]['lm_loss']:<22.4f}{moe[0]['lm_loss']:.4f}
  held-out ({held['tokens']} tokens)      {dense_eval:<22.4f}{moe_eval:.4f}   gap {summary['heldout_gap']:+.2%}
  MoE after {len(moe)} steps: training loss {moe[-1]['lm_loss']:.4f}

  TensorBoard:  tensorboard --logdir {out}/tensorboard   (then open http://localhost:6006)
  Try the model: python examples/generate.py --model {out}/moe/hf --prompt "NAME"
""")
EOF
