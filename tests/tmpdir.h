/* tmpdir.h: a scratch directory per test program (header-only, static inline
 * as testutil.h): made under /tmp with a tag in its name, removed with
 * everything in it. */
#ifndef MOE_TESTS_TMPDIR_H
#define MOE_TESTS_TMPDIR_H

#include <stdio.h>
#include <stdlib.h>

/* dir (>= 64 bytes) becomes /tmp/moelm-<tag>-XXXXXX, created; 0 on success */
static inline int moe_test_mkdtemp(char *dir, size_t size, const char *tag)
{
    snprintf(dir, size, "/tmp/moelm-%s-XXXXXX", tag);
    return mkdtemp(dir) ? 0 : -1;
}

static inline int moe_test_rmtree(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

#endif
