/* config.c: flag combinations (see config.h).
 *
 * Each check mirrors an assertion fairseq makes at start-up or a failure it
 * would hit later (a wrong expert layout, a missing batch size), so that the
 * user learns it before plugins load and memory is allocated. One error per
 * run: the first problem found, with what to change.
 *
 * Not here: single-value checks (type, range, choices: core/options.c) and
 * checks a component owns (its own flags, in its init).
 */
#include "core/config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/plan.h"

#define MAX_LIST 256

static int flag(const moe_opts *o, const char *name) { return moe_opts_known(o, name) && moe_opts_flag(o, name); }

static int64_t int_or_zero(const moe_opts *o, const char *name)
{
    return moe_opts_known(o, name) && moe_opts_has_value(o, name) ? moe_opts_int(o, name) : 0;
}

static int fp16_family(const moe_opts *o) { return flag(o, "fp16") || flag(o, "memory-efficient-fp16"); }
static int bf16_family(const moe_opts *o) { return flag(o, "bf16") || flag(o, "memory-efficient-bf16"); }

/* "--fp16 and --memory-efficient-fp16" style list of the given precision flags. */
static void given_flags(const moe_opts *o, const char *const *names, int n, char *buf, size_t size)
{
    size_t len = 0;
    int k = 0;
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (!flag(o, names[i]) || len >= size)
            continue;
        len += (size_t)snprintf(buf + len, size - len, "%s--%s", k ? " and " : "", names[i]);
        k++;
    }
}

static moe_status check_precision(const moe_opts *o)
{
    if (!(fp16_family(o) && bf16_family(o)))
        return MOE_OK;
    static const char *const f16[] = {"fp16", "memory-efficient-fp16"};
    static const char *const b16[] = {"bf16", "memory-efficient-bf16"};
    char a[96], b[96];
    given_flags(o, f16, 2, a, sizeof a);
    given_flags(o, b16, 2, b, sizeof b);
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "%s cannot be combined with %s: expected one precision, found fp16 and bf16; keep one of "
                         "--fp16, --memory-efficient-fp16, --bf16, --memory-efficient-bf16",
                         a, b);
}

/* The list option `name`: every value parsed, `integers` asks for positive
 * integers (--update-freq), otherwise non-negative numbers (--lr). */
static moe_status check_list(const moe_opts *o, const char *name, int integers, int *count)
{
    double v[MAX_LIST];
    int n;
    MOE_TRY(moe_opts_float_list(o, name, v, MAX_LIST, &n));
    const char *text = moe_opts_str(o, name);
    if (n == 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "argument --%s: expected at least one value, found '%s'", name,
                             text ? text : "None");
    for (int i = 0; i < n; i++) {
        if (integers && !(v[i] >= 1 && v[i] == floor(v[i]) && v[i] <= 1e9))
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "argument --%s: expected positive integers such as '1' or '1,2,4', found '%s'", name,
                                 text);
        if (!integers && !(v[i] >= 0 && isfinite(v[i])))
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "argument --%s: expected non-negative numbers such as '0.0005', found '%s'", name,
                                 text);
    }
    *count = n;
    return MOE_OK;
}

static moe_status check_experts(const moe_opts *o, int world)
{
    int64_t E = int_or_zero(o, "moe-expert-count");
    int64_t freq = int_or_zero(o, "moe-freq");
    int64_t W = world > 0 ? world : 1;
    if (freq > 0 && E <= 0) {
        const char *found = moe_opts_known(o, "moe-expert-count") ? "0 (not given)" : "not a flag of this arch";
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--moe-freq %lld asks for MoE layers, but --moe-expert-count is %s; give "
                             "--moe-expert-count N (e.g. %lld, one expert per rank)",
                             (long long)freq, found, (long long)W);
    }
    if (E <= 0)
        return MOE_OK;
    MOE_TRY(moe_parallel_plan_check(E, W));
    const char *ddp = moe_opts_str(o, "ddp-backend");
    if (E < W && !(ddp && strcmp(ddp, "fully_sharded") == 0))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--moe-expert-count %lld is smaller than the world size %lld, so each expert is "
                             "replicated on %lld ranks, which needs --ddp-backend fully_sharded (found %s); add "
                             "--ddp-backend fully_sharded or use at least %lld experts",
                             (long long)E, (long long)W, (long long)(W / E), ddp ? ddp : "None", (long long)W);
    return MOE_OK;
}

static moe_status check_distributed(const moe_opts *o, int world)
{
    if (moe_opts_given(o, "distributed-rank") && world > 1 && moe_opts_int(o, "distributed-rank") >= world)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--distributed-rank %lld: expected a rank in 0..%d for a world of %d ranks; fix "
                             "--distributed-rank or --distributed-world-size",
                             (long long)moe_opts_int(o, "distributed-rank"), world - 1, world);
    const char *backend = moe_opts_str(o, "distributed-backend");
    if (moe_opts_given(o, "distributed-backend") && backend && world > 1) {
        if (strcmp(backend, "single") == 0)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "--distributed-backend single runs one process, found a world of %d ranks; use "
                                 "nccl (GPUs) or mpi (CPUs)",
                                 world);
        if (strcmp(backend, "nccl") == 0 && flag(o, "cpu"))
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "--distributed-backend nccl needs GPUs, found --cpu; use --distributed-backend mpi "
                                 "with --cpu");
    }
    return MOE_OK;
}

moe_status moe_config_check(const moe_opts *o, int world_size)
{
    int n_lr, n_freq;
    MOE_TRY(check_list(o, "lr", 0, &n_lr));
    MOE_TRY(check_list(o, "update-freq", 1, &n_freq));
    MOE_TRY(check_precision(o));
    if (!moe_opts_has_value(o, "batch-size") && !moe_opts_has_value(o, "max-tokens"))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "expected a batch size, found neither --batch-size nor --max-tokens; give --batch-size "
                             "N (sequences per GPU and micro-batch) or --max-tokens N");
    MOE_TRY(check_experts(o, world_size));
    if (n_freq > 1 && fp16_family(o) && !moe_opts_has_value(o, "fp16-scale-window"))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--update-freq '%s' is a schedule of %d values, which needs an explicit "
                             "--fp16-scale-window with fp16 (the default window uses one update frequency); add "
                             "--fp16-scale-window N",
                             moe_opts_str(o, "update-freq"), n_freq);
    MOE_TRY(check_distributed(o, world_size));
    return MOE_OK;
}

void moe_config_precision(const moe_opts *o, moe_dtype *act, moe_dtype *grad, int *master_weights,
                          int *loss_scaling)
{
    int fp16 = fp16_family(o), bf16 = bf16_family(o);
    int efficient = flag(o, "memory-efficient-fp16") || flag(o, "memory-efficient-bf16");
    moe_dtype t = fp16 ? MOE_F16 : bf16 ? MOE_BF16 : MOE_F32;
    *act = t;
    *grad = t;
    *master_weights = (fp16 || bf16) && !efficient;
    *loss_scaling = fp16;
}

/* The first number of a list option ("4,2", "[0.1, 0.2]", "(1,)"), or 0 with
 * *ok = 0. moe_config_check has validated the whole list; this only reads. */
static double first_of_list(const moe_opts *o, const char *name, int *ok)
{
    const char *s = moe_opts_str(o, name);
    *ok = 0;
    if (!s)
        return 0.0;
    while (*s == ' ' || *s == '\t' || *s == '(' || *s == '[')
        s++;
    char *end;
    double v = strtod(s, &end);
    *ok = end != s;
    return v;
}

int moe_config_update_freq(const moe_opts *o)
{
    int ok;
    double v = first_of_list(o, "update-freq", &ok);
    return ok && v >= 1 && v <= 1e9 ? (int)v : 1;
}

double moe_config_lr(const moe_opts *o)
{
    int ok;
    double v = first_of_list(o, "lr", &ok);
    return ok ? v : 0.25;
}
