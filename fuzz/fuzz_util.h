/* fuzz_util.h: what the harnesses share: a scratch directory of their own
 * and writing the input (or part of it) to a file there, since the readers
 * under test take paths. Declarations only; fuzz_util.c defines them.
 *
 * Each harness defines LLVMFuzzerTestOneInput. Built with clang's
 * -fsanitize=fuzzer it is a libFuzzer program (scripts/fuzz.sh); built with
 * replay.c as its main it runs the inputs it is given once each, which is
 * how the committed corpora (crash reproducers included) are regression
 * tests in the ordinary test suite (tests/cmake/fuzz.cmake).
 */
#ifndef MOE_FUZZ_UTIL_H
#define MOE_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The process's scratch directory (created at first use, removed at exit). */
const char *fuzz_dir(void);
/* Writes bytes to <fuzz_dir>/<name> and returns that path (static storage,
 * valid until the next call with the same slot 0..3). */
const char *fuzz_write(int slot, const char *name, const void *data, size_t n);

#endif
