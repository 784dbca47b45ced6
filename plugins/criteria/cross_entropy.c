/* cross_entropy.c: the `cross_entropy` criterion, fairseq's
 * CrossEntropyCriterion: the sum over target tokens of -log_softmax(logits)
 * [target] in fp32, pad targets (index 1, fairseq's dictionary) ignored.
 * It is a sum, not a mean: the trainer divides by the total sample size.
 *
 * Statistics (moe_crit_in contract of plugin.h): MOE_STAT_LOSS and
 * MOE_STAT_INNER_LOSS both receive the NLL sum (they are the same quantity
 * here); MoE gate losses are ignored, so an MoE model trained with this
 * criterion gets no load-balancing gradient (dl_aux = 0), as in fairseq.
 *
 * Not here: label smoothing, --sentence-avg; the softmax itself
 * (ops->cross_entropy, which also writes dlogits in place).
 */
#include <stdlib.h>

#include "moe/plugin.h"


typedef struct ce_state {
    const moe_host *h;
} ce_state;

static moe_status ce_init(const moe_host *h, void **crit)
{
    ce_state *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "cross_entropy: out of host memory");
    s->h = h;
    *crit = s;
    return MOE_OK;
}

static void ce_destroy(void *crit) { free(crit); }

static moe_status ce_compute(void *crit, const moe_crit_in *in, float *dl_aux)
{
    const ce_state *s = crit;
    const moe_host *h = s->h;
    *dl_aux = 0.0f;
    const moe_fwd_out *f = in->fwd;
    if (!f || !f->logits || f->N <= 0 || f->V <= 0 || !in->targets || !in->stats || !in->scratch)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "cross_entropy: expected logits (N,V) with N, V > 0, targets, stats and scratch; got "
                        "N=%lld V=%lld",
                        f ? (long long)f->N : -1LL, f ? (long long)f->V : -1LL);
    moe_status st = h->ops->cross_entropy(h->ctx, in->scratch, f->logits, in->targets, f->N, f->V, h->padding_idx,
                                          in->grad_scale, h->act_dtype);
    if (st == MOE_OK)
        st = h->ops->sum_f32(h->ctx, in->stats + MOE_STAT_INNER_LOSS, in->scratch, f->N, 1, 1.0f);
    if (st == MOE_OK)
        st = h->ops->sum_f32(h->ctx, in->stats + MOE_STAT_LOSS, in->scratch, f->N, 1, 1.0f);
    return st;
}

static const moe_criterion_ops ce_ops = {ce_init, ce_destroy, ce_compute};

MOE_PLUGIN_DEFINE(MOE_KIND_CRITERION, moe_criterion_ops, "cross_entropy", "1.0",
                  "token-level cross entropy (sum of NLL over non-pad targets)", NULL, 0, NULL, NULL, &ce_ops)
