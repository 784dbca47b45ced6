#!/usr/bin/env bash
# Benchmark: the routing choices on the same real text. Trains the same small
# MoE model on the license-text corpus (scripts/small-corpus.sh) for a fixed
# number of updates with each gate setting and prints the validation loss
# (base 2) at the end, and the seconds each run took. CPU by default (2
# layers, d 128, 8 experts); DEVICE=gpu trains the larger model on the GPU.
# Usage: bench/routing_compare.sh [updates] [name...]   (BUILD_DIR: default build)
set -euo pipefail
cd "$(dirname "$0")/.."
updates=${1:-300}
shift || true
build=${BUILD_DIR:-build}
if [ ! -x "$build/bin/moelm-train" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)"
fi
work=$(mktemp -d /tmp/moelm-bench-routing-XXXXXX)
trap 'rm -rf "$work"' EXIT
scripts/small-corpus.sh "$work" "$build/bin" >/dev/null
if [ "${DEVICE:-cpu}" = gpu ]; then
  model=(--decoder-layers 6 --decoder-embed-dim 512 --decoder-ffn-embed-dim 2048 --decoder-attention-heads 8
         --tokens-per-sample 128 --batch-size 32 --warmup-updates 100 --lr 0.001 --bf16)
else
  model=(--decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4
         --tokens-per-sample 64 --batch-size 16 --warmup-updates 40 --lr 0.003 --cpu)
fi
# name | gate flags (8 experts unless the flags say otherwise)
configs=(
  "top2|--moe-expert-count 8 --moe-second-expert-policy all"
  "top2_dropless|--moe-expert-count 8 --moe-second-expert-policy all --moe-dropless"
  "topk_k2_zloss|--moe-expert-count 8 --moe-gate topk --moe-router-topk 2 --moe-z-loss-coeff 0.001"
  "topk_k4_sigmoid_seq|--moe-expert-count 8 --moe-gate topk --moe-router-topk 4 --moe-router-score-function sigmoid --moe-aux-loss-type seq"
  "aux_free|--moe-expert-count 8 --moe-gate topk --moe-router-topk 2 --moe-router-enable-expert-bias --moe-aux-loss-type none"
  "expert_choice|--moe-expert-count 8 --moe-gate expert_choice"
  "shared_fine_grained|--moe-expert-count 32 --moe-expert-ffn-dim 64 --moe-gate topk --moe-router-topk 4 --moe-shared-expert-ffn-dim 256"
)
for c in "${configs[@]}"; do
  name=${c%%|*}
  flags=${c#*|}
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
  log="$work/$name.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  if ! "$build/bin/moelm-train" --task language_modeling "$work/data-bin" \
      --arch transformer_lm_gpt --share-decoder-input-output-embed --moe-freq 2 \
      --moe-gating-use-fp32 --moe-normalize-expert-grad sqrt_world_size \
      --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum \
      --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr-scheduler inverse_sqrt \
      --dropout 0.1 --attention-dropout 0.1 --max-update "$updates" --seed 1 --no-save \
      --validate-interval-updates "$updates" --log-format simple --log-interval 100 \
      "${model[@]}" $flags >"$log" 2>&1; then
    echo "RESULT $name: failed: $(grep -v '^\s*$' "$log" | tail -1)"
    continue
  fi
  loss=$(grep "valid on 'valid' subset" "$log" | tail -1 | sed -n 's/.*| loss \([0-9.]*\) .*/\1/p')
  ppl=$(grep "valid on 'valid' subset" "$log" | tail -1 | sed -n 's/.*| ppl \([0-9.]*\) .*/\1/p')
  echo "RESULT $name: valid loss $loss bits (ppl $ppl) after $updates updates, $(($(date +%s) - start)) s"
done
