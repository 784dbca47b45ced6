/* lmcorpus.h: the small language-modeling corpus the tool tests train on
 * (header-only, static inline as tmpdir.h): lines of words w0..w39 where a
 * word is followed by its successor half the time (a little structure to
 * learn), binarized by moelm-preprocess into <dir>/data-bin. Needs runcmd.h
 * and MOE_TEST_BIN_DIR. */
#ifndef MOE_TESTS_LMCORPUS_H
#define MOE_TESTS_LMCORPUS_H

#include <stdint.h>
#include <stdio.h>

#include "runcmd.h"
#include "tmpdir.h"

/* dir (>= 64 bytes) becomes a fresh /tmp/moelm-<tag>-XXXXXX holding
 * corpus.txt (`lines` lines of 1..max_words words from `seed`) and data-bin
 * (train and valid from it, test too with `with_test`); 0 on success */
static inline int moe_test_lm_corpus(char *dir, size_t size, const char *tag, uint32_t seed, int lines, int max_words,
                                     int with_test)
{
    if (moe_test_mkdtemp(dir, size, tag) != 0)
        return -1;
    char path[128];
    snprintf(path, sizeof path, "%s/corpus.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    uint32_t x = seed;
    for (int line = 0; line < lines; line++) {
        x = x * 1103515245u + 12345u;
        int words = 1 + (int)((x >> 16) % (uint32_t)max_words);
        for (int w = 0; w < words; w++) {
            x = x * 1103515245u + 12345u;
            fprintf(f, "%sw%u", w ? " " : "", (x >> 16) % 2 ? (unsigned)(line + w) % 40u : (x >> 17) % 40u);
        }
        fputc('\n', f);
    }
    fclose(f);
    char test[160] = "";
    if (with_test)
        snprintf(test, sizeof test, " --testpref %s", path);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/moelm-preprocess --only-source --trainpref %s --validpref %s%s --destdir %s/data-bin",
             MOE_TEST_BIN_DIR, path, path, test, dir);
    moe_cmd_result r;
    if (moe_run_shell(cmd, &r) != 0 || r.status != 0)
        return -1;
    moe_cmd_result_free(&r);
    return 0;
}

#endif
