/* indexed.c (fuzz): the mmap dataset reader (fairseq and Megatron layouts)
 * on an arbitrary .idx and .bin pair: the input's first two bytes give the
 * .idx length, the rest of it follows, then the .bin. Opened datasets are
 * read in full (at most 4096 tokens) against a vocabulary of 2^20. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/error.h"
#include "data/indexed.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t idx_len = ((size_t)data[0] | (size_t)data[1] << 8) % (size - 1);
    const uint8_t *idx = data + 2, *bin = data + 2 + idx_len;
    size_t bin_len = size - 2 - idx_len;
    fuzz_write(0, "d.idx", idx, idx_len);
    fuzz_write(1, "d.bin", bin, bin_len);
    char prefix[300];
    snprintf(prefix, sizeof prefix, "%s/d", fuzz_dir());
    moe_idx *ds = NULL;
    if (moe_idx_open(prefix, &ds) == MOE_OK) {
        int64_t count = moe_idx_count(ds), tokens = moe_idx_num_tokens(ds);
        const int64_t *sizes = moe_idx_sizes(ds);
        int64_t sum = 0;
        for (int64_t i = 0; i < count; i++)
            sum += sizes[i];
        int64_t n = tokens < 4096 ? tokens : 4096;
        int32_t *out = malloc((size_t)(n > 0 ? n : 1) * sizeof *out);
        if (out && n > 0)
            moe_idx_read(ds, 0, n, (int64_t)1 << 20, out);
        if (tokens > 0)
            (void)moe_idx_item_of(ds, tokens - 1);
        int64_t nd;
        (void)moe_idx_doc_index(ds, &nd);
        (void)moe_idx_modes(ds);
        free(out);
        moe_idx_close(ds);
        (void)sum;
    }
    moe_data_clear_error();
    return 0;
}
