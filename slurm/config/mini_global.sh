# shellcheck shell=bash disable=SC2034  # variables read by slurm/launch.sh, which sources this
# Marco-Mini-Global: Mini's architecture (preset mini-global) continued for 1.4T more tokens
# over 64 languages, starting from Mini's final checkpoint (end of stage 4). Sourced by
# slurm/launch.sh for slurm/mini_global.sbatch; MARCO_* variables override (docs/cluster.md).
#
# The trainer addresses data by global step, so the continuation is stage 5 of a curriculum
# whose stages 1-4 are the paper's (configs/curriculum/marco_global_6.5T.yaml): it starts at
# Mini's last iteration (5.1T tokens), which the trainer keeps when loading weights only.
# Weights only: Mini's schedule has annealed to its minimum, so Global gets a fresh optimizer
# and its own warmup + decay over its 1.4T tokens (LR_SCHEDULE=stage). Its data blend is not
# published: the curriculum file's stage 5 is a documented placeholder.
RUN=mini_global
PRESET=mini-global
CURRICULUM=configs/curriculum/marco_global_6.5T.yaml
STAGES=(5)
INIT_CHECKPOINT=mini/stage4                          # [MARCO_INIT_CHECKPOINT] Mini's final stage
INIT_WEIGHTS_ONLY=1
#
# Layout and memory: as slurm/config/mini.sh (same model): TP 1, PP 1, EP 8, DP 64 on
# 8 nodes; 30.8 GiB per GPU at micro batch 1 (38.3 GiB at 2x expert-token imbalance).
TP=1
PP=1
EP=8
NODES=8
GPUS_PER_NODE=8
MICRO_BATCH=1
GLOBAL_BATCH=1024
SEQ_LENGTH=4096
#
# Learning rate (not published): a lower peak than Mini's for continued pre-training,
# warmup 1000 steps, cosine to MIN_LR over the 1.4T tokens (333,786 steps at 4.19M tokens).
LR=1.5e-4
MIN_LR=1.5e-5
LR_DECAY_STYLE=cosine
WARMUP_ITERS=1000
LR_SCHEDULE=stage
SAVE_INTERVAL=2000
EVAL_INTERVAL=5000
LOG_INTERVAL=10
