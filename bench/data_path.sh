#!/usr/bin/env bash
# Benchmark: what reading real data costs a training step. The reference
# single-node model (bench/reference_model.sh) in --bf16 on one GPU, trained
# alternately on dummy_lm and on --task language_modeling over a corpus of the
# same vocabulary (50,000 types: 49,996 words, each present, Zipf-like
# frequencies), made here with awk and binarized by moelm-preprocess. Both read
# 4 x 2048 tokens per step; the difference in words/s is the data path (host
# batch assembly from the memory-mapped files, id checks, the host-to-device
# copy), which should be under 1%.
# Usage: bench/data_path.sh [updates] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
updates=${1:-40}
rounds=${2:-2}
build=${BUILD_DIR:-build}
if [ ! -x "$build/bin/moelm-train" ] || [ ! -x "$build/bin/moelm-preprocess" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)"
fi
work=$(mktemp -d /tmp/moelm-bench-data-XXXXXX)
trap 'rm -rf "$work"' EXIT
awk 'BEGIN {
  srand(1)
  for (i = 0; i < 49996; i++) print "w" i
  for (l = 0; l < 60000; l++) {
    n = 1 + int(rand() * 40); line = ""
    for (j = 0; j < n; j++) line = line (j ? " " : "") "w" int(49996 * rand() ^ 3)
    print line
  }
}' >"$work/train.txt"
head -n 5000 "$work/train.txt" | tail -n 3000 >"$work/valid.txt"
"$build/bin/moelm-preprocess" --only-source --trainpref "$work/train.txt" --validpref "$work/valid.txt" \
  --destdir "$work/data-bin" --workers 4 | grep -v Namespace
. bench/reference_model.sh
model=("${reference_model[@]}")
wps() { grep '| train_inner |' "$1" | tail -1 | sed -n 's/.*"wps": "\([0-9.e+]*\)".*/\1/p'; }
for r in $(seq "$rounds"); do
  for task in dummy_lm language_modeling; do
    extra=()
    [ "$task" = language_modeling ] && extra=(--task language_modeling "$work/data-bin")
    log="$work/$task.$r.log"
    "$build/bin/moelm-train" "${model[@]}" --bf16 --max-update "$updates" "${extra[@]}" >"$log" 2>&1 ||
      { cat "$log"; exit 1; }
    echo "RESULT round $r $task: $(wps "$log") words/s (last train_inner line, updates $((updates - 9))-$updates)"
  done
done
