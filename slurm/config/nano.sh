# shellcheck shell=bash disable=SC2034  # variables read by slurm/launch.sh, which sources this
# Marco-Nano: preset nano (232 experts x 384, top-8; 8.0B total / 0.60B active), trained
# through the paper's four-stage 5.1T-token curriculum, one sbatch script per stage
# (slurm/nano_stage{1,2,3,4}.sbatch). Sourced by slurm/launch.sh; each value below is a
# default that the MARCO_* variable in brackets overrides (docs/cluster.md).
RUN=nano
PRESET=nano                                          # [MARCO_PRESET]
CURRICULUM=configs/curriculum/marco_5.1T.yaml        # [MARCO_CURRICULUM]
STAGES=(1 2 3 4)
INIT_CHECKPOINT=nano/upcycled                        # [MARCO_INIT_CHECKPOINT] under MARCO_CKPT_ROOT
INIT_WEIGHTS_ONLY=0
#
# Parallel layout, for 8 x H100 80 GB per node; the default 8 nodes make 64 GPUs:
#   TP 1  hidden 1024 / 16 heads: TP would only add all-reduces (and sequence parallelism).
#   PP 1  the model state fits on one GPU once the experts are split: no pipeline bubble.
#   EP 8  232 = 8 x 29 experts: 29 per GPU, the all-to-all inside a node (NVLink).
#         (EP must divide 232: 1, 2, 4, 8, 29, ...; 16 would not.)
#   DP    world / (TP x PP) = 64; each expert has 64 / 8 = 8 replicas.
#   Distributed optimizer: fp32 master weights and Adam moments sharded over the replicas.
TP=1
PP=1
EP=8
NODES=8
GPUS_PER_NODE=8
#
# Per-GPU memory at 64 GPUs (python slurm/memory_estimate.py --preset nano --ep 8 --dp 64
# --micro-batch-size 2 [--imbalance 2]); GiB = 2^30 bytes, H100 80 GB = 79.6 GiB:
#   parameters on one GPU: dense part 0.338B (replicated)
#     + experts 28 x 232 x 3 x 1024 x 384 / EP 8 = 0.958B  ->  1.296B
#   bf16 weights      2 B x 1.296B                                          2.4 GiB
#   fp32 gradients    4 B x 1.296B                                          4.8 GiB
#   optimizer         12 B x (0.338B / 64 + 0.958B / 8)                     1.4 GiB
#   activations       8192 tokens x 28 layers x 29,472 B (attention, norms, router)  6.3 GiB
#                     8192 tokens x 28 layers x 51,200 B (experts, top-8 copies)    10.9 GiB
#   logits            8192 x 151,936 x (2 + 4) B                            7.0 GiB
#   total 32.8 GiB; 43.8 GiB at 2x expert-token imbalance; + ~2 GiB CUDA context / NCCL.
MICRO_BATCH=2
GLOBAL_BATCH=1024                                    # 4.19M tokens/step
SEQ_LENGTH=4096
#
# Learning rate (not published): as mini, WSD over the chain, annealed during stage 4.
LR=3e-4
MIN_LR=3e-5
LR_DECAY_STYLE=WSD
WARMUP_ITERS=2000
LR_SCHEDULE=run
SAVE_INTERVAL=2000                                   # ~112 GB per checkpoint (8.0B x 14 B)
EVAL_INTERVAL=5000
LOG_INTERVAL=10
#
# Post-training after stage 4 (slurm/nano_sft.sbatch, slurm/nano_opd.sbatch, through
# slurm/posttrain.sh; docs/posttraining.md). Same layout as pre-training.
# SFT, Marco's recipe (model card): about 4k steps, lr 1e-5 cosine to 1e-6, global batch 512
# of 8,192 tokens (packed conversations). Micro batch 1: pre-training's per-GPU estimate above
# at 8,192 tokens instead of 4,096 adds ~14 GiB of activations and logits (~45 GiB in all).
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
# OPD, Marco's cascade (configs/posttrain/marco_nano_cascade.yaml: phases, teachers, steps):
# lr 1e-6 constant, 512 prompts x 2 responses = 1,024 sequences per step.
OPD_CASCADE=configs/posttrain/marco_nano_cascade.yaml  # [MARCO_OPD_CASCADE]
OPD_LR=1e-6                                          # [MARCO_OPD_LR]
OPD_MIN_LR=1e-6                                      # [MARCO_OPD_MIN_LR]
OPD_GLOBAL_BATCH=1024                                # [MARCO_OPD_GLOBAL_BATCH] sequences per step
OPD_MICRO_BATCH=1                                    # [MARCO_OPD_MICRO_BATCH]
OPD_DECODE_BATCH=16                                  # [MARCO_OPD_DECODE_BATCH] rows decoded together
OPD_PROMPTS=opd/prompts.jsonl                        # [MARCO_OPD_PROMPTS] chat jsonl
OPD_EVAL_PROMPTS=opd/heldout_prompts.jsonl           # [MARCO_OPD_EVAL_PROMPTS]
OPD_SAVE_INTERVAL=50                                 # [MARCO_OPD_SAVE_INTERVAL]
OPD_EVAL_INTERVAL=100                                # [MARCO_OPD_EVAL_INTERVAL]
