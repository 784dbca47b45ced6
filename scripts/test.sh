#!/usr/bin/env bash
# Builds moelm with warnings as errors and runs the test suite (CTest).
# Tests that need a GPU skip themselves, saying so, when none is visible.
#
#   scripts/test.sh [ctest args]       the whole suite, in build-test/; TensorBoard's
#                                      Python reader goes into build-test/tb-venv
#                                      (pip) for test_observe, which skips that
#                                      part, saying so, when it cannot be installed
#   scripts/test.sh --sanitize [args]  core, data library, cpu backend, plugins and
#                                      tests built with AddressSanitizer and
#                                      UndefinedBehaviorSanitizer (build-sanitize/),
#                                      then the unit, plugin and e2e tests that
#                                      exercise code (the slowest left out)
#   scripts/test.sh --fuzz [runs]      the libFuzzer harnesses (fuzz/), each for a
#                                      fixed number of runs from its seed corpus
#                                      (scripts/fuzz.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=plain
case "${1:-}" in
  --sanitize) mode=sanitize; shift ;;
  --fuzz) shift; exec scripts/fuzz.sh "$@" ;;
esac
scripts/deps.sh
jobs="$(nproc)"

if [ "$mode" = sanitize ]; then
  cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WERROR=ON -DMOE_SANITIZE=ON >/dev/null
  cmake --build build-sanitize -j"$jobs"
  # third-party leaks only (Open MPI) are suppressed; any UB report fails the
  # test; stacks are unwound exactly (Open MPI has no frame pointers)
  export ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:strict_string_checks=1:detect_stack_use_after_return=0"
  export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp:print_suppressions=0:fast_unwind_on_malloc=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  cd build-sanitize
  # Left out: test_train and test_real_text (minutes of training that the
  # faster e2e tests cover under the sanitizers too), the GPU tests, the
  # multi-rank stress tests (dist: mpirun and watchdog timing), the example
  # build (an out-of-tree compile), and test_checkpoint, test_checkpoint_tool,
  # test_eval_lm and test_generate, whose drivers do not free their captured
  # output yet (the leak checker would report the test programs, not moelm).
  exec ctest --output-on-failure -j"$jobs" -L 'unit|plugin|e2e' \
    -E '^(test_train|test_real_text|test_checkpoint|test_checkpoint_tool|test_eval_lm|test_generate|test_example_build|test_example_load|test_parity|test_dist_gpu|test_dropless_gpu)$' "$@"
fi

cmake -S . -B build-test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WERROR=ON >/dev/null
cmake --build build-test -j"$jobs"
# TensorBoard's own reader for test_observe (optional: the test says when it skips it)
if [ ! -x build-test/tb-venv/bin/python ] || ! build-test/tb-venv/bin/python -c 'import tensorboard' 2>/dev/null; then
  { python3 -m venv build-test/tb-venv && build-test/tb-venv/bin/pip install -q tensorboard; } >/dev/null 2>&1 ||
    echo "note: could not install the tensorboard Python package; test_observe will skip TensorBoard's reader"
fi
cd build-test
ctest --output-on-failure -j"$jobs" "$@"
