#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/: checkpoint reader, option parser,
# .idx/.bin, dict.txt and BPE files, plugin descriptors) with clang,
# AddressSanitizer and UndefinedBehaviorSanitizer into build-fuzz/ (warnings are
# the gcc build's business: clang's differ), and runs
# each from its committed seed corpus (fuzz/corpus/<name>):
#
#   scripts/fuzz.sh              each harness for a fixed number of runs (CI)
#   scripts/fuzz.sh RUNS         each for RUNS runs
#   scripts/fuzz.sh --time S [NAME...]   each (or the named ones) for S seconds, by hand
#
# New inputs go to build-fuzz/corpus/<name>, never into the committed corpus;
# a crash leaves its input in build-fuzz/artifacts/ and fails the script. A
# crash worth keeping becomes a regression test by adding its input to
# fuzz/corpus/<name> (tests/cmake/fuzz.cmake replays every file there).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=10000
seconds=0
if [ "${1:-}" = "--time" ]; then
  seconds="$2"
  shift 2
elif [ -n "${1:-}" ]; then
  runs="$1"
  shift
fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(options checkpoint indexed dictionary bpe descriptor)
scripts/deps.sh --fuzz
cc=clang-14
command -v "$cc" >/dev/null 2>&1 || cc=clang
CC="$cc" cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_FUZZ=ON -DMOE_BUILD_TESTS=OFF \
  -DMOE_WERROR=OFF >/dev/null
targets=()
for n in "${names[@]}"; do targets+=(--target "fuzz_$n"); done
cmake --build build-fuzz -j"$(nproc)" "${targets[@]}"
mkdir -p build-fuzz/artifacts
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
for n in "${names[@]}"; do
  mkdir -p "build-fuzz/corpus/$n"
  if [ "$seconds" -gt 0 ]; then limit=(-max_total_time="$seconds"); else limit=(-runs="$runs"); fi
  echo "fuzz_$n: ${limit[*]}"
  # the first directory collects new inputs; the committed corpus is read only
  "build-fuzz/bin/fuzz_$n" "${limit[@]}" -max_len=65536 -timeout=20 -rss_limit_mb=2048 \
    -artifact_prefix="build-fuzz/artifacts/$n-" -print_final_stats=0 \
    "build-fuzz/corpus/$n" "fuzz/corpus/$n" 2>&1 | tail -n 3
done
echo "fuzz: ${#names[@]} harnesses ran without a crash"
