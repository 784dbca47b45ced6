#!/usr/bin/env bash
# Benchmark: the weight-streaming ceiling of batch-1 decoding (bench/gemv_chain.cu):
# the reference model's 96 dense products in one CUDA graph, two kernel designs.
# Usage: bench/gemv_chain.sh   (needs nvcc and a GPU of compute capability 9.0)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d /tmp/moelm-bench-gemv-XXXXXX)
trap 'rm -rf "$out"' EXIT
nvcc -O3 -std=c++17 -arch=sm_90 -o "$out/gemv_chain" bench/gemv_chain.cu
"$out/gemv_chain"
