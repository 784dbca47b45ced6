/* eval_lm.c: moelm-eval-lm, fairseq-eval-lm for moelm's models
 * (DATA_SPEC.md §3.13): the per-token loss of a trained model over a split.
 *
 *   moelm-eval-lm DATA --path CKPT [--gen-subset test] [--context-window C]
 *                 [--max-tokens N | --batch-size N] [--cpu] ...
 *
 * The model is the checkpoint's (any world size wrote it; its training flags
 * are read from the file, the flags here win), the data DATA's split
 * --gen-subset, batched by the language_modeling task as fairseq's
 * eval_lm_dataloader does: --max-tokens (36000 when neither it nor
 * --batch-size is given), a batch-size multiple of 1, sorted by size, no
 * shuffling; with --context-window C, blocks of tokens_per_sample - C in
 * their index order, each row given the C tokens before it as context
 * (LMContextWindowDataset) and scored only on its own tokens. Expert
 * capacity in evaluation follows --moe-eval-capacity-token-fraction, as in
 * validation, so with the same batches the loss equals moelm-train's
 * validation inner_loss.
 *
 * Output: fairseq's two final lines,
 *   Evaluated 1,234 tokens in 5.6s (220.36 tokens/s)
 *   Loss (base 2): 7.1234, Perplexity: 139.41
 * where the token count is the batches' source tokens (bos included) and the
 * loss averages the scored positions (with --add-bos-token the first, bos,
 * position of every row is not scored). On several ranks (torchrun
 * variables, mpirun, or --distributed-world-size N on one node) the ranks'
 * sums are added and every rank prints the same totals; fairseq's ranks each
 * print their own share instead.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dryrun.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/session.h"

#define PROG "moelm-eval-lm"

static const moe_option eval_options[] = {
    {"path", MOE_OPT_STRING, NULL,
     "the checkpoint: a name as --restore-file takes it (DIR/checkpoint_last.pt; the per-rank files are found from it) "
     "or a consolidated file",
     0, 0, NULL},
    {"gen-subset", MOE_OPT_STRING, "test", "data subset to evaluate", 0, 0, NULL},
    {"context-window", MOE_OPT_INT, "0",
     "give every block the C tokens before it as context (scored on its own tokens only)", 0, 1e9, NULL},
    {"softmax-batch", MOE_OPT_INT, NULL,
     "accepted for fairseq's command lines; the loss is computed in vocabulary chunks whatever it says", 0, 0, NULL},
    {"is-moe", MOE_OPT_FLAG, NULL, "accepted for fairseq's MoE command lines (moelm always knows)", 0, 0, NULL},
};

/* The training run's batching is not the evaluation's (fairseq's eval-lm has
 * its own dataset flags). */
static const char *const eval_reset[] = {
    "max-tokens", "batch-size", "max-tokens-valid", "batch-size-valid", "required-batch-size-multiple",
    "valid-subset", "train-subset", "max-valid-steps", "skip-invalid-size-inputs-valid-test", NULL,
};

/* LMContextWindowDataset's collater: row i becomes prev ++ row ++ pad, its
 * target the row's own, at offset |prev|; prev is then the row's last C
 * non-pad tokens. */
typedef struct context {
    int64_t C, max_len;   /* window, tokens_per_sample + C */
    int32_t *prev;
    int64_t n_prev;
} context;

static void widen(context *cx, int32_t pad, const moe_batch *b, int32_t *src, int32_t *tgt, int64_t *start)
{
    const int64_t T = b->T, W = T + cx->C;
    for (int64_t i = 0; i < b->B; i++) {
        const int32_t *row = b->src + i * T, *trow = b->tgt + i * T;
        int64_t len = 0;
        for (int64_t t = 0; t < T; t++)
            len += row[t] != pad;
        int64_t extra = cx->n_prev + len - cx->max_len;
        if (extra > 0) {
            memmove(cx->prev, cx->prev + extra, (size_t)(cx->n_prev - extra) * sizeof *cx->prev);
            cx->n_prev -= extra;
        }
        int32_t *s = src + i * W, *g = tgt + i * W;
        for (int64_t t = 0; t < W; t++)
            s[t] = g[t] = pad;
        memcpy(s, cx->prev, (size_t)cx->n_prev * sizeof *s);
        memcpy(s + cx->n_prev, row, (size_t)T * sizeof *s);
        memcpy(g + cx->n_prev, trow, (size_t)T * sizeof *g);
        start[i] = cx->n_prev;
        /* prev = the last C non-pad tokens of the new row, in order */
        int64_t nonpad = 0;
        for (int64_t t = 0; t < W; t++)
            nonpad += s[t] != pad;
        int64_t skip = nonpad > cx->C ? nonpad - cx->C : 0;
        cx->n_prev = 0;
        for (int64_t t = 0; t < W; t++)
            if (s[t] != pad && skip-- <= 0)
                cx->prev[cx->n_prev++] = s[t];
    }
}

typedef struct evaluator {
    moe_session *s;
    const moe_host *h;
    const char *split;
    int64_t C;
    int add_bos;
    int32_t pad;
    int dropless;                  /* --moe-dropless: a capacity overflow is an error */
    int64_t nb;                    /* batches of this rank */
    int64_t max_tokens, max_len;   /* the largest batch, widened */
    int32_t *tokens, *targets;     /* device */
    float *losses;                 /* device (max_tokens) */
    double *sums;                  /* device (3): loss sum, scored count, source tokens */
} evaluator;

/* one pass over the split's batches to size the model's buffers */
static moe_status bound_batches(evaluator *e)
{
    const moe_components *c = &e->s->c;
    e->nb = c->task->num_batches(c->task_state, e->split);
    if (e->nb < 0)
        return MOE_ERR_INVALID_ARG; /* the task set the message */
    for (int64_t i = 0; i < e->nb; i++) {
        moe_batch b;
        MOE_TRY(c->task->get_batch(c->task_state, e->split, i, &b));
        int64_t W = b.T + e->C;
        if (b.B * W > e->max_tokens)
            e->max_tokens = b.B * W;
        if (W > e->max_len)
            e->max_len = W;
        c->task->free_batch(c->task_state, &b);
    }
    return MOE_OK;
}

/* --moe-dropless: batch i's routing dropped no token (the overflow metrics
 * of every MoE layer are 0), else the error moelm-train gives */
static moe_status check_dropless(const evaluator *e, const moe_fwd_out *out, int64_t i, int64_t N)
{
    const int L = out->n_moe_layers;
    if (L < 1 || out->metrics == NULL)
        return MOE_OK;
    float *m = malloc((size_t)L * MOE_NUM_METRICS * sizeof *m);
    if (m == NULL)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory for %d layers' routing metrics", L);
    moe_status st = e->h->backend->copy_to_host(e->h->ctx, m, out->metrics, (uint64_t)L * MOE_NUM_METRICS * 4u);
    for (int l = 0; l < L && st == MOE_OK; l++) {
        const float *ml = m + (int64_t)l * MOE_NUM_METRICS;
        const float o = ml[MOE_METRIC_OVERFLOW_EXPERT1] > ml[MOE_METRIC_OVERFLOW_EXPERT2]
                            ? ml[MOE_METRIC_OVERFLOW_EXPERT1]
                            : ml[MOE_METRIC_OVERFLOW_EXPERT2];
        if (o > 0.0f)
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "--moe-dropless: expected no expert over the bound (--moe-dropless-capacity-factor "
                               "%g), found %.3f%% of the choices of MoE layer %d over it in batch %lld of %lld "
                               "tokens (routing collapse); raise --moe-dropless-capacity-factor",
                               moe_opts_float(e->s->opts, "moe-dropless-capacity-factor"), (double)o, l,
                               (long long)i, (long long)N);
    }
    free(m);
    return st;
}

static moe_status evaluate(evaluator *e, double *loss_sum, double *count, double *ntokens)
{
    const moe_host *h = e->h;
    const moe_components *c = &e->s->c;
    const int64_t Nmax = e->max_tokens;
    MOE_TRY(c->arch->setup(c->model, (Nmax + e->max_len - 1) / e->max_len, e->max_len));
    MOE_TRY(h->backend->alloc(h->ctx, (uint64_t)Nmax * 4u, "input tokens", (void **)&e->tokens));
    MOE_TRY(h->backend->alloc(h->ctx, (uint64_t)Nmax * 4u, "target tokens", (void **)&e->targets));
    MOE_TRY(h->backend->alloc(h->ctx, (uint64_t)Nmax * 4u, "per-token losses", (void **)&e->losses));
    MOE_TRY(h->backend->alloc(h->ctx, 3 * sizeof(double), "evaluation sums", (void **)&e->sums));
    int32_t *src = malloc((size_t)Nmax * sizeof *src), *tgt = malloc((size_t)Nmax * sizeof *tgt);
    float *nll = malloc((size_t)Nmax * sizeof *nll);
    int64_t *start = malloc((size_t)Nmax * sizeof *start);
    context cx = {e->C, 0, NULL, 0};
    if (e->C > 0) {
        cx.max_len = h->opt_int(h, "tokens-per-sample") + e->C;
        cx.prev = malloc((size_t)(e->C + 1) * sizeof *cx.prev);
    }
    moe_status st = MOE_OK;
    if (!src || !tgt || !nll || !start || (e->C > 0 && !cx.prev))
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory for batches of %lld tokens", (long long)Nmax);
    double sums[3] = {0, 0, 0};
    for (int64_t i = 0; i < e->nb && st == MOE_OK; i++) {
        moe_batch b;
        st = c->task->get_batch(c->task_state, e->split, i, &b);
        if (st != MOE_OK)
            break;
        const int64_t T = b.T + e->C, B = b.B, N = B * T;
        if (e->C > 0) {
            widen(&cx, e->pad, &b, src, tgt, start);
        } else {
            memcpy(src, b.src, (size_t)N * sizeof *src);
            memcpy(tgt, b.tgt, (size_t)N * sizeof *tgt);
            for (int64_t r = 0; r < B; r++)
                start[r] = 0;
        }
        sums[2] += (double)b.ntokens;
        c->task->free_batch(c->task_state, &b);
        st = h->backend->copy_from_host(h->ctx, e->tokens, src, (uint64_t)N * 4u);
        if (st == MOE_OK)
            st = h->backend->copy_from_host(h->ctx, e->targets, tgt, (uint64_t)N * 4u);
        moe_fwd_out out;
        if (st == MOE_OK) /* every rank runs every step (its empty batches too): MoE layers exchange tokens */
            st = c->arch->forward(c->model, e->tokens, B, T, 0, 0, &out);
        if (st == MOE_OK && e->dropless)
            st = check_dropless(e, &out, i, N);
        if (st == MOE_OK)
            st = h->ops->cross_entropy(h->ctx, e->losses, out.logits, e->targets, N, out.V, e->pad, 0.0f,
                                       h->act_dtype);
        if (st == MOE_OK)
            st = h->backend->copy_to_host(h->ctx, nll, e->losses, (uint64_t)N * 4u);
        if (st != MOE_OK)
            break;
        /* scored: the row's own non-pad targets; with bos, not its first */
        for (int64_t r = 0; r < B; r++)
            for (int64_t t = 0; t < T; t++) {
                int64_t k = r * T + t;
                if (tgt[k] == e->pad || (e->add_bos && t == start[r]) || !isfinite(nll[k]))
                    continue;
                sums[0] -= nll[k];
                sums[1] += 1.0;
            }
    }
    if (st == MOE_OK) { /* the ranks' sums, in fp64 */
        st = h->backend->copy_from_host(h->ctx, e->sums, sums, sizeof sums);
        if (st == MOE_OK)
            st = h->comm_ops->all_reduce(h->comm, NULL, e->sums, 3, MOE_F64, MOE_REDUCE_SUM);
        if (st == MOE_OK)
            st = h->backend->copy_to_host(h->ctx, sums, e->sums, sizeof sums);
    }
    *loss_sum = sums[0];
    *count = sums[1];
    *ntokens = sums[2];
    free(src);
    free(tgt);
    free(nll);
    free(start);
    free(cx.prev);
    return st;
}

static void evaluator_free(evaluator *e)
{
    if (!e->h)
        return;
    void *bufs[] = {e->tokens, e->targets, e->losses, e->sums};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            e->h->backend->free(e->h->ctx, bufs[i]);
}

/* fairseq's eval_lm_dataloader batching before the task is built */
static moe_status eval_defaults(moe_opts *o, void *arg)
{
    (void)arg;
    if (!moe_opts_has_value(o, "max-tokens") && !moe_opts_has_value(o, "batch-size"))
        MOE_TRY(moe_opts_set(o, "max-tokens", "36000"));
    if (!moe_opts_given(o, "required-batch-size-multiple"))
        MOE_TRY(moe_opts_set(o, "required-batch-size-multiple", "1"));
    MOE_TRY(moe_opts_set(o, "valid-subset", moe_opts_str(o, "gen-subset")));
    MOE_TRY(moe_opts_set(o, "disable-validation", "1")); /* no train split, no other valid files needed */
    int64_t C = moe_opts_int(o, "context-window");
    if (C > 0 && moe_opts_known(o, "tokens-per-sample")) {
        int64_t tps = moe_opts_int(o, "tokens-per-sample");
        if (C >= tps)
            return moe_error_set(MOE_ERR_INVALID_ARG, "--context-window %lld must be smaller than "
                                                      "--tokens-per-sample %lld",
                                 (long long)C, (long long)tps);
    }
    return MOE_OK;
}

int main(int argc, char **argv)
{
    static const char *const positional[] = {"data"};
    moe_session_config cfg = {0};
    cfg.prog = PROG;
    cfg.usage = "DATA --path CKPT [--gen-subset SPLIT] [--context-window C] [--max-tokens N | --batch-size N] "
                "[--cpu] [options]";
    cfg.about = "Evaluates a trained language model on a split of DATA (fairseq-eval-lm): prints the number of "
                "tokens evaluated, the loss in bits per token and the perplexity. The model's flags come from the "
                "checkpoint; flags given here win.";
    cfg.options = eval_options;
    cfg.n_options = (int)(sizeof eval_options / sizeof eval_options[0]);
    cfg.positional = positional;
    cfg.n_positional = 1;
    cfg.need_checkpoint = 1;
    cfg.need_task = 1;
    cfg.reset = eval_reset;
    cfg.prepare = eval_defaults;
    moe_session *s = NULL;
    int rc = moe_session_start(&cfg, argc, argv, &s);
    if (rc >= 0)
        return rc;
    evaluator e;
    memset(&e, 0, sizeof e);
    e.s = s;
    e.h = s->h;
    e.split = moe_opts_str(s->opts, "gen-subset");
    e.C = moe_opts_int(s->opts, "context-window");
    e.add_bos = moe_opts_known(s->opts, "add-bos-token") && moe_opts_flag(s->opts, "add-bos-token");
    e.pad = (int32_t)s->h->padding_idx;
    e.dropless = moe_opts_known(s->opts, "moe-dropless") && moe_opts_flag(s->opts, "moe-dropless");
    double loss_sum = 0, count = 0, ntokens = 0;
    double t0 = moe_mono_s();
    moe_status st = bound_batches(&e);
    if (st == MOE_OK) {
        t0 = moe_mono_s();
        st = evaluate(&e, &loss_sum, &count, &ntokens);
    }
    double t = moe_mono_s() - t0;
    evaluator_free(&e);
    if (st != MOE_OK) {
        rc = moe_error_report(PROG, st, 0);
        moe_session_close(s);
        return rc;
    }
    double loss = count > 0 ? -loss_sum / count / log(2.0) : 0.0;
    char n[48];
    moe_format_thousands(n, sizeof n, (int64_t)ntokens);
    moe_log(MOE_LOG_INFO, "fairseq_cli.eval_lm", "Evaluated %s tokens in %.1fs (%.2f tokens/s)", n, t,
            t > 0 ? ntokens / t : 0.0);
    moe_log(MOE_LOG_INFO, "fairseq_cli.eval_lm", "Loss (base 2): %.4f, Perplexity: %.2f", loss, pow(2.0, loss));
    moe_session_close(s);
    return 0;
}
