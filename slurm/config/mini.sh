# shellcheck shell=bash disable=SC2034  # variables read by slurm/launch.sh, which sources this
# Marco-Mini: preset mini (256 experts x 768, top-8; 17.3B total / 0.86B active), trained
# through the paper's four-stage 5.1T-token curriculum, one sbatch script per stage
# (slurm/mini_stage{1,2,3,4}.sbatch). Sourced by slurm/launch.sh; each value below is a
# default that the MARCO_* variable in brackets overrides (docs/cluster.md).
RUN=mini
PRESET=mini                                          # [MARCO_PRESET]
CURRICULUM=configs/curriculum/marco_5.1T.yaml        # [MARCO_CURRICULUM]
STAGES=(1 2 3 4)                                     # stages of CURRICULUM this model runs
INIT_CHECKPOINT=mini/upcycled                        # [MARCO_INIT_CHECKPOINT] stage 1 starts here
INIT_WEIGHTS_ONLY=0                                  # (relative: under MARCO_CKPT_ROOT); iteration 0,
                                                     # weights only: tools/upcycle_hf_to_mcore.py
#
# Parallel layout, for 8 x H100 80 GB per node; the default 8 nodes make 64 GPUs
# (`sbatch --nodes N` scales data parallelism; the global batch must stay divisible):
#   TP 1  hidden 1024 and 16 heads: tensor-parallel GEMMs would be tiny and all-reduce bound,
#         and MoE with TP > 1 also needs sequence parallelism. Nothing here needs it for memory.
#   PP 1  the model state fits on one GPU once the experts are split (below): no pipeline
#         bubble, no stage balancing around the 151,936-word embedding.
#   EP 8  256 experts / 8 = 32 per GPU; the token all-to-all stays inside a node (NVLink).
#   DP    world / (TP x PP) = 64; each expert has 64 / 8 = 8 data-parallel replicas.
#   Distributed optimizer: fp32 master weights and Adam moments sharded over the replicas.
TP=1                                                 # [MARCO_TP]
PP=1                                                 # [MARCO_PP]
EP=8                                                 # [MARCO_EP]
NODES=8                                              # dry runs only; jobs use the allocation
GPUS_PER_NODE=8                                      # [MARCO_NPROC_PER_NODE]
#
# Per-GPU memory at 64 GPUs (python slurm/memory_estimate.py --preset mini --ep 8 --dp 64
# --micro-batch-size 1 [--imbalance 2]); GiB = 2^30 bytes, H100 80 GB = 79.6 GiB:
#   parameters on one GPU: dense part (attention, norms, routers, tied embedding) 0.339B,
#     replicated, + experts 28 x 256 x 3 x 1024 x 768 / EP 8 = 2.114B  ->  2.453B
#   bf16 weights      2 B x 2.453B                                          4.6 GiB
#   fp32 gradients    4 B x 2.453B (Megatron DDP, grad_reduce_in_fp32)      9.1 GiB
#   optimizer         12 B x (0.339B / 64 + 2.114B / 8)                     3.0 GiB
#   activations       4096 tokens x 28 layers x 29,760 B (attention, norms, router)  3.2 GiB
#                     4096 tokens x 28 layers x 69,632 B (experts: 8 copies of the token in
#                     and out, 8 x (2 x 768) FC1 out, 8 x 768 SwiGLU out; bf16)      7.4 GiB
#   logits            4096 x 151,936 x (2 B bf16 + 4 B fp32 in the loss)    3.5 GiB
#   total 30.8 GiB; 38.3 GiB if the busiest GPU's experts get twice their share of tokens
#   (dropless routing, no capacity factor); + ~2 GiB CUDA context / NCCL. Micro batch 2
#   would be ~45 GiB (~60 GiB at 2x imbalance): raise it once a run's peak_memory_gib
#   (TensorBoard) confirms the headroom.
MICRO_BATCH=1                                        # [MARCO_MICRO_BATCH]
GLOBAL_BATCH=1024                                    # [MARCO_GLOBAL_BATCH] sequences: 4.19M tokens/step
SEQ_LENGTH=4096                                      # [MARCO_SEQ_LENGTH]
#
# Learning rate (not published): WSD over the whole chain, warm up 2000 steps, hold through
# stages 1-3, anneal linearly to MIN_LR during stage 4 (slurm/pretrain_stage.py derives the
# iteration counts from the curriculum: stage 4 is steps 1,096,726 - 1,215,935 here).
LR=3e-4                                              # [MARCO_LR]
MIN_LR=3e-5                                          # [MARCO_MIN_LR]
LR_DECAY_STYLE=WSD                                   # [MARCO_LR_DECAY_STYLE]
WARMUP_ITERS=2000                                    # [MARCO_WARMUP_ITERS]
LR_SCHEDULE=run                                      # one schedule for all stages
SAVE_INTERVAL=2000                                   # [MARCO_SAVE_INTERVAL] ~242 GB per checkpoint (17.3B x 14 B)
EVAL_INTERVAL=5000                                   # [MARCO_EVAL_INTERVAL]
LOG_INTERVAL=10                                      # [MARCO_LOG_INTERVAL]
#
# Post-training after stage 4 (slurm/mini_sft.sbatch, slurm/mini_opd.sbatch, through
# slurm/posttrain.sh; docs/posttraining.md): Marco's SFT/OPD recipe, shared by the models,
# and this model's OPD cascade (phases, teachers, steps).
# shellcheck source=slurm/posttrain_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/../posttrain_recipe.sh"
OPD_CASCADE=configs/posttrain/marco_mini_cascade.yaml  # [MARCO_OPD_CASCADE]
