/* state_io.h: an optimizer plugin's checkpoint state (moe_optimizer_ops
 * state_bytes/save_state/load_state) seen as one byte range laid over its
 * device buffers in order. Header-only: each optimizer is its own .so.
 *
 * segment(opt, k, &ptr) gives buffer k's length in bytes (0: not there) and
 * its device pointer, for k = 0 .. n - 1. */
#ifndef MOE_PLUGINS_OPTIMIZERS_STATE_IO_H
#define MOE_PLUGINS_OPTIMIZERS_STATE_IO_H

#include "moe/plugin.h"

typedef uint64_t (*moe_state_segment_fn)(const void *opt, int k, void **ptr);

static inline uint64_t moe_state_total(const void *opt, int n, moe_state_segment_fn segment)
{
    uint64_t total = 0;
    void *p;
    for (int k = 0; k < n; k++)
        total += segment(opt, k, &p);
    return total;
}

/* copy [offset, offset + bytes) of the state to (save) or from host memory */
static inline moe_status moe_state_io(const moe_host *h, const char *who, const void *opt, int n,
                                      moe_state_segment_fn segment, uint64_t offset, void *host, uint64_t bytes,
                                      int save)
{
    uint64_t pos = 0;
    char *hp = host;
    for (int k = 0; k < n && bytes > 0; k++) {
        void *dev;
        uint64_t len = segment(opt, k, &dev);
        if (offset < pos + len) {
            uint64_t in = offset - pos, m = len - in < bytes ? len - in : bytes;
            char *d = (char *)dev + in;
            moe_status st = save ? h->backend->copy_to_host(h->ctx, hp, d, m)
                                 : h->backend->copy_from_host(h->ctx, d, hp, m);
            if (st != MOE_OK)
                return st;
            hp += m;
            offset += m;
            bytes -= m;
        }
        pos += len;
    }
    if (bytes > 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: state range ends %llu bytes past its %llu bytes", who,
                        (unsigned long long)bytes, (unsigned long long)moe_state_total(opt, n, segment));
    return MOE_OK;
}

#endif
