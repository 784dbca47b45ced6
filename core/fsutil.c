/* fsutil.c: see fsutil.h. */
#include "core/fsutil.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

moe_mkdir_fail moe_mkdir_p(const char *dir, mode_t mode, char *at, size_t size, int *last)
{
    const size_t n = strlen(dir);
    char *p = malloc(n + 1);
    if (!p) {
        errno = ENOMEM;
        return MOE_MKDIR_CREATE;
    }
    memcpy(p, dir, n + 1);
    moe_mkdir_fail fail = MOE_MKDIR_OK;
    int err = 0;
    size_t i = 1;
    for (; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        const char c = p[i];
        p[i] = '\0';
        struct stat sb;
        if (stat(p, &sb) == 0) {
            if (!S_ISDIR(sb.st_mode))
                fail = MOE_MKDIR_NOT_DIR;
        } else if (errno != ENOENT) {
            fail = MOE_MKDIR_UNREADABLE;
            err = errno;
        } else if (mkdir(p, mode) != 0 && errno != EEXIST) {
            fail = MOE_MKDIR_CREATE;
            err = errno;
        }
        if (fail != MOE_MKDIR_OK)
            break; /* p holds the failing prefix */
        p[i] = c;
    }
    if (fail != MOE_MKDIR_OK) {
        if (at && size)
            snprintf(at, size, "%s", p);
        if (last)
            *last = i >= n;
    }
    free(p);
    errno = err;
    return fail;
}
