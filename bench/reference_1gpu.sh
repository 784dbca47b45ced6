#!/usr/bin/env bash
# Benchmark: the reference single-node model (24 layers, d 2048, ffn 8192, 32 heads,
# 8 experts every 2nd layer, top-2 'all', 2048 tokens per sample, batch 4) on one GPU,
# all 8 experts local. Modes:
#   reference  --memory-efficient-fp16 --checkpoint-activations --fp16-adam-stats --update-freq 8
#   bf16       --bf16, no activation checkpointing
#   dropless   bf16 with --moe-dropless (no capacity drops; bound --moe-dropless-capacity-factor 4)
#   overlap    bf16 with --optimizer-overlap (units stepped beside the backward)
#   profile    bf16, 6 updates, updates 4-5 recorded with --profile (device-timed spans) and
#              summarised by bench/profile_summary.py: where an update's time goes, per op
#   profile-reference  the same for the reference flags (3 updates of 8 micro-batches,
#              update 2 recorded)
# Prints words per second, model TFLOP/s (FLOPs per token from --dry-run) and peak memory.
# Usage: bench/reference_1gpu.sh [reference|bf16|dropless|overlap|profile|profile-reference|both]
#        [updates]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-both}
updates=${2:-30}
build=${BUILD_DIR:-build}
if [ ! -x "$build/bin/moelm-train" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)"
fi
train="$build/bin/moelm-train"
. bench/reference_model.sh
model=("${reference_model[@]}")

flops=$("$train" "${model[@]}" --max-update 1 --dry-run | sed -n 's/.*model FLOPs per token (forward + backward): //p')

run() {
  local name=$1; shift
  local log="bench/last_${name}.log"
  "$train" "${model[@]}" --max-update "$updates" "$@" 2>&1 | tee "$log"
  # wps of the last train_inner line (steady state), peak memory from cuda_gb_allocated
  local wps mem
  wps=$(grep '| train_inner |' "$log" | tail -1 | sed -n 's/.*"wps": "\([0-9.e+]*\)".*/\1/p')
  mem=$(grep '| train_inner |' "$log" | sed -n 's/.*"cuda_gb_allocated": "\([0-9.]*\)".*/\1/p' | sort -n | tail -1)
  python3 - "$name" "$wps" "$flops" "$mem" <<'PY'
import sys
name, wps, flops, mem = sys.argv[1], float(sys.argv[2] or 0), float(sys.argv[3] or 0), sys.argv[4]
print(f"RESULT {name}: {wps:.1f} words/s, {wps*flops/1e12:.1f} model TFLOP/s, peak allocated {mem} GiB")
PY
}

reference_flags=(--memory-efficient-fp16 --checkpoint-activations --fp16-adam-stats --ddp-backend fully_sharded
  --update-freq 8)
case "$mode" in
  reference|both) run reference "${reference_flags[@]}" ;;
esac
case "$mode" in
  bf16|both) run bf16 --bf16 --update-freq 1 ;;
esac
case "$mode" in
  dropless) run dropless --bf16 --update-freq 1 --moe-dropless ;;
esac
case "$mode" in
  overlap) run overlap --bf16 --update-freq 1 --optimizer-overlap ;;
esac
profile() {
  "$train" "${model[@]}" "$@" --profile bench/last_profile.json >bench/last_profile.log 2>&1 ||
    { tail -20 bench/last_profile.log; exit 1; }
  python3 bench/profile_summary.py bench/last_profile.json --top 30
}
case "$mode" in
  profile) profile --max-update 6 --bf16 --update-freq 1 --profile-updates 4-5 ;;
  profile-reference) profile --max-update 3 "${reference_flags[@]}" --profile-updates 2-2 ;;
esac
