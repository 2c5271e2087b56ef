#!/usr/bin/env bash
# On-policy distillation with SGLang rollout engines and SGLang-served teachers, in one Slurm
# job: the first nodes of the allocation serve, the rest train (slurm/posttrain.sh MODEL opd).
#
#   bash slurm/opd_sglang.sh MODEL        (slurm/{nano,mini}_opd_sglang.sbatch)
#
#  1. The student's weights to start from (the OPD run's own checkpoint when requeued, else the
#     SFT checkpoint) are exported to a Hugging Face directory on the shared file system
#     (tools/export_mcore_to_hf.py), the engines' initial weights.
#  2. MARCO_ENGINE_NODES nodes each run `python -m sglang.launch_server` on that directory
#     (--dp-size GPUs per node: one replica per GPU), one rollout URL per node.
#  3. Each served teacher of MARCO_SGLANG_TEACHERS ("VAR=HF_DIR:NODES ...", e.g.
#     "QWEN3_NEXT_80B_A3B=/models/Qwen3-Next-80B-A3B-Instruct:1") runs on its NODES nodes
#     (--tp-size GPUs per node x NODES, multi-node through --dist-init-addr); VAR is set to
#     sglang:http://FIRST-NODE:PORT, which the cascade file names as that phase's teacher.
#  4. Every server's /health is waited for (MARCO_ENGINE_START_TIMEOUT seconds, default 1800),
#     then the trainer runs on the remaining nodes with --rollout-engine sglang --rollout-url
#     URL... --rollout-sync-dir (a shared directory: the weights of each step) and the servers
#     are stopped when it ends.
# The servers and the trainer share MARCO_ENGINE_API_KEY when it is set (SGLang's --api-key).
# MARCO_DRY_RUN=1 prints the server commands, then the trainer's as slurm/posttrain.sh does.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(( $# == 1 )) || die "usage: opd_sglang.sh MODEL (see slurm/*_opd_sglang.sbatch)"
model=$1
python=${MARCO_PYTHON:-python3}
output=${MARCO_OUTPUT:-$repo/runs}
ckpt_root=${MARCO_CKPT_ROOT:-$output/checkpoints}
engine_nodes=${MARCO_ENGINE_NODES:-2}
gpus=${MARCO_NPROC_PER_NODE:-8}
port=${MARCO_ENGINE_PORT:-30000}
start_timeout=${MARCO_ENGINE_START_TIMEOUT:-1800}
require_positive MARCO_ENGINE_NODES "$engine_nodes"
require_positive MARCO_ENGINE_PORT "$port"
shared=${MARCO_ROLLOUT_DIR:-$output/rollout/$model}
save="$ckpt_root/$model/opd"
start_from=${MARCO_OPD_CHECKPOINT:-$ckpt_root/$model/sft}
[[ -f $save/latest_checkpointed_iteration.txt ]] && start_from=$save

# ---------------------------------------------------------------- nodes
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not set in a Slurm job}")
elif [[ -n $dry_run ]]; then
    total_nodes=${MARCO_TOTAL_NODES:-16}
    require_positive MARCO_TOTAL_NODES "$total_nodes"
    hosts=()
    for ((i = 0; i < total_nodes; i++)); do hosts+=("node$i"); done
else
    die "not inside a Slurm job (no SLURM_JOB_ID): submit with sbatch, or set MARCO_DRY_RUN=1"
fi
read -r -a teachers <<< "${MARCO_SGLANG_TEACHERS:-}"
next=0
take() {  # take N: the next N hosts of the allocation, as `taken`
    (( next + $1 <= ${#hosts[@]} )) || die "${#hosts[@]} nodes: not enough for $engine_nodes" \
        "engine node(s), the served teachers (MARCO_SGLANG_TEACHERS) and at least one training node"
    taken=("${hosts[@]:next:$1}")
    next=$((next + $1))
}

servers=()   # one line per server: a command to run on its node(s)
health=()    # the URLs to wait for
launch=("$python" -m sglang.launch_server --host 0.0.0.0 --port "$port" --trust-remote-code)
[[ -n ${MARCO_ENGINE_API_KEY:-} ]] && launch+=(--api-key "\$MARCO_ENGINE_API_KEY")

student_hf="$shared/student-initial"
take "$engine_nodes"
urls=()
for host in "${taken[@]}"; do
    servers+=("srun --nodes=1 --ntasks=1 --nodelist=$host ${launch[*]} --model-path $student_hf --dp-size $gpus --tp-size 1")
    urls+=("http://$host:$port")
done
health+=("${urls[@]}")

teacher_env=()
for spec in "${teachers[@]}"; do
    [[ $spec =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.+):([1-9][0-9]*)$ ]] ||
        die "MARCO_SGLANG_TEACHERS entry '$spec': expected VAR=HF_DIR:NODES"
    var=${BASH_REMATCH[1]} dir=${BASH_REMATCH[2]} n=${BASH_REMATCH[3]}
    take "$n"
    head_node=${taken[0]}
    nodelist=$(IFS=,; echo "${taken[*]}")
    servers+=("srun --nodes=$n --ntasks-per-node=1 --nodelist=$nodelist ${launch[*]} --model-path $dir --tp-size $((gpus * n)) --nnodes $n --node-rank \$SLURM_NODEID --dist-init-addr $head_node:$((port + 1))")
    teacher_env+=("$var=sglang:http://$head_node:$port")
    health+=("http://$head_node:$port")
done
(( next < ${#hosts[@]} )) || die "${#hosts[@]} nodes: none left to train on"
trainers=("${hosts[@]:next}")

export MARCO_NNODES=${#trainers[@]}
export MARCO_EXTRA_ARGS="${MARCO_EXTRA_ARGS:-} --rollout-engine sglang --rollout-url ${urls[*]} --rollout-sync-dir $shared/weights"
trainer_list=$(IFS=,; echo "${trainers[*]}")
export MARCO_SRUN_ARGS="${MARCO_SRUN_ARGS:-} --nodelist=$trainer_list"
export "${teacher_env[@]+"${teacher_env[@]}"}"

if [[ -n $dry_run ]]; then
    echo "# $model OPD on SGLang: ${#hosts[@]} nodes = $engine_nodes rollout engine node(s) +" \
         "$((next - engine_nodes)) teacher node(s) + ${#trainers[@]} training node(s)"
    echo "$python tools/export_mcore_to_hf.py --load $start_from --out $student_hf --overwrite --dtype bf16"
    printf '%s &\n' "${servers[@]}"
    echo "# wait for /health: ${health[*]}"
    printf 'export %q\n' "${teacher_env[@]+"${teacher_env[@]}"}"
    exec bash "$repo/slurm/posttrain.sh" "$model" opd
fi

# ---------------------------------------------------------------- start, wait, train, stop
mkdir -p "$shared"
note "exporting $start_from for the rollout engines"
"$python" "$repo/tools/export_mcore_to_hf.py" --load "$start_from" --out "$student_hf" --overwrite --dtype bf16
pids=()
for line in "${servers[@]}"; do
    bash -c "$line" &
    pids+=($!)
done
stop_servers() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop_servers EXIT
deadline=$((SECONDS + start_timeout))
for url in "${health[@]}"; do
    until curl -sf -o /dev/null "$url/health"; do
        (( SECONDS < deadline )) || die "$url: no /health after ${start_timeout} s (MARCO_ENGINE_START_TIMEOUT)"
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || die "a server exited before $url was up"; done
        sleep 10
    done
    note "$url is up"
done
export SLURM_JOB_NODELIST=$trainer_list
bash "$repo/slurm/posttrain.sh" "$model" opd
