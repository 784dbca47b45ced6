#!/usr/bin/env bash
# Benchmark: moelm-preprocess throughput in MB/s of raw text (input bytes over
# wall time of the whole run: dictionary count, binarization, writing) on 1
# and 2 threads (--workers), with and without GPT-2 BPE.
#
# The corpus (>= 100 MB, or $MB) repeats the license texts of
# /usr/share/common-licenses, so word and pre-token caches see the same words
# over and over: real corpora have longer tails and will be slower with BPE.
# The BPE vocabulary is GPT-2's format (encoder.json with the 256 byte chars,
# vocab.bpe with merges) built here with awk, not trained: for each of the
# $WORDS most frequent words (with and without their leading space) the chain
# of merges that builds it left to right. Every merge's operands exist before
# it, so encoding is well defined and exercises the merge loop as a trained
# file does; the ids are meaningless.
#
# Prints one line per configuration. Needs no Python.
# Usage: bench/preprocess.sh            (BUILD_DIR=build, MB=100, WORDS=3000)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
mb=${MB:-100}
words=${WORDS:-3000}
if [ ! -x "$build/bin/moelm-preprocess" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)" --target moelm-preprocess
fi
prep="$(cd "$build/bin" && pwd)/moelm-preprocess"
work=$(mktemp -d /tmp/moelm-bench-preprocess-XXXXXX)
trap 'rm -rf "$work"' EXIT
export LC_ALL=C

# ---- corpus: the license texts that are UTF-8, repeated
for f in $(find /usr/share/common-licenses -maxdepth 1 -type f | sort); do
  if iconv -f utf-8 -t utf-8 "$f" >/dev/null 2>&1; then cat "$f"; fi
done >"$work/base.txt"
if [ ! -s "$work/base.txt" ]; then
  echo "bench/preprocess.sh: no text found in /usr/share/common-licenses" >&2
  exit 1
fi
: >"$work/corpus.txt"
while [ "$(stat -c %s "$work/corpus.txt")" -lt $((mb * 1000000)) ]; do
  cat "$work/base.txt" >>"$work/corpus.txt"
done
bytes=$(stat -c %s "$work/corpus.txt")

# ---- a GPT-2-format vocabulary: byte chars, then merge chains of frequent words
awk '{
  line = $0
  while (match(line, / ?[A-Za-z]+/)) {
    n[substr(line, RSTART, RLENGTH)]++
    line = substr(line, RSTART + RLENGTH)
  }
} END { for (w in n) print n[w], w }' "$work/base.txt" | sort -k1,1nr -k2 | head -n "$words" | cut -d' ' -f2- |
  awk -v enc="$work/encoder.json" -v voc="$work/vocab.bpe" '
function utf8(cp) {
  if (cp < 128) return sprintf("%c", cp)
  return sprintf("%c%c", 192 + int(cp / 64), 128 + cp % 64)
}
function key(s) { return s == "\"" ? "\\\"" : s == "\\" ? "\\\\" : s } # JSON: only two byte chars need it
BEGIN {
  extra = 0
  for (b = 0; b < 256; b++) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) cp = b
    else cp = 256 + extra++
    ch[sprintf("%c", b)] = utf8(cp)
    if (b == 32) space = utf8(cp)
    printf "%s\"%s\": %d", (b ? ", " : "{"), key(utf8(cp)), b > enc
  }
  id = 256
  print "#version: 0.2" > voc
}
{
  word = $0
  cur = ""
  for (i = 1; i <= length(word); i++) {
    c = substr(word, i, 1)
    c = (c == " ") ? space : ch[c]
    if (i > 1 && !((cur SUBSEP c) in seen)) {
      seen[cur SUBSEP c] = 1
      print cur " " c > voc
      if (!((cur c) in tok)) {
        tok[cur c] = id
        printf ", \"%s\": %d", key(cur c), id++ > enc
      }
    }
    cur = cur c
  }
}
END { print "}" > enc }'

merges=$(($(wc -l <"$work/vocab.bpe") - 1))
printf 'corpus %.1f MB (license texts repeated), BPE vocabulary %d merges over %d words\n' \
  "$(awk -v b="$bytes" 'BEGIN { print b / 1e6 }')" "$merges" "$words"

run() {
  local threads=$1 name=$2
  shift 2
  rm -rf "$work/out"
  local t0 t1
  t0=$(date +%s.%N)
  "$prep" --trainpref "$work/corpus.txt" --destdir "$work/out" --workers "$threads" "$@" >"$work/log.txt"
  t1=$(date +%s.%N)
  awk -v b="$bytes" -v t0="$t0" -v t1="$t1" -v th="$threads" -v name="$name" -v logfile="$work/log.txt" 'BEGIN {
    s = t1 - t0
    while ((getline line < logfile) > 0) if (line ~ /sents/) { sub(/.*\| \[None\] [^:]*: /, "", line); summary = line }
    printf "RESULT preprocess %-7s threads=%d: %7.1f MB/s (%.2f s; %s)\n", name, th, b / 1e6 / s, s, summary
  }'
}

for threads in 1 2; do
  run "$threads" words
done
for threads in 1 2; do
  run "$threads" gpt2bpe --bpe gpt2 --gpt2-encoder-json "$work/encoder.json" --gpt2-vocab-bpe "$work/vocab.bpe"
done
