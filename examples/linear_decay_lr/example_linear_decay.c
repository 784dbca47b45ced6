/* example_linear_decay.c: an out-of-tree learning-rate scheduler plugin,
 * built against the installed moelm headers only.
 *
 * --lr-scheduler example_linear_decay: linear warmup to the peak --lr over
 * --warmup-updates, then a straight line down to --example-end-lr at
 * --max-update, constant after that. The warmup matches fairseq's fixed
 * schedule (the LR after n updates is lr * (n + 1) / warmup), so switching
 * schedulers does not change the first updates.
 *
 * It shows the whole plugin surface a user needs: one exported descriptor
 * (MOE_PLUGIN_DEFINE), options added to the command line, reading options
 * through the host, and errors reported with host->error. It is deliberately
 * not a fairseq scheduler: fairseq's polynomial_decay differs in its warmup.
 */
#include <stdlib.h>

#include <moe/plugin.h>

typedef struct linear_decay {
    double peak, end;
    int64_t warmup, total;
} linear_decay;

static const moe_option linear_decay_options[] = {
    {"warmup-updates", MOE_OPT_INT, "0", "warmup the learning rate linearly for the first N updates", 0, 0, NULL},
    {"example-end-lr", MOE_OPT_FLOAT, "0.0", "learning rate reached at --max-update", 0, 0, NULL},
};

static moe_status linear_decay_init(const moe_host *h, void **out)
{
    /* --lr is a comma-separated list (one value per epoch); the first one is the peak */
    const char *lr = h->opt_str(h, "lr");
    char *end = NULL;
    double peak = lr ? strtod(lr, &end) : 0.0;
    if (!lr || end == lr || peak <= 0.0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "example_linear_decay: expected a positive --lr, found '%s'; give e.g. --lr 0.0005",
                        lr ? lr : "None");
    int64_t total = h->opt_int(h, "max-update");
    int64_t warmup = h->opt_int(h, "warmup-updates");
    if (total <= 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "example_linear_decay: expected --max-update > 0 (where the decay ends), found %lld; "
                        "give --max-update",
                        (long long)total);
    if (warmup < 0 || warmup > total)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "example_linear_decay: expected 0 <= --warmup-updates <= --max-update (%lld), found %lld",
                        (long long)total, (long long)warmup);
    linear_decay *s = malloc(sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "example_linear_decay: out of host memory");
    s->peak = peak;
    s->end = h->opt_float(h, "example-end-lr");
    s->warmup = warmup;
    s->total = total;
    *out = s;
    return MOE_OK;
}

static void linear_decay_destroy(void *sched) { free(sched); }

static double linear_decay_lr_at(void *sched, int64_t num_updates)
{
    const linear_decay *s = sched;
    if (num_updates < s->warmup)
        return s->peak * (double)(num_updates + 1) / (double)s->warmup;
    if (num_updates >= s->total)
        return s->end;
    double left = (double)(s->total - num_updates) / (double)(s->total - s->warmup);
    return s->end + (s->peak - s->end) * left;
}

static const moe_lr_scheduler_ops linear_decay_ops = {
    linear_decay_init,
    linear_decay_destroy,
    linear_decay_lr_at,
};

MOE_PLUGIN_DEFINE(MOE_KIND_LR_SCHEDULER, moe_lr_scheduler_ops, "example_linear_decay", "1.0.0",
                  "example: linear warmup, then linear decay to --example-end-lr at --max-update",
                  linear_decay_options, 2, NULL, NULL, &linear_decay_ops)
