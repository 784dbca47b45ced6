#!/usr/bin/env bash
# Benchmark: moelm-generate's decoding speed on the reference 4.1B model
# (bench/reference_model.sh: 24 layers, d 2048, ffn 8192, 32 heads, 8 experts
# every 2nd layer, top-2 'all', vocabulary 50,000) in bf16 on one GPU, its
# parameters randomly initialised (no --path). One prompt of 8 words, 256 new
# tokens greedy (--min-len keeps </s> out until --max-len-b forces it), then
# the same with the step's kernels launched one by one (--no-cuda-graph), and
# a batch of 8 prompts. Prints the tool's own speed line: tokens decoded over
# the seconds of the decoding loop (prefill reported apart).
# Usage: bench/generate.sh [new_tokens]     (BUILD_DIR: the build directory, default build)
set -euo pipefail
cd "$(dirname "$0")/.."
new=${1:-256}
build=${BUILD_DIR:-build}
if [ ! -x "$build/bin/moelm-generate" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)"
fi
work=$(mktemp -d /tmp/moelm-bench-generate-XXXXXX)
trap 'rm -rf "$work"' EXIT
# DATA: a dict.txt of the reference's 50,000 types (49,996 words and fairseq's 4 specials), as dummy_lm's
mkdir -p "$work/data"
awk 'BEGIN { for (i = 0; i < 49996; i++) print "w" i, 49996 - i }' >"$work/data/dict.txt"
. bench/reference_model.sh
model=("${reference_model[@]}")
prompt="w11 w12 w13 w14 w15 w16 w17 w18"
len=$((8 + new)) # the prompt counts towards --max-len-b (fairseq's max_len), the final </s> does not
# the reference's training batch and evaluation capacity are not generation's: one prompt a batch, no drops
gen=("$build/bin/moelm-generate" "$work/data" "${model[@]}" --bf16 --max-len-b "$len" --min-len "$len"
  --batch-size 1 --moe-eval-capacity-token-fraction 1.0 --report-speed)
run() {
  local name=$1; shift
  local log="$work/$name.log"
  "${gen[@]}" "$@" >"$log.out" 2>"$log" || { cat "$log.out" "$log"; exit 1; }
  grep -h '^H-' "$log.out" | head -2 | cut -c1-160
  echo "RESULT $name: $(grep 'tokens/s' "$log" | sed 's/^moelm-generate: //')"
}
run "batch 1, graphs" --prompt "$prompt"
run "batch 1, no graphs" --prompt "$prompt" --no-cuda-graph
for i in 1 2 3 4 5 6 7 8; do echo "w$i ${prompt#w11 }"; done >"$work/prompts.txt" # 8 words each
run "batch 8, graphs" --input "$work/prompts.txt" --buffer-size 8 --batch-size 8
