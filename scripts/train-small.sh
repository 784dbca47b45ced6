#!/usr/bin/env bash
# Builds moelm and trains a small MoE language model on dummy_lm with the
# reference command's flags (GPU when one is visible, otherwise CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
precision=()
if build/bin/moelm-train --list-plugins 2>/dev/null | grep -q "cuda" && command -v nvidia-smi >/dev/null 2>&1 \
   && nvidia-smi -L >/dev/null 2>&1; then
  precision=(--memory-efficient-fp16 --fp16-adam-stats)
fi
exec build/bin/moelm-train \
  --task dummy_lm --tokens-per-sample 64 --dict-size 996 \
  --arch transformer_lm_gpt --share-decoder-input-output-embed \
  --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4 \
  --moe-expert-count 4 --moe-freq 2 \
  --moe-gating-use-fp32 --moe-second-expert-policy all \
  --moe-normalize-expert-grad sqrt_world_size \
  --moe-eval-capacity-token-fraction -1.0 \
  --max-sentences-valid 1 --num-workers-valid 0 \
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum \
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0 \
  --lr 0.003 --warmup-updates 20 \
  --dropout 0.1 --attention-dropout 0.1 \
  --batch-size 4 --update-freq 1 \
  --max-update 200 --disable-validation --no-save \
  --log-format json --log-interval 10 "${precision[@]}" "$@"
