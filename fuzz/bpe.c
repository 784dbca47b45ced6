/* bpe.c (fuzz): the GPT-2 BPE loaders on arbitrary files: a first byte that
 * is even makes the rest a tokenizer.json; odd splits the rest at its first
 * NUL into encoder.json and vocab.bpe. A loaded model encodes and decodes a
 * short text. */
#include <stdlib.h>
#include <string.h>

#include "data/bpe.h"
#include "data/error.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    moe_bpe *b = NULL;
    moe_status st;
    if (data[0] % 2 == 0) {
        st = moe_bpe_load_tokenizer_json(fuzz_write(0, "tokenizer.json", data + 1, size - 1), &b);
    } else {
        const uint8_t *nul = memchr(data + 1, 0, size - 1);
        size_t a = nul ? (size_t)(nul - (data + 1)) : size - 1;
        const char *enc = fuzz_write(0, "encoder.json", data + 1, a);
        const char *voc = fuzz_write(1, "vocab.bpe", nul ? nul + 1 : data + size, nul ? size - 2 - a : 0);
        st = moe_bpe_load_gpt2(enc, voc, &b);
    }
    if (st == MOE_OK) {
        moe_bpe_state *s = NULL;
        if (moe_bpe_state_create(b, &s) == MOE_OK) {
            static const char text[] = "Hello world, it's 123 tokens!\n\xc3\xa9t\xc3\xa9  ";
            int32_t *ids = NULL;
            int64_t n = 0, cap = 0;
            if (moe_bpe_encode(s, text, sizeof text - 1, &ids, &n, &cap) == MOE_OK) {
                char *back = NULL;
                size_t len = 0;
                if (moe_bpe_decode(b, ids, n, &back, &len) == MOE_OK)
                    free(back);
            }
            free(ids);
            moe_bpe_state_destroy(s);
        }
        moe_bpe_destroy(b);
    }
    moe_data_clear_error();
    return 0;
}
