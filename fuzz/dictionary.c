/* dictionary.c (fuzz): fairseq's dict.txt reader on arbitrary text, and
 * lookups of every symbol it kept. */
#include "data/dictionary.h"
#include "data/error.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write(0, "dict.txt", data, size);
    moe_dict *d = NULL;
    if (moe_dict_load(path, &d) == MOE_OK) {
        for (int64_t i = 0; i < moe_dict_len(d); i++) {
            size_t len;
            const char *sym = moe_dict_symbol(d, i, &len);
            if (sym)
                (void)moe_dict_index(d, sym, len);
            (void)moe_dict_count(d, i);
        }
        moe_dict_destroy(d);
    }
    moe_data_clear_error();
    return 0;
}
