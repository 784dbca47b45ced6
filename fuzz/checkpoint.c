/* checkpoint.c (fuzz): the checkpoint reader on arbitrary files: open (header,
 * footer and their checks), the stored command line, a full verify, and a
 * read of the start of every unit. A file is either refused with a message
 * or read; nothing else may happen. */
#include <stdlib.h>
#include <string.h>

#include "core/checkpoint.h"
#include "core/internal.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write(0, "model.pt", data, size);
    moe_ckpt *c = NULL;
    if (moe_ckpt_open(path, &c) == MOE_OK) {
        const moe_ckpt_meta *m = moe_ckpt_get_meta(c);
        (void)m;
        float buf[64];
        for (int u = 0; u < moe_ckpt_num_units(c); u++) {
            const moe_ckpt_unit *unit = moe_ckpt_unit_at(c, u);
            int64_t n = unit->numel < 64 ? unit->numel : 64;
            if (n > 0) {
                moe_ckpt_read(c, u, 0, 0, n, MOE_F32, buf);
                moe_error_clear();
            }
            (void)moe_ckpt_find_unit(c, unit->name);
        }
        moe_ckpt_verify(c);
        moe_error_clear();
        moe_ckpt_close(c);
    }
    moe_error_clear();
    int argc = 0;
    char **argv = NULL;
    if (moe_ckpt_read_args(path, &argc, &argv) == MOE_OK)
        moe_ckpt_free_args(argc, argv);
    moe_error_clear();
    return 0;
}
