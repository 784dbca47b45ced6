#!/usr/bin/env bash
# Prepares the small real corpus the examples and routing benchmarks train on:
# the UTF-8 license texts every Debian or Ubuntu system ships
# (/usr/share/common-licenses), every 20th line to valid and the next to test,
# binarized by moelm-preprocess into WORK/data-bin (fairseq's dictionary and
# mmap datasets, words occurring at least twice).
# Usage: scripts/small-corpus.sh WORK BIN   (BIN: the folder holding moelm-preprocess)
set -euo pipefail
work=$1
bin=$2
mkdir -p "$work"
corpus=()
for f in /usr/share/common-licenses/*; do
  [ -f "$f" ] && iconv -f utf-8 -t utf-8 "$f" >/dev/null 2>&1 && corpus+=("$f")
done
if [ ${#corpus[@]} -eq 0 ]; then
  echo "small-corpus.sh: no license texts in /usr/share/common-licenses" >&2
  exit 1
fi
cat "${corpus[@]}" | awk -v dir="$work" '{
  f = NR % 20 == 0 ? "valid" : NR % 20 == 1 ? "test" : "train"
  print > (dir "/" f ".txt")
}'
rm -rf "$work/data-bin"
"$bin/moelm-preprocess" --only-source --trainpref "$work/train.txt" --validpref "$work/valid.txt" \
  --testpref "$work/test.txt" --destdir "$work/data-bin" --thresholdsrc 2 --workers "$(nproc)"
