# shellcheck shell=bash disable=SC2034  # variables read by slurm/posttrain.sh
# Marco's post-training recipe, the same for every model: the SFT_* and OPD_* defaults that
# slurm/config/{nano,mini}.sh source (each names its own OPD_CASCADE). Read by slurm/posttrain.sh
# (slurm/*_sft.sbatch, slurm/*_opd.sbatch; docs/posttraining.md); each value below is a default
# that the MARCO_* variable in brackets overrides. Same parallel layout as pre-training.
#
# SFT, Marco's recipe (model card): about 4k steps, lr 1e-5 cosine to 1e-6, global batch 512
# of 8,192 tokens (packed conversations). Micro batch 1: pre-training's per-GPU estimate (in
# the model config) at 8,192 tokens instead of 4,096 adds ~14 GiB of activations and logits
# (~45 GiB in all for Mini).
SFT_ITERS=4000                                       # [MARCO_SFT_ITERS]
SFT_LR=1e-5                                          # [MARCO_SFT_LR]
SFT_MIN_LR=1e-6                                      # [MARCO_SFT_MIN_LR]
SFT_GLOBAL_BATCH=512                                 # [MARCO_SFT_GLOBAL_BATCH] conversations' rows
SFT_MICRO_BATCH=1                                    # [MARCO_SFT_MICRO_BATCH]
SFT_SEQ_LENGTH=8192                                  # [MARCO_SFT_SEQ_LENGTH]
SFT_DATA=sft/train                                   # [MARCO_SFT_DATA] under MARCO_DATA_ROOT:
SFT_VALID_DATA=sft/valid                             # [MARCO_SFT_VALID_DATA] tools/preprocess_chat_data.py
SFT_SAVE_INTERVAL=200                                # [MARCO_SFT_SAVE_INTERVAL]
SFT_EVAL_INTERVAL=200                                # [MARCO_SFT_EVAL_INTERVAL]
# OPD, Marco's cascade (OPD_CASCADE in the model config: phases, teachers, steps):
# lr 1e-6 constant, 512 prompts x 2 responses = 1,024 sequences per step.
OPD_LR=1e-6                                          # [MARCO_OPD_LR]
OPD_MIN_LR=1e-6                                      # [MARCO_OPD_MIN_LR]
OPD_GLOBAL_BATCH=1024                                # [MARCO_OPD_GLOBAL_BATCH] sequences per step
OPD_MICRO_BATCH=1                                    # [MARCO_OPD_MICRO_BATCH]
OPD_DECODE_BATCH=16                                  # [MARCO_OPD_DECODE_BATCH] rows decoded together
# OPD memory per GPU at the shipped layout (`python slurm/memory_estimate.py`; TP 1, EP 8, 64
# GPUs, Qwen3-30B-A3B beside the student, 16 rows x 10,240 tokens): the student's state (Nano
# 8.6, Mini 16.7 GiB) + the teacher's bf16 weights (9.6 GiB) + the largest phase, the rollout
# (17.5 GiB of KV cache + prefill, ~22.5 GiB); scoring ~5.5 and the training micro-batch ~11.3
# GiB come after it. Nano 42.5 GiB, Mini 51.1 GiB with CUDA/NCCL, of 79.6. slurm/posttrain.sh
# refuses (one line, with the estimate) a layout over 90% of an H100.
OPD_PROMPTS=opd/prompts.jsonl                        # [MARCO_OPD_PROMPTS] chat jsonl
OPD_EVAL_PROMPTS=opd/heldout_prompts.jsonl           # [MARCO_OPD_EVAL_PROMPTS]
OPD_SAVE_INTERVAL=50                                 # [MARCO_OPD_SAVE_INTERVAL]
OPD_EVAL_INTERVAL=100                                # [MARCO_OPD_EVAL_INTERVAL]
