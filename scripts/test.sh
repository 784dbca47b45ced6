#!/usr/bin/env bash
# Builds moelm with warnings as errors and runs the whole test suite (CTest).
# Tests that need a GPU skip themselves, saying so, when none is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build-test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WERROR=ON >/dev/null
cmake --build build-test -j"$(nproc)"
cd build-test
ctest --output-on-failure -j"$(nproc)" "$@"
