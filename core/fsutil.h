/* fsutil.h: mkdir -p, the one directory walk the --save-dir check, the
 * checkpoint writers and the TensorBoard log directory share. Each caller
 * words its own error from what the walk reports. */
#ifndef MOE_CORE_FSUTIL_H
#define MOE_CORE_FSUTIL_H

#include <stddef.h>
#include <sys/types.h>

typedef enum moe_mkdir_fail {
    MOE_MKDIR_OK = 0,
    MOE_MKDIR_NOT_DIR,    /* a prefix exists and is not a directory */
    MOE_MKDIR_UNREADABLE, /* a prefix cannot be examined (stat failed, not ENOENT) */
    MOE_MKDIR_CREATE,     /* a missing prefix cannot be created (or no memory) */
} moe_mkdir_fail;

/* Creates `dir` and its missing parents with `mode` (before the umask),
 * checking each prefix that ends a component in order. On failure, errno is
 * the cause (0 for MOE_MKDIR_NOT_DIR), the failing prefix is copied into `at`
 * (size bytes, when `at` is not NULL) and *last (when not NULL) says whether
 * that prefix is `dir` itself. */
moe_mkdir_fail moe_mkdir_p(const char *dir, mode_t mode, char *at, size_t size, int *last);

#endif
