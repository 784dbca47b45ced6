#!/usr/bin/env bash
# Benchmark: fairseq's single-node reference command (8 ranks, one expert per rank,
# --ddp-backend fully_sharded --memory-efficient-fp16 --checkpoint-activations
# --fp16-adam-stats, update-freq 1) launched torchrun-style as N ranks over the
# visible GPUs. With fewer GPUs than ranks, ranks share a GPU, each with its own
# NCCL_HOSTID (NCCL then connects them over sockets): the numbers of the run are
# those of the N-rank job, the speed is not.
# Prints rank 0's train_inner lines (loss, gnorm, loss_scale, wps, memory) and the
# overflow NOTEs. Usage: bench/reference_ranks.sh [ranks] [updates]
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-8}
updates=${2:-30}
build=${BUILD_DIR:-build}
train="$build/bin/moelm-train"
ngpu=$(nvidia-smi -L | grep -c GPU)
. bench/reference_model.sh
model=("${reference_model[@]}" --fp16-adam-stats
  --ddp-backend fully_sharded --memory-efficient-fp16 --checkpoint-activations
  --update-freq $((8 / ranks)) --max-update "$updates" --distributed-timeout 600)
port=$((20000 + RANDOM % 20000))
log=${LOG_DIR:-$(mktemp -d)}
for ((r = 0; r < ranks; r++)); do
  RANK=$r WORLD_SIZE=$ranks LOCAL_RANK=$((r % ngpu)) MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    NCCL_HOSTID=reference-$r "$train" "${model[@]}" >"$log/rank$r.log" 2>&1 &
done
wait
grep -E 'train_inner|NOTE|error' "$log/rank0.log" | sed 's/"moe_gate_loss".*"inner_loss"/... "inner_loss"/'
echo "logs: $log"
