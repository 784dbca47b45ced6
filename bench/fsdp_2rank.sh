#!/usr/bin/env bash
# Benchmark: per-rank memory and speed of --ddp-backend fully_sharded against
# pytorch_ddp, two NCCL ranks launched torchrun-style. A 12-layer cut of the
# reference model (d 2048, ffn 8192, 32 heads, 2 experts every 2nd layer, one
# per rank, 1024 tokens per sample, batch 2, --memory-efficient-fp16
# --checkpoint-activations). With one GPU both ranks share it (each its own
# NCCL_HOSTID, so NCCL talks over sockets): memory per rank is what the ranks
# would hold on their own GPUs; speed is then not a scaling figure.
# Prints loss, cuda_gb_allocated (peak of the last update) and wps of rank 0.
# Usage: bench/fsdp_2rank.sh [updates]
set -euo pipefail
cd "$(dirname "$0")/.."
updates=${1:-6}
build=${BUILD_DIR:-build}
train="$build/bin/moelm-train"
ngpu=$(nvidia-smi -L | grep -c GPU)
model=(--task dummy_lm --tokens-per-sample 1024 --arch transformer_lm_gpt --share-decoder-input-output-embed
  --decoder-layers 12 --decoder-embed-dim 2048 --decoder-ffn-embed-dim 8192 --decoder-attention-heads 32
  --moe-expert-count 2 --moe-freq 2 --moe-second-expert-policy all --criterion moe_cross_entropy
  --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum --optimizer adam --fp16-adam-stats
  --lr 0.0005 --warmup-updates 750 --memory-efficient-fp16 --checkpoint-activations --batch-size 2
  --disable-validation --no-save --log-format json --log-interval 1 --max-update "$updates")
for ddp in pytorch_ddp fully_sharded; do
  port=$((20000 + RANDOM % 20000))
  out=$(mktemp)
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$((r % ngpu)) MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NCCL_HOSTID=bench-$r \
      "$train" "${model[@]}" --ddp-backend $ddp >"$out.$r" 2>&1 &
  done
  wait
  last=$(grep '| train_inner |' "$out.0" | tail -1)
  echo "$ddp: $(echo "$last" | grep -o '"\(loss\|wps\|cuda_gb_allocated\)": "[0-9.]*"' | tr '\n' ' ')"
  "$train" "${model[@]}" --ddp-backend $ddp --distributed-world-size 2 --dry-run | grep 'per-GPU bytes' || true
  rm -f "$out" "$out.0" "$out.1"
done
