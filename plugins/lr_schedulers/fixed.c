/* fixed.c: the `fixed` lr scheduler, fairseq's FixedLRSchedule
 * (FAIRSEQ_SPEC.md §6): the peak lr (first value of --lr) with an optional
 * linear warmup. After n successful updates the lr is
 *     lr * (n + 1) / W   while n < W (W = --warmup-updates > 0),
 *     lr                 otherwise,
 * so update k (1-based) runs at lr*k/W; the trainer asks for n = 0 before the
 * first update, as fairseq does when it builds the optimizer.
 *
 * Not here: fairseq's per-epoch behaviour (--lr lists indexed by epoch,
 * --force-anneal with --lr-shrink), since lr_at has no epoch; epoch 1 of
 * fairseq is reproduced exactly, --force-anneal is refused.
 */
#include <errno.h>
#include <stdlib.h>

#include "moe/plugin.h"

static const moe_option fixed_options[] = {
    {"warmup-updates", MOE_OPT_INT, "0", "warmup the learning rate linearly for the first N updates", 0, 0, NULL},
    {"force-anneal", MOE_OPT_INT, NULL, "force annealing at specified epoch", 0, 0, NULL},
    {"lr-shrink", MOE_OPT_FLOAT, "0.1", "shrink factor for annealing, lr_new = (lr * lr_shrink)", 0, 0, NULL},
};

typedef struct fixed_sched {
    double lr;              /* peak */
    int64_t warmup_updates; /* W */
} fixed_sched;

static moe_status fixed_init(const moe_host *h, void **out)
{
    *out = NULL;
    double lrs[64];
    int count = h->opt_floats(h, "lr", lrs, 64);
    if (count < 0)
        return MOE_ERR_INVALID_ARG; /* the message names the option and the text */
    if (count == 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--lr: expected at least one learning rate, found an empty list");
    double lr = lrs[0];
    int64_t W = h->opt_int(h, "warmup-updates");
    if (W < 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--warmup-updates: expected a count >= 0, got %lld", (long long)W);
    if (h->opt_set(h, "force-anneal"))
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "--force-anneal %lld: per-epoch annealing is not supported by the fixed scheduler here "
                        "(lr_at has no epoch); drop the flag or use --lr-scheduler inverse_sqrt",
                        (long long)h->opt_int(h, "force-anneal"));
    if (count > 1)
        h->log(h, MOE_LOG_WARNING, "fairseq.optim.lr_scheduler.fixed_schedule",
               "--lr has %d values; only the first (%g, fairseq's epoch-1 value) is used", count, lr);
    fixed_sched *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "fixed: out of host memory");
    s->lr = lr;
    s->warmup_updates = W;
    *out = s;
    return MOE_OK;
}

static void fixed_destroy(void *sched) { free(sched); }

static double fixed_lr_at(void *sched, int64_t num_updates)
{
    const fixed_sched *s = sched;
    if (s->warmup_updates > 0 && num_updates < s->warmup_updates) {
        /* fairseq: warmup_factor = (num_updates + 1) / float(W); lr = warmup_factor * lr */
        double warmup_factor = (double)(num_updates + 1) / (double)s->warmup_updates;
        return warmup_factor * s->lr;
    }
    return s->lr;
}

static const moe_lr_scheduler_ops fixed_ops = {fixed_init, fixed_destroy, fixed_lr_at};

MOE_PLUGIN_DEFINE(MOE_KIND_LR_SCHEDULER, moe_lr_scheduler_ops, "fixed", "1.0",
                  "constant learning rate with optional linear warmup (fairseq's fixed schedule)", fixed_options,
                  (int)(sizeof fixed_options / sizeof fixed_options[0]), NULL, NULL, &fixed_ops)
