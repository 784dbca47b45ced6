# The fuzz harnesses' committed corpora replayed once each (fuzz/replay.c as
# the main, any compiler): seeds and the reproducers of defects the fuzzers
# found, so each of those stays a regression test here and under
# scripts/test.sh --sanitize. Label unit.
foreach(h options checkpoint indexed dictionary bpe descriptor)
  moe_add_test(test_fuzz_${h} LABELS unit
    SOURCES ${PROJECT_SOURCE_DIR}/fuzz/${h}.c ${PROJECT_SOURCE_DIR}/fuzz/fuzz_util.c ${PROJECT_SOURCE_DIR}/fuzz/replay.c
    LIBS moedata ARGS ${PROJECT_SOURCE_DIR}/fuzz/corpus/${h} TIMEOUT 120)
  target_include_directories(test_fuzz_${h} PRIVATE ${PROJECT_SOURCE_DIR}/fuzz)
  target_compile_definitions(test_fuzz_${h} PRIVATE _DEFAULT_SOURCE)
endforeach()
