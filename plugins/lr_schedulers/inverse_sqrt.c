/* inverse_sqrt.c: the `inverse_sqrt` lr scheduler, fairseq's
 * InverseSquareRootSchedule. After n successful updates, with W =
 * --warmup-updates, peak = --lr (exactly one value) and init =
 * --warmup-init-lr (-1 means 0 when W > 0, else the peak):
 *     init + n * (peak - init) / W     while n < W,
 *     peak * sqrt(W) / sqrt(n)         otherwise,
 * computed in fairseq's order (decay_factor = peak * W**0.5; lr =
 * decay_factor * n**-0.5), so the first update runs at init.
 *
 * Not here: W = 0, which fairseq divides by; it is refused with a message.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "moe/plugin.h"

static const moe_option inverse_sqrt_options[] = {
    {"warmup-updates", MOE_OPT_INT, "4000", "warmup the learning rate linearly for the first N updates", 0, 0,
     NULL},
    {"warmup-init-lr", MOE_OPT_FLOAT, "-1", "initial learning rate during warmup phase; default is cfg.lr", 0, 0,
     NULL},
};

typedef struct inverse_sqrt_sched {
    int64_t warmup_updates;
    double warmup_init_lr, lr_step, decay_factor;
} inverse_sqrt_sched;

static moe_status inverse_sqrt_init(const moe_host *h, void **out)
{
    *out = NULL;
    double lrs[64];
    int count = h->opt_floats(h, "lr", lrs, 64);
    if (count < 0)
        return MOE_ERR_INVALID_ARG; /* the message names the option and the text */
    double peak = count > 0 ? lrs[0] : 0.0;
    if (count != 1)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "--lr has %d values; cannot use a fixed learning rate schedule with inverse_sqrt. Consider "
                        "--lr-scheduler=fixed instead.",
                        count);
    int64_t W = h->opt_int(h, "warmup-updates");
    if (W <= 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "--warmup-updates: inverse_sqrt decays as lr*sqrt(W/n) and needs W > 0, got %lld; use "
                        "--lr-scheduler fixed for a constant lr",
                        (long long)W);
    inverse_sqrt_sched *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "inverse_sqrt: out of host memory");
    double init = h->opt_float(h, "warmup-init-lr");
    if (init < 0)
        init = W > 0 ? 0.0 : peak;
    s->warmup_updates = W;
    s->warmup_init_lr = init;
    s->lr_step = (peak - init) / (double)W;
    s->decay_factor = peak * pow((double)W, 0.5);
    *out = s;
    return MOE_OK;
}

static void inverse_sqrt_destroy(void *sched) { free(sched); }

static double inverse_sqrt_lr_at(void *sched, int64_t num_updates)
{
    const inverse_sqrt_sched *s = sched;
    if (num_updates < s->warmup_updates)
        return s->warmup_init_lr + (double)num_updates * s->lr_step;
    return s->decay_factor * pow((double)num_updates, -0.5);
}

static const moe_lr_scheduler_ops inverse_sqrt_ops = {inverse_sqrt_init, inverse_sqrt_destroy, inverse_sqrt_lr_at};

MOE_PLUGIN_DEFINE(MOE_KIND_LR_SCHEDULER, moe_lr_scheduler_ops, "inverse_sqrt", "1.0",
                  "linear warmup, then decay with the inverse square root of the update number",
                  inverse_sqrt_options, (int)(sizeof inverse_sqrt_options / sizeof inverse_sqrt_options[0]), NULL,
                  NULL, &inverse_sqrt_ops)
