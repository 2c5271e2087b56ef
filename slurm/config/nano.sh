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
# slurm/posttrain.sh; docs/posttraining.md): Marco's SFT/OPD recipe, shared by the models,
# and this model's OPD cascade (phases, teachers, steps).
# shellcheck source=slurm/posttrain_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/../posttrain_recipe.sh"
OPD_CASCADE=configs/posttrain/marco_nano_cascade.yaml  # [MARCO_OPD_CASCADE]
