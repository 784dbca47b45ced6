#!/usr/bin/env bash
# Installs what moelm needs to build and test on Debian or Ubuntu, when it is
# missing: a C compiler, CMake, pkg-config, jansson, cmocka, PCRE2 and OpenMPI.
# CUDA is optional: with nvcc on PATH the CUDA backend builds too.
# --fuzz: also clang 14 with libFuzzer (scripts/fuzz.sh).
set -euo pipefail
need=()
if [ "${1:-}" = "--fuzz" ]; then
  command -v clang-14 >/dev/null 2>&1 || need+=(clang-14)
  ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1 || need+=(libclang-rt-14-dev)
fi
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists jansson 2>/dev/null || need+=(libjansson-dev)
pkg-config --exists cmocka 2>/dev/null || need+=(libcmocka-dev)
pkg-config --exists libpcre2-8 2>/dev/null || need+=(libpcre2-dev)
command -v mpicc >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
