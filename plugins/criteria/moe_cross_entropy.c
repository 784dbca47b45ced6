/* moe_cross_entropy.c: the `moe_cross_entropy` criterion, fairseq's
 * MoECrossEntropyCriterion (FAIRSEQ_SPEC.md §3.1):
 *     inner = sum over non-pad targets of -log_softmax_fp32(logits)[target]
 *     G     = sum over MoE layers of l_aux, divided by their count for
 *             --moe-gate-loss-combine-method average (the default)
 *     loss  = inner + w * sample_size * G,   w = --moe-gate-loss-wt
 * Logged per micro-batch: loss, inner_loss, moe_loss = sample_size * G
 * (unweighted) and each routing metric averaged over the MoE layers.
 * Backward: dlogits in place (ops->cross_entropy with the loss scale) and
 * d loss / d l_aux = w * sample_size * (1 or 1/layers) * loss scale, the same
 * for every layer, returned for arch->backward.
 *
 * Padding index is 1 (fairseq's dictionary). Everything stays in backend
 * memory: l_aux and metrics are folded into the stats with ops->sum_f32.
 * Not here: --moe-gate-loss-transform neg_log (refused at init with a
 * message: it needs G on the host or a log op), --sentence-avg.
 */
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"


static const moe_option moe_ce_options[] = {
    {"moe-gate-loss-wt", MOE_OPT_FLOAT, "1.0", "Weight associated with MoE gate loss in the weighted sum of gate loss "
                                               "and cross entropy loss", 0, 0, NULL},
    {"moe-gate-loss-combine-method", MOE_OPT_CHOICE, "average",
     "Method of combining the gate loss from each MoE layers", 0, 0, "average|sum"},
    {"moe-gate-loss-transform", MOE_OPT_CHOICE, "none", "Transformation to apply to the gate loss", 0, 0,
     "none|neg_log"},
};

typedef struct moe_ce_state {
    const moe_host *h;
    float weight;  /* w */
    int average;   /* combine method average (1) or sum (0) */
} moe_ce_state;

static moe_status moe_ce_init(const moe_host *h, void **crit)
{
    *crit = NULL;
    const char *combine = h->opt_str(h, "moe-gate-loss-combine-method");
    const char *transform = h->opt_str(h, "moe-gate-loss-transform");
    if (combine && strcmp(combine, "average") != 0 && strcmp(combine, "sum") != 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "--moe-gate-loss-combine-method: expected average or sum, got '%s'", combine);
    if (transform && strcmp(transform, "none") != 0) {
        if (strcmp(transform, "neg_log") == 0)
            return h->error(h, MOE_ERR_UNSUPPORTED,
                            "--moe-gate-loss-transform neg_log is not supported by moe_cross_entropy (G = -log G "
                            "is not implemented); use --moe-gate-loss-transform none");
        return h->error(h, MOE_ERR_INVALID_ARG, "--moe-gate-loss-transform: expected none or neg_log, got '%s'",
                        transform);
    }
    moe_ce_state *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "moe_cross_entropy: out of host memory");
    s->h = h;
    s->weight = (float)h->opt_float(h, "moe-gate-loss-wt");
    s->average = !combine || strcmp(combine, "average") == 0;
    *crit = s;
    return MOE_OK;
}

static void moe_ce_destroy(void *crit) { free(crit); }

static moe_status moe_ce_compute(void *crit, const moe_crit_in *in, float *dl_aux)
{
    const moe_ce_state *s = crit;
    const moe_host *h = s->h;
    const moe_ops *ops = h->ops;
    *dl_aux = 0.0f;
    const moe_fwd_out *f = in->fwd;
    if (!f || !f->logits || f->N <= 0 || f->V <= 0 || !in->targets || !in->stats || !in->scratch)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "moe_cross_entropy: expected logits (N,V) with N, V > 0, targets, stats and scratch; got "
                        "N=%lld V=%lld",
                        f ? (long long)f->N : -1LL, f ? (long long)f->V : -1LL);
    int L = f->n_moe_layers;
    if (L < 0 || (L > 0 && (!f->l_aux || !f->metrics)))
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "moe_cross_entropy: expected l_aux and metrics for %d MoE layers; got %s%s", L,
                        f->l_aux ? "" : "no l_aux ", f->metrics ? "" : "no metrics");

    float *stats = in->stats;
    moe_status st = ops->cross_entropy(h->ctx, in->scratch, f->logits, in->targets, f->N, f->V,
                                       h->padding_idx, in->grad_scale, h->act_dtype);
    if (st == MOE_OK)
        st = ops->sum_f32(h->ctx, stats + MOE_STAT_INNER_LOSS, in->scratch, f->N, 1, 1.0f);
    if (st == MOE_OK)
        st = ops->sum_f32(h->ctx, stats + MOE_STAT_LOSS, in->scratch, f->N, 1, 1.0f);
    if (st != MOE_OK || L == 0) /* a dense model: no gate loss, no routing metrics */
        return st;

    const float combine = s->average ? 1.0f / (float)L : 1.0f;
    const float ss = (float)in->sample_size;
    /* moe_loss = sample_size * G; loss += w * sample_size * G */
    st = ops->sum_f32(h->ctx, stats + MOE_STAT_MOE_LOSS, f->l_aux, L, 1, ss * combine);
    if (st == MOE_OK)
        st = ops->sum_f32(h->ctx, stats + MOE_STAT_LOSS, f->l_aux, L, 1, s->weight * ss * combine);
    for (int k = 0; k < MOE_NUM_METRICS && st == MOE_OK; k++)
        st = ops->sum_f32(h->ctx, stats + MOE_STAT_METRICS + k, f->metrics + k, L, MOE_NUM_METRICS,
                          1.0f / (float)L);
    if (st != MOE_OK)
        return st;
    *dl_aux = in->grad_scale != 0.0f ? s->weight * ss * combine * in->grad_scale : 0.0f;
    return MOE_OK;
}

static const moe_criterion_ops moe_ce_ops = {moe_ce_init, moe_ce_destroy, moe_ce_compute};

MOE_PLUGIN_DEFINE(MOE_KIND_CRITERION, moe_criterion_ops, "moe_cross_entropy", "1.0",
                  "cross entropy plus the weighted MoE load-balancing loss (fairseq's moe_cross_entropy)",
                  moe_ce_options, (int)(sizeof moe_ce_options / sizeof moe_ce_options[0]), NULL, NULL, &moe_ce_ops)
