#!/usr/bin/env bash
# Marco's Instruct recipe at toy scale, on CPU, after examples/quickstart.sh:
#   SFT of the quickstart's MoE on the bundled 19-language chat sample (assistant-token loss,
#   packed conversations) -> answers in several languages (our KV-cached generator) -> HF export
#   with the chat template (plain transformers apply_chat_template + generate) -> cascaded
#   on-policy distillation: the SFT run's step-1/3 checkpoint as the student, distilled from
#   teacher A (its step-2/3 checkpoint), then from the stronger teacher B (its last).
#
#   bash examples/posttrain_quickstart.sh          # everything under runs/posttrain_quickstart
#
# Environment (defaults in brackets):
#   QUICKSTART_OUT   the pre-training quickstart's output [<repo>/runs/quickstart]; made by
#                    running examples/quickstart.sh when its trained MoE is absent
#   POSTTRAIN_OUT    output directory [<repo>/runs/posttrain_quickstart]; replaced if a previous
#                    run wrote it, refused if it holds anything else
#   SFT_ITERS        SFT steps of 8 x 256 tokens, a multiple of 3 [150]
#   OPD              1 to run the distillation part [1]
#   PYTHON           interpreter [python3];  OMP_NUM_THREADS [2]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QS=${QUICKSTART_OUT:-$REPO/runs/quickstart}
OUT=${POSTTRAIN_OUT:-$REPO/runs/posttrain_quickstart}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
SFT_ITERS=${SFT_ITERS:-150}
RUN_OPD=${OPD:-1}
PY=${PYTHON:-python3}
[[ "$SFT_ITERS" =~ ^[0-9]+$ && $((SFT_ITERS % 3)) == 0 && "$SFT_ITERS" -gt 0 ]] ||
  { echo "error: SFT_ITERS=$SFT_ITERS: expected a positive multiple of 3" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1

START=$SECONDS
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

if [[ ! -e "$QS/moe/ckpt/latest_checkpointed_iteration.txt" ]]; then
  step "0 the pre-training quickstart's MoE is not in $QS: running examples/quickstart.sh"
  QUICKSTART_OUT="$QS" bash examples/quickstart.sh
fi
QS=$(cd "$QS" && pwd)
if [[ -n "$(ls -A "$OUT")" && ! -e "$OUT/.posttrain_quickstart" ]]; then
  die "POSTTRAIN_OUT=$OUT is not empty and was not written by this script"
fi
find "$OUT" -mindepth 1 -delete
touch "$OUT/.posttrain_quickstart"
export MARCO_CACHE="$OUT/cache"

TOK="$QS/tokenizer/marco_tiny_spm.model"
COMMON=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK" --data-cache-path "$OUT/cache"
        --micro-batch-size 8 --seq-length 256 --seed 1234)

step "1/5 held-out assistant loss of the pre-trained MoE (before SFT)"
"$PY" posttrain_marco.py sft "${COMMON[@]}" --load "$QS/moe/ckpt" --skip-train \
  --log-json "$OUT/sft_before.jsonl"

step "2/5 SFT on the bundled chat sample (${SFT_ITERS} steps, packed, lr 1e-3 cosine)"
"$PY" posttrain_marco.py sft "${COMMON[@]}" --load "$QS/moe/ckpt" --train-iters "$SFT_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --log-interval 25 --eval-interval "$SFT_ITERS" \
  --save-interval $((SFT_ITERS / 3)) \
  --save "$OUT/sft/ckpt" --tensorboard-dir "$OUT/tensorboard/sft" --log-json "$OUT/sft/log.jsonl"

step "3/5 answers to held-out questions (greedy, KV-cached generator, ChatML prompts)"
"$PY" - "$OUT/questions.jsonl" <<'EOF'
import gzip, json, sys
want = ["en", "de", "fr", "es", "ru", "zh", "ja"]
seen, out = set(), []
for line in gzip.open("data/sft/valid.jsonl.gz", "rt"):
    row = json.loads(line)
    if row["lang"] in want and row["kind"] == "name" and row["lang"] not in seen:
        seen.add(row["lang"])
        out.append({"lang": row["lang"], "messages": row["messages"][:1],
                    "reference": row["messages"][1]["content"]})
with open(sys.argv[1], "w") as f:
    for row in sorted(out, key=lambda r: want.index(r["lang"])):
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
EOF
"$PY" tools/generate.py --load "$OUT/sft/ckpt" --prompts "$OUT/questions.jsonl" \
  --out "$OUT/answers.jsonl" --temperature 0 --max-new-tokens 40

step "4/5 export the Instruct model to Hugging Face (qwen3_moe + chat template) and chat in transformers"
"$PY" tools/export_mcore_to_hf.py --load "$OUT/sft/ckpt" --out "$OUT/sft/hf"
"$PY" - "$OUT/sft/hf" "$OUT/questions.jsonl" "$OUT/hf_answers.jsonl" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf, questions, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
with open(out, "w") as f:
    for row in map(json.loads, open(questions)):
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        f.write(json.dumps({"lang": row["lang"], "text": text}, ensure_ascii=False) + "\n")
EOF

if [[ "$RUN_OPD" == 1 ]]; then
  # Student, teacher A and teacher B: the SFT run's checkpoints at 1/3, 2/3 and all of its
  # steps (a teacher trained longer on the same data; examples/opd_demo.py without --teachers
  # trains two dense teachers instead, about half an hour on 2 cores).
  ITER() { printf '%s/sft/ckpt/iter_%07d' "$OUT" "$1"; }
  step "5/5 cascaded on-policy distillation: student (SFT step $((SFT_ITERS / 3))) from teacher A (step $((2 * SFT_ITERS / 3))), then B (step $SFT_ITERS)"
  "$PY" examples/opd_demo.py --student "$(ITER $((SFT_ITERS / 3)))" --tokenizer-model "$TOK" \
    --teachers "$(ITER $((2 * SFT_ITERS / 3)))" "$(ITER "$SFT_ITERS")" \
    --out "$OUT/opd" --json "$OUT/opd/summary.json"
fi

"$PY" - "$OUT" "$((SECONDS - START))" <<'EOF'
import json, os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
key = "validation/lm_loss/sft_valid"
before = json.loads(open(f"{out}/sft_before.jsonl").readline())[key]
log = [json.loads(l) for l in open(f"{out}/sft/log.jsonl")]
after = [r[key] for r in log if key in r][-1]
train = [r["lm_loss"] for r in log if "lm_loss" in r]
answers = [json.loads(l) for l in open(f"{out}/answers.jsonl")]
questions = [json.loads(l) for l in open(f"{out}/questions.jsonl")]
hf = [json.loads(l) for l in open(f"{out}/hf_answers.jsonl")]
summary = {"seconds": seconds, "sft_steps": len(train),
           "heldout_assistant_loss_before_sft": before, "heldout_assistant_loss_after_sft": after,
           "sft_first_train_loss": train[0], "sft_final_train_loss": train[-1],
           "answers": [{"lang": q["lang"], "question": q["messages"][0]["content"],
                        "reference": q["reference"], "ours": a["text"], "transformers": h["text"]}
                       for q, a, h in zip(questions, answers, hf)]}
if os.path.exists(f"{out}/opd/summary.json"):
    summary.update(json.load(open(f"{out}/opd/summary.json")))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2, ensure_ascii=False)
print(f"\n== done in {seconds // 60}m{seconds % 60:02d}s. Artefacts under {out}: sft/ckpt, "
      f"sft/hf (with chat template), answers.jsonl, opd/, summary.json")
print(f"  held-out assistant-token loss: before SFT {before:.4f}, after {len(train)} steps {after:.4f}")
for row in summary["answers"]:
    print(f"  [{row['lang']}] {row['question']}\n       ours: {row['ours']!r}\n  reference: {row['reference']!r}")
for phase in summary.get("opd_phases", []):
    print(f"  OPD phase {phase['name']} (teacher {phase['teacher']}): held-out reverse KL "
          f"{phase['heldout_rkl_before']:.4f} -> {phase['heldout_rkl_after']:.4f}, assistant loss "
          f"{phase['heldout_assistant_loss_before']:.4f} -> {phase['heldout_assistant_loss_after']:.4f}")
EOF
