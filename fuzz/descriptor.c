/* descriptor.c (fuzz): the loader's checks of a plugin descriptor
 * (moe_registry_check_descriptor) and of its option table (the option
 * store's, as the descriptor's options are added), on descriptors built from
 * the input: ABI numbers, struct sizes, kind, name, options of any type,
 * bounds, defaults and choices, and an ops table with any slots missing.
 * Mostly-valid fields are favoured so the later checks are reached. */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/options.h"
#include "core/registry.h"
#include "fuzz_util.h"

typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader;

static unsigned byte(reader *r)
{
    if (r->n == 0)
        return 0;
    r->n--;
    return *r->p++;
}

/* a NUL-terminated string of at most 40 bytes of the input, in `pool` */
static const char *string(reader *r, char *pool, size_t *used, size_t cap)
{
    unsigned len = byte(r) % 41;
    if (len == 40)
        return NULL;
    if (*used + len + 1 > cap)
        return "";
    char *s = pool + *used;
    for (unsigned i = 0; i < len; i++)
        s[i] = (char)byte(r);
    s[len] = '\0';
    *used += len + 1;
    return s;
}

static double number(reader *r)
{
    static const double picks[] = {0, 1, -1, 0.5, 1e9, -1e9, 1e300, 2147483647.0, 9007199254740992.0};
    unsigned b = byte(r);
    return b < 9 ? picks[b] : (double)(int)(b - 128);
}

static void slot_fn(void) {}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    char pool[4096];
    size_t used = 0;
    static const size_t ops_sizes[MOE_KIND_COUNT] = {
        sizeof(moe_arch_ops),    sizeof(moe_task_ops), sizeof(moe_criterion_ops),  sizeof(moe_optimizer_ops),
        sizeof(moe_lr_scheduler_ops), sizeof(moe_gate_ops), sizeof(moe_normalizer_ops), sizeof(moe_backend_ops),
        sizeof(moe_comm_ops)};
    moe_plugin_kind kind = (moe_plugin_kind)(byte(&r) % MOE_KIND_COUNT);
    moe_plugin_desc d;
    memset(&d, 0, sizeof d);
    unsigned b = byte(&r);
    d.abi_major = b < 240 ? MOE_ABI_MAJOR : b;
    d.abi_minor = byte(&r) % 4;
    b = byte(&r);
    d.desc_size = b < 240 ? (uint32_t)sizeof(moe_plugin_desc) : b;
    b = byte(&r);
    d.host_size = b < 240 ? (uint32_t)sizeof(moe_host) : b;
    b = byte(&r);
    d.kind = b < 200 ? kind : (moe_plugin_kind)(b % (MOE_KIND_COUNT + 3) - 1);
    b = byte(&r);
    d.ops_size = b < 240 ? (uint32_t)ops_sizes[(unsigned)d.kind < MOE_KIND_COUNT ? d.kind : kind] : b;
    const char *name = "fz";
    d.name = byte(&r) < 200 ? name : string(&r, pool, &used, sizeof pool);
    d.version = string(&r, pool, &used, sizeof pool);
    d.description = string(&r, pool, &used, sizeof pool);
    moe_option opts[6];
    b = byte(&r);
    d.n_options = b == 255 ? -1 : (int)(b % 7);
    for (int i = 0; i < 6; i++) {
        opts[i].name = string(&r, pool, &used, sizeof pool);
        opts[i].type = (moe_opt_type)(byte(&r) % 7);
        opts[i].default_value = string(&r, pool, &used, sizeof pool);
        opts[i].help = string(&r, pool, &used, sizeof pool);
        if (!opts[i].help)
            opts[i].help = "";
        opts[i].min = number(&r);
        opts[i].max = number(&r);
        opts[i].choices = string(&r, pool, &used, sizeof pool);
    }
    d.options = d.n_options > 0 && d.n_options <= 6 && byte(&r) < 250 ? opts : NULL;
    if (d.n_options > 6)
        d.n_options = 6;
    /* an ops table whose slots are set or not, as the input says */
    void (*table[64])(void);
    for (int i = 0; i < 64; i++)
        table[i] = byte(&r) % 8 ? slot_fn : NULL;
    d.ops = byte(&r) < 250 ? (const void *)table : NULL;

    if (moe_registry_check_descriptor("/fuzz/libmoe-x-fz.so", kind, name, &d) == MOE_OK) {
        moe_opts *o = NULL;
        if (moe_opts_create(&o) == MOE_OK)
            moe_opts_add_table(o, "fuzz", d.options, d.n_options);
        moe_opts_destroy(o);
    }
    moe_error_clear();
    return 0;
}
