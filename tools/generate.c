/* generate.c: moelm-generate, fairseq-interactive for moelm's language
 * models: continues prompts with greedy decoding or sampling, through the
 * arch's K/V cache (moe_arch_ops decode_*), on the cpu or a GPU.
 *
 *   moelm-generate DATA [--path CKPT] [--prompt TEXT | --input FILE] [--batch-size N]
 *                  [--sampling [--sampling-topk K] [--sampling-topp P]] [--temperature T]
 *                  [--max-len-a A] [--max-len-b B] [--min-len L] [--seed S]
 *                  [--bpe gpt2 --gpt2-encoder-json F --gpt2-vocab-bpe F | --tokenizer F]
 *                  [--output-format fairseq|plain] [--cpu] [--fp16 | --bf16] ...
 *
 * What it does, as fairseq-interactive with --task language_modeling: each
 * input line (stripped; --prompt gives one) is encoded (GPT-2 BPE to ids, or
 * whitespace words) and looked up in DATA/dict.txt; generation starts from
 * </s> (<s> with --add-bos-token), the prompt is forced as a prefix and
 * scored, then tokens are chosen until </s> or the maximum length
 * max_len = min(a * src_len + b, max positions - 1), where src_len is 1 + the
 * batch's longest prompt (so, as in fairseq, the prompt counts towards it and
 * a != 0 makes it depend on the batch). <pad> is never chosen, </s> not
 * before --min-len; at max_len </s> is forced. Greedy is --beam 1 (beam
 * search is not implemented); --sampling draws from the softmax of
 * logits / --temperature, restricted by --sampling-topp (the smallest set of
 * most probable tokens whose mass reaches P, the first token reaching it
 * included, as fairseq's) or else --sampling-topk. Draws are Philox
 * uniforms of (--seed, the input's index, the step): the same inputs give the
 * same outputs whatever the batch size and on cpu and GPU alike (for the
 * same logits).
 *
 * Output (--output-format fairseq, default), per input i, in input order:
 *   S-i  <prompt symbols>          (dict.txt symbols, <unk> for unknown words)
 *   W-i  <seconds>  seconds        (the batch's time over its size)
 *   H-i  <score>  <symbols>        (prompt + continuation, </s> stripped)
 *   D-i  <score>  <detokenized>    (through the BPE when there is one)
 *   P-i  <log-probabilities>       (every hypothesis token and the final </s>)
 * Scores are fairseq's, in base 2: P- holds each token's log2-probability
 * with 4 decimals (the prompt's tokens included), the score is their mean,
 * printed as Python prints a float. --output-format plain prints only the
 * detokenized hypothesis, one line per input, and sends the log to stderr
 * (the process's stdout is pointed at stderr, the results keep the real
 * one).
 *
 * Model: the checkpoint's (--path; its training flags are read from it, the
 * flags here win), or without --path one randomly initialised from the flags
 * given (--arch, sizes, --task, ...), for benchmarks. Expert capacity in
 * evaluation is --moe-eval-capacity-token-fraction, 1.0 unless given here,
 * so that no token is dropped. --report-speed prints to stderr the tokens per
 * second of the decoding loop (one token per row and step, the host's
 * sampling included; also without each batch's first two steps, which load
 * kernels and record the step's graph) and, separately, of the prompts'
 * prefill.
 *
 * Deliberate differences from fairseq-interactive: no beam search, nbest 1,
 * no --prefix-size, --unkpen, --no-repeat-ngram-size or constraints; the
 * default --beam is 1; batches are formed in input order by --batch-size
 * (--max-tokens is not used to batch). Symbols of dict.txt that are not
 * GPT-2 ids (<unk>, words) pass through the BPE decoding as text, where
 * fairseq's would fail.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/strbuf.h"
#include "core/log.h"
#include "core/session.h"
#include "data/bpe.h"
#include "data/dictionary.h"
#include "data/error.h"
#include "data/text.h"
#include "kernels/philox.h"

#define PROG "moelm-generate"
#define LOGGER "fairseq_cli.interactive"
#define NOLIMIT 0, 0
#define PREFILL_STEP 64   /* tokens per row a prompt is fed in at once */
#define SAMPLE_STREAM 0x53414D50ull /* "SAMP", xor'ed with the input's index */

static const moe_option gen_options[] = {
    {"path", MOE_OPT_STRING, NULL,
     "the checkpoint (DIR/checkpoint_last.pt, the per-rank files are found from it, or a consolidated file); "
     "without it the model is randomly initialised from the flags given (for benchmarks)",
     NOLIMIT, NULL},
    {"prompt", MOE_OPT_STRING, NULL, "one prompt to continue (instead of reading lines from --input)", NOLIMIT, NULL},
    {"input", MOE_OPT_STRING, "-", "file to read prompts from, one a line ('-': stdin)", NOLIMIT, NULL},
    {"buffer-size", MOE_OPT_INT, "0", "read this many lines before generating for them (0: 1)", 0, 1e9, NULL},
    {"beam", MOE_OPT_INT, "1", "beam size: only 1 (greedy, or one sample with --sampling)", 1, 1e6, NULL},
    {"nbest", MOE_OPT_INT, "1", "number of hypotheses to output: only 1", 1, 1e6, NULL},
    {"sampling", MOE_OPT_FLAG, NULL, "sample hypotheses instead of choosing the most probable token", NOLIMIT, NULL},
    {"sampling-topk", MOE_OPT_INT, "-1", "sample from the k most probable tokens (-1: all)", NOLIMIT, NULL},
    {"sampling-topp", MOE_OPT_FLOAT, "-1.0",
     "sample from the smallest set of most probable tokens whose cumulative probability reaches p (-1: off)",
     NOLIMIT, NULL},
    {"temperature", MOE_OPT_FLOAT, "1.0", "temperature for generation: log-probabilities of logits / temperature",
     NOLIMIT, NULL},
    {"max-len-a", MOE_OPT_FLOAT, "0", "generate sequences of maximum length a*x + b, x the source length",
     NOLIMIT, NULL},
    {"max-len-b", MOE_OPT_INT, "200",
     "generate sequences of maximum length a*x + b (the prompt counts, the final </s> comes on top)", NOLIMIT, NULL},
    {"min-len", MOE_OPT_INT, "1", "minimum generation length: no </s> before this step", NOLIMIT, NULL},
    {"unkpen", MOE_OPT_FLOAT, "0", "unknown word penalty: only 0", NOLIMIT, NULL},
    {"output-format", MOE_OPT_CHOICE, "fairseq",
     "fairseq: S-/W-/H-/D-/P- lines per input (scores in base 2); plain: the detokenized hypothesis only, one line "
     "per input, log on stderr",
     NOLIMIT, "fairseq|plain"},
    {"bpe", MOE_OPT_CHOICE, NULL,
     "gpt2: prompts are GPT-2 byte-level BPE encoded and outputs decoded (needs --gpt2-encoder-json and "
     "--gpt2-vocab-bpe)",
     NOLIMIT, "gpt2"},
    {"gpt2-encoder-json", MOE_OPT_STRING, NULL, "path to GPT-2's encoder.json (with --bpe gpt2)", NOLIMIT, NULL},
    {"gpt2-vocab-bpe", MOE_OPT_STRING, NULL, "path to GPT-2's vocab.bpe (with --bpe gpt2)", NOLIMIT, NULL},
    {"tokenizer", MOE_OPT_STRING, NULL, "a Hugging Face tokenizer.json holding a GPT-2 style byte-level BPE (instead "
                                        "of --bpe gpt2)",
     NOLIMIT, NULL},
    {"report-speed", MOE_OPT_FLAG, NULL,
     "print to stderr the decoding speed (tokens per second of the decoding loop, prefill reported separately)",
     NOLIMIT, NULL},
    {"no-cuda-graph", MOE_OPT_FLAG, NULL, "run every decoding step's kernels one by one (no recorded graph)", NOLIMIT,
     NULL},
};

/* What the training run said about batching and evaluation capacity is not
 * the generation's. */
static const char *const gen_reset[] = {"max-tokens", "batch-size", "max-tokens-valid", "batch-size-valid",
                                        "moe-eval-capacity-token-fraction", NULL};

/* ------------------------------------------------------------ utilities */

static moe_status nomem(void) { return moe_error_set(MOE_ERR_NOMEM, "out of host memory"); }

/* A data-library failure as the core's pending error. */
static moe_status data_fail(moe_status st)
{
    return moe_error_set(st, "%s", moe_data_error());
}

/* ------------------------------------------------------------ the run */

typedef struct row {
    int64_t id;               /* the input's index */
    char *src;                /* the input line, stripped */
    int32_t *prompt;          /* dictionary ids */
    int64_t plen, prefix;     /* the prompt's length, the part forced (<= max_len) */
    int32_t *seq;             /* bos, prefix, generated tokens, </s> */
    float *lp;                /* natural log-probability of seq[s + 1] */
    int64_t len;              /* tokens in seq */
    int64_t fed;              /* tokens of seq the model has seen */
    int done;
} row;

typedef struct gen {
    moe_session *s;
    const moe_host *h;
    const moe_arch_ops *arch;
    void *model;
    moe_dict *dict;
    moe_bpe *bpe;
    moe_bpe_state *bst;
    int64_t V, maxpos;
    int32_t pad, eos, unk, bos_tok;
    /* flags */
    int sampling, plain, report;
    FILE *out;                /* the results (stdout, or what stdout was with plain output) */
    int64_t topk, min_len, max_len_b, batch, buffer;
    double topp, temperature, max_len_a;
    uint64_t seed;
    /* decoding state */
    int64_t B, Tc, max_step;  /* decode_setup's */
    int K;                    /* top entries fetched a row */
    int full;                 /* sampling needs the whole distribution */
    float *d_stats;           /* device: lse | tgt | top values | top ids, for up to B*max_step rows */
    int32_t *d_targets;       /* device (B*max_step) */
    float *h_stats;
    int32_t *h_targets;
    int64_t eos_rows;         /* leading device targets known to be </s> */
    float *h_logits;          /* (V) one row, for full-distribution sampling */
    double *h_w;              /* (V) weights to sample from */
    int32_t *h_order;         /* (V) top-p order */
    /* speed */
    double t_prefill, t_decode, t_steady;
    int64_t n_prefill, n_decode, n_steady; /* steady: decoding steps after each batch's first two */
} gen;

/* ---------------------------------------------------------- encoding */

static moe_status encode_line(gen *g, const char *line, size_t len, int32_t **ids, int64_t *n)
{
    *ids = NULL;
    *n = 0;
    int64_t cap = 0, count = 0;
    int32_t *out = NULL;
    if (g->bpe) {
        /* GPT2BPE.encode: the ids as words, each looked up in dict.txt */
        int32_t *bp = NULL;
        int64_t nb = 0, bcap = 0;
        if (moe_bpe_encode(g->bst, line, len, &bp, &nb, &bcap) != MOE_OK) {
            free(bp);
            return data_fail(MOE_ERR_INVALID_ARG);
        }
        out = malloc((size_t)(nb > 0 ? nb : 1) * sizeof *out);
        if (!out) {
            free(bp);
            return nomem();
        }
        for (int64_t i = 0; i < nb; i++) {
            char w[16];
            int k = snprintf(w, sizeof w, "%d", (int)bp[i]);
            out[i] = (int32_t)moe_dict_index(g->dict, w, (size_t)k);
        }
        free(bp);
        *ids = out;
        *n = nb;
        return MOE_OK;
    }
    size_t pos = 0, tl;
    const char *tok;
    while (moe_text_next_token(line, len, &pos, &tok, &tl)) {
        if (count == cap) {
            cap = cap ? 2 * cap : 16;
            int32_t *q = realloc(out, (size_t)cap * sizeof *q);
            if (!q) {
                free(out);
                return nomem();
            }
            out = q;
        }
        out[count++] = (int32_t)moe_dict_index(g->dict, tok, tl);
    }
    *ids = out;
    *n = count;
    return MOE_OK;
}

/* Dictionary.string: symbols joined by spaces, bos and eos left out */
static void symbols(const gen *g, const int32_t *ids, int64_t n, moe_strbuf *b)
{
    int first = 1;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] == g->eos || ids[i] == MOE_DICT_BOS)
            continue;
        size_t sl = 0;
        const char *sym = moe_dict_symbol(g->dict, ids[i], &sl);
        if (!first)
            moe_sb_puts(b, " ");
        first = 0;
        if (sym)
            moe_sb_putn(b, sym, sl);
        else
            moe_sb_puts(b, "<unk>");
    }
}

/* GPT2BPE.decode of a symbol string: numeric symbols are GPT-2 ids, the
 * others (and ids the BPE does not know) stay text */
static moe_status detokenize(const gen *g, const char *hyp, moe_strbuf *out)
{
    if (!g->bpe) {
        moe_sb_puts(out, hyp);
        return MOE_OK;
    }
    int32_t *ids = malloc((strlen(hyp) / 2 + 2) * sizeof *ids);
    if (!ids)
        return nomem();
    int64_t n = 0;
    const char *p = hyp;
    moe_status st = MOE_OK;
    for (;;) {
        while (*p == ' ')
            p++;
        const char *end = p;
        while (*end && *end != ' ')
            end++;
        int numeric = end > p;
        for (const char *q = p; q < end; q++)
            numeric &= *q >= '0' && *q <= '9';
        long id = numeric && end - p < 10 ? strtol(p, NULL, 10) : -1;
        size_t tl = 0;
        const int known = id >= 0 && moe_bpe_token(g->bpe, (int32_t)id, &tl) != NULL;
        if ((!known || end == p) && n > 0) { /* flush the ids before a literal */
            char *text = NULL;
            size_t len = 0;
            if (moe_bpe_decode(g->bpe, ids, n, &text, &len) != MOE_OK) {
                st = data_fail(MOE_ERR_INVALID_ARG);
                break;
            }
            moe_sb_putn(out, text, len);
            free(text);
            n = 0;
        }
        if (end == p)
            break;
        if (known)
            ids[n++] = (int32_t)id;
        else
            moe_sb_putn(out, p, (size_t)(end - p));
        p = end;
    }
    free(ids);
    return st;
}

/* ---------------------------------------------------------- choosing */

/* row r's statistics of one step, as logits_stats left them for R rows */
typedef struct rstats {
    float lse, tgt;
    const float *val;
    const int32_t *idx;
} rstats;

static rstats stats_of(const gen *g, int64_t R, int64_t r)
{
    rstats x;
    x.lse = g->h_stats[r];
    x.tgt = g->h_stats[R + r];
    x.val = g->h_stats + 2 * R + r * g->K;
    x.idx = (const int32_t *)(g->h_stats + (2 + g->K) * R) + r * g->K;
    return x;
}

static int banned(const gen *g, int32_t v, int64_t step)
{
    return v == g->pad || (v == g->eos && step < g->min_len);
}

/* weighted draw: index of the first cumulative weight above u * total */
static int64_t draw(const double *w, int64_t n, double u)
{
    double total = 0.0;
    for (int64_t i = 0; i < n; i++)
        total += w[i];
    const double target = u * total;
    double acc = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < n; i++) {
        if (w[i] <= 0.0)
            continue;
        acc += w[i];
        last = i;
        if (acc > target)
            return i;
    }
    return last;
}

static const float *g_sort_p; /* qsort's key: probabilities, larger first, ties by index */
static int by_prob_desc(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    const float px = g_sort_p[x], py = g_sort_p[y];
    if (px != py)
        return px > py ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* The token after step `step` of row r and its natural log-probability:
 * forced </s> at max_len, else greedy or a draw (ids, stats, or the whole
 * row of logits in g->h_logits when g->full). */
static moe_status choose(gen *g, row *r, int64_t step, int64_t max_len, const rstats *x, int32_t *tok, float *lp)
{
    if (step >= max_len) {
        *tok = g->eos;
        *lp = x->tgt - x->lse; /* the target slot held </s> */
        return MOE_OK;
    }
    const float u = moe_philox_uniform(g->seed, SAMPLE_STREAM ^ (uint64_t)r->id, (uint64_t)step);
    if (!g->full) {
        /* greedy, or top-k: the K best ids, banned ones left out */
        int64_t want = g->sampling ? g->topk : 1, m = 0;
        int32_t cand[2048];
        double w[2048];
        for (int k = 0; k < g->K && m < want; k++) {
            const int32_t v = x->idx[k];
            if (banned(g, v, step) || isinf(x->val[k]))
                continue;
            cand[m] = v;
            w[m] = exp((double)(x->val[k] - x->lse));
            m++;
        }
        if (m == 0)
            return moe_error_set(MOE_ERR_INTERNAL, "no token is allowed at step %lld of input %lld",
                                 (long long)step, (long long)r->id);
        int64_t pick = g->sampling ? draw(w, m, (double)u) : 0;
        *tok = cand[pick];
        for (int k = 0; k < g->K; k++)
            if (x->idx[k] == *tok) {
                *lp = x->val[k] - x->lse;
                break;
            }
        return MOE_OK;
    }
    /* the whole distribution: z = logits / temperature, lprob = z - lse */
    float *z = g->h_logits;
    double *w = g->h_w;
    for (int64_t v = 0; v < g->V; v++) {
        const float zv = isnan(z[v]) ? -INFINITY : z[v] / (float)g->temperature;
        w[v] = banned(g, (int32_t)v, step) ? 0.0 : exp((double)(zv - x->lse));
    }
    int64_t pick;
    if (g->topp > 0.0) {
        /* fairseq's _sample_topp: sort by probability, keep those whose
         * running sum stays below p and the one that reaches it */
        float *pf = (float *)malloc((size_t)g->V * sizeof *pf);
        if (!pf)
            return nomem();
        for (int64_t v = 0; v < g->V; v++) {
            pf[v] = (float)w[v];
            g->h_order[v] = (int32_t)v;
        }
        g_sort_p = pf;
        qsort(g->h_order, (size_t)g->V, sizeof *g->h_order, by_prob_desc);
        int64_t keep = 0;
        float cum = 0.0f;
        for (int64_t i = 0; i < g->V; i++) {
            cum += pf[g->h_order[i]];
            if (!(cum < (float)g->topp))
                break;
            keep++;
        }
        if (keep > g->V - 1)
            keep = g->V - 1;
        double *tw = malloc((size_t)(keep + 1) * sizeof *tw);
        if (!tw) {
            free(pf);
            return nomem();
        }
        for (int64_t i = 0; i <= keep; i++)
            tw[i] = (double)pf[g->h_order[i]];
        int64_t k = draw(tw, keep + 1, (double)u);
        pick = k >= 0 ? g->h_order[k] : -1;
        free(tw);
        free(pf);
    } else {
        pick = draw(w, g->V, (double)u);
    }
    if (pick < 0)
        return moe_error_set(MOE_ERR_INTERNAL, "no token is allowed at step %lld of input %lld", (long long)step,
                             (long long)r->id);
    *tok = (int32_t)pick;
    *lp = (isnan(z[pick]) ? -INFINITY : z[pick] / (float)g->temperature) - x->lse;
    return MOE_OK;
}

/* statistics of R rows of device logits, targets from g->h_targets (not
 * copied again while they are the decoding steps' all-</s> ones) */
static moe_status fetch_stats(gen *g, const float *logits, int64_t R, int all_eos)
{
    const moe_host *h = g->h;
    float *d = g->d_stats;
    if (!all_eos || g->eos_rows < R)
        MOE_TRY(h->backend->copy_from_host(h->ctx, g->d_targets, g->h_targets, (uint64_t)R * 4u));
    g->eos_rows = all_eos ? R : 0;
    MOE_TRY(h->ops->logits_stats(h->ctx, d, d + 2 * R, (int32_t *)(d + (2 + g->K) * R), d + R, logits, g->d_targets, R,
                                 g->V, g->K, (float)g->temperature));
    return h->backend->copy_to_host(h->ctx, g->h_stats, d, (uint64_t)R * (uint64_t)(2 + 2 * g->K) * 4u);
}

/* one row of device logits into g->h_logits */
static moe_status fetch_row(gen *g, const float *logits, int64_t r)
{
    return g->h->backend->copy_to_host(g->h->ctx, g->h_logits, logits + r * g->V, (uint64_t)g->V * 4u);
}

static moe_status take(gen *g, row *r, int64_t step, int64_t max_len, const rstats *x)
{
    int32_t tok;
    float lp;
    MOE_TRY(choose(g, r, step, max_len, x, &tok, &lp));
    r->seq[r->len] = tok;
    r->lp[r->len - 1] = lp;
    r->len++;
    if (tok == g->eos)
        r->done = 1;
    return MOE_OK;
}

/* Generates for rows[0..n): prefill in pieces, then one token a step. */
static moe_status generate_batch(gen *g, row *rows, int64_t n)
{
    int64_t longest = 0;
    for (int64_t b = 0; b < n; b++)
        if (rows[b].plen > longest)
            longest = rows[b].plen;
    double ml = g->max_len_a * (double)(longest + 1) + (double)g->max_len_b;
    int64_t max_len = (int64_t)ml;
    if (max_len > g->maxpos - 1)
        max_len = g->maxpos - 1;
    if (max_len > g->Tc - 1)
        max_len = g->Tc - 1;
    if (max_len < 0)
        max_len = 0;
    for (int64_t b = 0; b < n; b++) {
        row *r = &rows[b];
        r->prefix = r->plen < max_len ? r->plen : max_len;
        r->seq = malloc((size_t)(max_len + 2) * sizeof *r->seq);
        r->lp = malloc((size_t)(max_len + 2) * sizeof *r->lp);
        if (!r->seq || !r->lp)
            return nomem();
        r->seq[0] = g->bos_tok;
        if (r->prefix > 0)
            memcpy(r->seq + 1, r->prompt, (size_t)r->prefix * sizeof *r->seq);
        r->len = 1 + r->prefix;
        r->fed = 0;
        r->done = 0;
    }
    MOE_TRY(g->arch->decode_reset(g->model));
    const int64_t B = g->B;
    int32_t *tok = calloc((size_t)(B * g->max_step), sizeof *tok), *nn = calloc((size_t)B, sizeof *nn);
    if (!tok || !nn) {
        free(tok);
        free(nn);
        return nomem();
    }
    moe_status st = MOE_OK;
    /* the prompts: bos and the prefix, every position scored */
    double t0 = moe_mono_s();
    for (;;) {
        int64_t step_n = 0;
        for (int64_t b = 0; b < B; b++) {
            nn[b] = 0;
            if (b < n && rows[b].fed < 1 + rows[b].prefix) { /* bos and the prefix */
                int64_t k = 1 + rows[b].prefix - rows[b].fed;
                nn[b] = (int32_t)(k < g->max_step ? k : g->max_step);
            }
            if (nn[b] > step_n)
                step_n = nn[b];
        }
        if (step_n == 0)
            break;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < step_n; j++) {
                const int64_t p = b < n ? rows[b].fed + j : 0;
                tok[b * step_n + j] = j < nn[b] ? rows[b].seq[p] : g->pad;
                /* position p predicts seq[p + 1]; the last one's target slot asks for </s> */
                g->h_targets[b * step_n + j] = j < nn[b] && p + 1 < rows[b].len ? rows[b].seq[p + 1] : g->eos;
            }
        const float *logits;
        MOE_TRY_GOTO(st, g->arch->decode_step(g->model, tok, nn, step_n, 1, &logits), done);
        const int64_t R = B * step_n;
        MOE_TRY_GOTO(st, fetch_stats(g, logits, R, 0), done);
        for (int64_t b = 0; b < n; b++) {
            row *r = &rows[b];
            for (int64_t j = 0; j < nn[b]; j++) {
                const int64_t p = r->fed + j;
                const rstats x = stats_of(g, R, b * step_n + j);
                if (p + 1 < r->len) { /* a prompt token: its log-probability as a forced prefix */
                    r->lp[p] = r->seq[p + 1] == g->pad ? -INFINITY : x.tgt - x.lse;
                } else {              /* the first free step */
                    if (g->full)
                        MOE_TRY_GOTO(st, fetch_row(g, logits, b * step_n + j), done);
                    MOE_TRY_GOTO(st, take(g, r, p, max_len, &x), done);
                }
            }
            r->fed += nn[b];
            g->n_prefill += nn[b];
        }
    }
    g->t_prefill += moe_mono_s() - t0;
    /* one token a row and step until every row has its </s> */
    t0 = moe_mono_s();
    double t_warm = 0.0;
    for (int64_t step = 0;; step++) {
        if (step == 2) /* the first steps load kernels and record the step's graph */
            t_warm = moe_mono_s();
        int any = 0;
        for (int64_t b = 0; b < B; b++) {
            nn[b] = b < n && !rows[b].done ? 1 : 0;
            tok[b] = nn[b] ? rows[b].seq[rows[b].len - 1] : g->pad;
            g->h_targets[b] = g->eos;
            any |= nn[b];
        }
        if (!any)
            break;
        const float *logits;
        MOE_TRY_GOTO(st, g->arch->decode_step(g->model, tok, nn, 1, 0, &logits), done);
        MOE_TRY_GOTO(st, fetch_stats(g, logits, B, 1), done);
        for (int64_t b = 0; b < n; b++) {
            row *r = &rows[b];
            if (!nn[b])
                continue;
            r->fed++;
            g->n_decode++;
            g->n_steady += step >= 2;
            const rstats x = stats_of(g, B, b);
            if (g->full)
                MOE_TRY_GOTO(st, fetch_row(g, logits, b), done);
            MOE_TRY_GOTO(st, take(g, r, r->fed - 1, max_len, &x), done);
        }
    }
    g->t_decode += moe_mono_s() - t0;
    if (t_warm > 0.0)
        g->t_steady += moe_mono_s() - t_warm;
done:
    free(tok);
    free(nn);
    return st;
}

/* ------------------------------------------------------------- output */

static moe_status print_row(gen *g, const row *r, double seconds)
{
    moe_strbuf src = {0}, hyp = {0}, det = {0}, pos = {0};
    symbols(g, r->prompt, r->plen, &src);
    symbols(g, r->seq + 1, r->len - 1, &hyp);
    moe_status st = detokenize(g, hyp.p ? hyp.p : "", &det);
    /* fairseq's scores: fp32 running sum over the hypothesis, over its length, in base 2 */
    float cum = 0.0f;
    const float ln2 = 0.6931471805599453f;
    for (int64_t i = 0; i + 1 < r->len; i++) {
        cum += r->lp[i];
        char v[32];
        snprintf(v, sizeof v, "%s%.4f", i ? " " : "", (double)(r->lp[i] / ln2));
        moe_sb_puts(&pos, v);
    }
    const int64_t hl = r->len - 1;
    const float score = hl > 0 ? cum / (float)hl / ln2 : 0.0f;
    char sc[48];
    moe_format_pyfloat(sc, sizeof sc, (double)score);
    if (st == MOE_OK && (src.failed || hyp.failed || det.failed || pos.failed))
        st = nomem();
    if (st == MOE_OK) {
        const char *d = det.p ? det.p : "";
        FILE *out = g->out;
        if (g->plain) {
            fprintf(out, "%s\n", d);
        } else {
            fprintf(out, "S-%lld\t%s\n", (long long)r->id, src.p ? src.p : "");
            fprintf(out, "W-%lld\t%.3f\tseconds\n", (long long)r->id, seconds);
            fprintf(out, "H-%lld\t%s\t%s\n", (long long)r->id, sc, hyp.p ? hyp.p : "");
            fprintf(out, "D-%lld\t%s\t%s\n", (long long)r->id, sc, d);
            fprintf(out, "P-%lld\t%s\n", (long long)r->id, pos.p ? pos.p : "");
        }
        fflush(out);
    }
    free(src.p);
    free(hyp.p);
    free(det.p);
    free(pos.p);
    return st;
}

static void free_rows(row *rows, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        free(rows[i].src);
        free(rows[i].prompt);
        free(rows[i].seq);
        free(rows[i].lp);
    }
    memset(rows, 0, (size_t)n * sizeof *rows);
}

/* ------------------------------------------------------------- setup */

static moe_status check_flags(gen *g, moe_opts *o)
{
    if (moe_opts_int(o, "beam") != 1)
        return moe_error_set(MOE_ERR_UNSUPPORTED,
                             "--beam %lld: beam search is not implemented; use --beam 1 (greedy) or --sampling",
                             (long long)moe_opts_int(o, "beam"));
    if (moe_opts_int(o, "nbest") != 1)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "--nbest %lld: one hypothesis per input is produced; use --nbest 1",
                             (long long)moe_opts_int(o, "nbest"));
    if (moe_opts_float(o, "unkpen") != 0.0)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "--unkpen is not implemented; leave it at 0");
    g->sampling = moe_opts_flag(o, "sampling");
    g->topk = moe_opts_int(o, "sampling-topk");
    g->topp = moe_opts_float(o, "sampling-topp");
    g->temperature = moe_opts_float(o, "temperature");
    if (!(g->temperature > 0.0))
        return moe_error_set(MOE_ERR_INVALID_ARG, "--temperature must be greater than 0, found %g", g->temperature);
    if (g->topp > 1.0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "--sampling-topp must be at most 1, found %g", g->topp);
    if ((g->topk > 0 || g->topp > 0.0) && !g->sampling)
        return moe_error_set(MOE_ERR_INVALID_ARG, "--sampling-topk and --sampling-topp need --sampling");
    if (g->topk > 1024)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "--sampling-topk %lld: at most 1024", (long long)g->topk);
    g->max_len_a = moe_opts_float(o, "max-len-a");
    g->max_len_b = moe_opts_int(o, "max-len-b");
    g->min_len = moe_opts_int(o, "min-len");
    g->plain = strcmp(moe_opts_str(o, "output-format"), "plain") == 0;
    g->report = moe_opts_flag(o, "report-speed");
    g->seed = (uint64_t)moe_opts_int(o, "seed");
    g->buffer = moe_opts_int(o, "buffer-size");
    if (g->buffer < 1)
        g->buffer = 1;
    g->batch = moe_opts_has_value(o, "batch-size") ? moe_opts_int(o, "batch-size") : 1;
    if (moe_opts_given(o, "batch-size") && g->batch > g->buffer)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--max-sentences/--batch-size cannot be larger than --buffer-size (%lld > %lld)",
                             (long long)g->batch, (long long)g->buffer);
    if (g->batch > g->buffer)
        g->batch = g->buffer;
    const char *bpe = moe_opts_str(o, "bpe"), *tk = moe_opts_str(o, "tokenizer");
    if (bpe && tk)
        return moe_error_set(MOE_ERR_INVALID_ARG, "give --bpe gpt2 or --tokenizer, not both");
    if (bpe && (!moe_opts_str(o, "gpt2-encoder-json") || !moe_opts_str(o, "gpt2-vocab-bpe")))
        return moe_error_set(MOE_ERR_INVALID_ARG, "--bpe gpt2 needs --gpt2-encoder-json and --gpt2-vocab-bpe");
    return MOE_OK;
}

/* generation's defaults, once the flags are final: no capacity drops unless
 * asked, one prompt per batch unless asked, no validation data */
static moe_status gen_prepare(moe_opts *o, void *arg)
{
    (void)arg;
    if (moe_opts_known(o, "moe-eval-capacity-token-fraction") && !moe_opts_given(o, "moe-eval-capacity-token-fraction"))
        MOE_TRY(moe_opts_set(o, "moe-eval-capacity-token-fraction", "1.0"));
    if (!moe_opts_has_value(o, "batch-size"))
        MOE_TRY(moe_opts_set(o, "batch-size", "1"));
    if (moe_opts_known(o, "disable-validation"))
        MOE_TRY(moe_opts_set(o, "disable-validation", "1"));
    return MOE_OK;
}

static moe_status open_generator(gen *g, moe_session *s)
{
    const moe_host *h = s->h;
    moe_opts *o = s->opts;
    g->s = s;
    g->h = h;
    g->arch = s->c.arch;
    g->model = s->c.model;
    if (!g->arch->decode_setup || !g->arch->decode_step || !g->arch->decode_reset)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "arch %s does not decode incrementally", s->arch_name);
    if (!h->ops->logits_stats)
        return moe_error_set(MOE_ERR_UNSUPPORTED,
                             "expected the backend's logits_stats op (ABI 1.3), found none; use a backend built "
                             "against ABI 1.3 or later");
    g->V = s->c.task->vocab_size(s->c.task_state);
    g->pad = (int32_t)h->padding_idx;
    g->eos = MOE_DICT_EOS;
    g->unk = MOE_DICT_UNK;
    g->bos_tok = moe_opts_known(o, "add-bos-token") && moe_opts_flag(o, "add-bos-token") ? MOE_DICT_BOS : MOE_DICT_EOS;
    /* the dictionary: DATA's (the first directory of a ':' list) */
    const char *data = moe_opts_str(o, "data");
    if (!data || !*data)
        return moe_error_set(MOE_ERR_INVALID_ARG, "the following argument is required: DATA (a directory with "
                                                  "dict.txt)");
    char path[4400];
    snprintf(path, sizeof path, "%.*s/dict.txt", (int)strcspn(data, ":"), data);
    if (moe_dict_load(path, &g->dict) != MOE_OK)
        return data_fail(MOE_ERR_IO);
    if (moe_dict_len(g->dict) != g->V)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "%s has %lld types (specials included) but the model's vocabulary has %lld; give the "
                             "DATA directory the model was trained with",
                             path, (long long)moe_dict_len(g->dict), (long long)g->V);
    if (moe_opts_str(o, "bpe")) {
        if (moe_bpe_load_gpt2(moe_opts_str(o, "gpt2-encoder-json"), moe_opts_str(o, "gpt2-vocab-bpe"), &g->bpe) !=
            MOE_OK)
            return data_fail(MOE_ERR_IO);
    } else if (moe_opts_str(o, "tokenizer")) {
        if (moe_bpe_load_tokenizer_json(moe_opts_str(o, "tokenizer"), &g->bpe) != MOE_OK)
            return data_fail(MOE_ERR_IO);
    }
    if (g->bpe && moe_bpe_state_create(g->bpe, &g->bst) != MOE_OK)
        return data_fail(MOE_ERR_NOMEM);
    /* lengths: the model's positions bound every sequence */
    g->maxpos = moe_opts_known(o, "tokens-per-sample") ? moe_opts_int(o, "tokens-per-sample") : (int64_t)1 << 20;
    int64_t tc = g->max_len_a == 0.0 ? g->max_len_b + 1 : g->maxpos;
    if (tc > g->maxpos)
        tc = g->maxpos;
    if (tc < 1)
        tc = 1;
    g->Tc = tc;
    g->B = g->batch;
    g->max_step = g->Tc < PREFILL_STEP ? g->Tc : PREFILL_STEP;
    MOE_TRY(g->arch->decode_setup(g->model, g->B, g->Tc, g->max_step,
                                  moe_opts_flag(o, "no-cuda-graph") ? MOE_DECODE_NO_GRAPH : 0u));
    /* what a step's choice reads: the top K of every row (greedy: 1 plus the
     * two banned ids), or the whole row */
    g->full = g->sampling && (g->topk <= 0 || g->topp > 0.0);
    g->K = (int)((g->sampling && g->topk > 0 ? g->topk : 1) + 2);
    if (g->K > g->V)
        g->K = (int)g->V;
    const int64_t R = g->B * g->max_step;
    MOE_TRY(h->backend->alloc(h->ctx, (uint64_t)R * (uint64_t)(2 + 2 * g->K) * 4u, "sampling statistics",
                              (void **)&g->d_stats));
    MOE_TRY(h->backend->alloc(h->ctx, (uint64_t)R * 4u, "sampling targets", (void **)&g->d_targets));
    g->h_stats = malloc((size_t)R * (size_t)(2 + 2 * g->K) * 4u);
    g->h_targets = malloc((size_t)R * 4u);
    g->h_logits = malloc((size_t)g->V * 4u);
    g->h_w = malloc((size_t)g->V * sizeof(double));
    g->h_order = malloc((size_t)g->V * sizeof(int32_t));
    if (!g->h_stats || !g->h_targets || !g->h_logits || !g->h_w || !g->h_order)
        return nomem();
    return MOE_OK;
}

static void close_generator(gen *g)
{
    if (g->h) {
        if (g->d_stats)
            g->h->backend->free(g->h->ctx, g->d_stats);
        if (g->d_targets)
            g->h->backend->free(g->h->ctx, g->d_targets);
    }
    free(g->h_stats);
    free(g->h_targets);
    free(g->h_logits);
    free(g->h_w);
    free(g->h_order);
    moe_bpe_state_destroy(g->bst);
    moe_bpe_destroy(g->bpe);
    moe_dict_destroy(g->dict);
}

/* ------------------------------------------------------------- main loop */

/* Reads up to g->buffer inputs (one from --prompt), generates for them in
 * batches of g->batch, prints them in order; *more = 0 at the end of input. */
static moe_status run_buffer(gen *g, FILE *in, const char *prompt, int64_t *next_id, int *more)
{
    row *rows = calloc((size_t)g->buffer, sizeof *rows);
    if (!rows)
        return nomem();
    int64_t n = 0;
    moe_status st = MOE_OK;
    char *line = NULL;
    size_t cap = 0;
    *more = 0;
    while (n < g->buffer) {
        const char *text;
        size_t len;
        if (prompt) {
            if (*next_id > 0)
                break;
            text = prompt;
            len = strlen(prompt);
        } else {
            ssize_t got = getline(&line, &cap, in);
            if (got < 0)
                break;
            text = line;
            len = (size_t)got;
        }
        const char *t;
        size_t tl;
        moe_text_strip(text, len, &t, &tl);
        row *r = &rows[n];
        r->id = *next_id + n;
        r->src = strndup(t, tl);
        if (!r->src) {
            st = nomem();
            break;
        }
        st = encode_line(g, r->src, tl, &r->prompt, &r->plen);
        if (st != MOE_OK)
            break;
        n++;
        if (prompt)
            break;
    }
    free(line);
    if (st == MOE_OK && n == g->buffer && !prompt)
        *more = 1;
    for (int64_t b0 = 0; b0 < n && st == MOE_OK; b0 += g->batch) {
        const int64_t nb = n - b0 < g->batch ? n - b0 : g->batch;
        double t0 = moe_mono_s();
        st = generate_batch(g, rows + b0, nb);
        double per = (moe_mono_s() - t0) / (double)nb;
        for (int64_t i = 0; i < nb && st == MOE_OK; i++)
            st = print_row(g, &rows[b0 + i], per);
    }
    *next_id += n;
    free_rows(rows, n);
    free(rows);
    return st;
}

/* --output-format plain, before the options are parsed (the log goes
 * elsewhere from the start) */
static int wants_plain(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--output-format=plain") == 0)
            return 1;
        if (strcmp(argv[i], "--output-format") == 0 && i + 1 < argc && strcmp(argv[i + 1], "plain") == 0)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static const char *const positional[] = {"data"};
    /* plain output: the results keep the real stdout, everything written to
     * stdout (the core logs there, as fairseq) goes to stderr */
    FILE *results = stdout;
    if (wants_plain(argc, argv)) {
        fflush(stdout);
        int fd = dup(STDOUT_FILENO);
        if (fd >= 0 && (results = fdopen(fd, "w")) != NULL && dup2(STDERR_FILENO, STDOUT_FILENO) >= 0) {
            /* done */
        } else {
            results = stdout;
        }
    }
    moe_session_config cfg = {0};
    cfg.prog = PROG;
    cfg.usage = "DATA [--path CKPT] [--prompt TEXT | --input FILE] [--batch-size N] [--sampling [--sampling-topk K] "
                "[--sampling-topp P]] [--temperature T] [--max-len-b N] [--bpe gpt2 ... | --tokenizer F] "
                "[--output-format fairseq|plain] [--cpu] [options]";
    cfg.about = "Continues prompts with a trained language model (fairseq-interactive for --task language_modeling): "
                "greedy decoding (--beam 1) or sampling, through a key/value cache. Prompts are --prompt, or the "
                "lines of --input (stdin by default). DATA holds dict.txt. Without --path the model is randomly "
                "initialised from the flags given (--arch, sizes, --task ...), for benchmarks. Output per input: "
                "S- (prompt), W- (seconds), H- (hypothesis symbols), D- (detokenized), P- (each token's "
                "log2-probability, prompt included); H-/D- show the score, their mean, in base 2.";
    cfg.options = gen_options;
    cfg.n_options = (int)(sizeof gen_options / sizeof gen_options[0]);
    cfg.positional = positional;
    cfg.n_positional = 1;
    cfg.need_checkpoint = 0;
    cfg.need_task = 1;
    cfg.reset = gen_reset;
    cfg.prepare = gen_prepare;
    moe_session *s = NULL;
    int rc = moe_session_start(&cfg, argc, argv, &s);
    if (rc >= 0)
        return rc;
    const double t_start = moe_mono_s();
    gen g;
    memset(&g, 0, sizeof g);
    g.out = results;
    moe_status st = check_flags(&g, s->opts); /* a refusal here is the command line's: exit 2 */
    int usage = st != MOE_OK;
    if (st == MOE_OK)
        st = open_generator(&g, s);
    if (st != MOE_OK) {
        rc = moe_error_report(PROG, st, usage);
        close_generator(&g);
        moe_session_close(s);
        return rc;
    }
    if (s->ckpt_path[0])
        moe_log(MOE_LOG_INFO, LOGGER, "loading model(s) from %s", s->ckpt_path);
    if (g.buffer > 1)
        moe_log(MOE_LOG_INFO, LOGGER, "Sentence buffer size: %lld", (long long)g.buffer);
    moe_log(MOE_LOG_INFO, LOGGER, "NOTE: hypothesis and token scores are output in base 2");
    moe_log(MOE_LOG_INFO, LOGGER, "Type the input sentence and press return:");
    const char *prompt = moe_opts_str(s->opts, "prompt");
    const char *input = moe_opts_str(s->opts, "input");
    FILE *in = NULL;
    if (!prompt) {
        in = input && strcmp(input, "-") != 0 ? fopen(input, "r") : stdin;
        if (!in)
            st = moe_error_set(MOE_ERR_IO, "cannot open --input %s", input);
    }
    int64_t next_id = 0;
    int more = 1;
    while (st == MOE_OK && more)
        st = run_buffer(&g, in, prompt, &next_id, &more);
    if (in && in != stdin)
        fclose(in);
    if (st == MOE_OK) {
        moe_log(MOE_LOG_INFO, LOGGER, "Total time: %.3f seconds; translation time: %.3f", moe_mono_s() - t_start,
                g.t_prefill + g.t_decode);
        if (g.report)
            fprintf(stderr,
                    PROG ": decoded %lld tokens in %.3f s: %.1f tokens/s (one token a row and step, batch size "
                         "%lld; %.1f tokens/s after each batch's first two steps); prefill %lld tokens in %.3f s: "
                         "%.1f tokens/s\n",
                    (long long)g.n_decode, g.t_decode, g.t_decode > 0 ? (double)g.n_decode / g.t_decode : 0.0,
                    (long long)g.B, g.t_steady > 0 ? (double)g.n_steady / g.t_steady : 0.0, (long long)g.n_prefill,
                    g.t_prefill, g.t_prefill > 0 ? (double)g.n_prefill / g.t_prefill : 0.0);
    }
    rc = st == MOE_OK ? 0 : moe_error_report(PROG, st, 0);
    close_generator(&g);
    moe_session_close(s);
    if (results != stdout)
        fclose(results);
    return rc;
}
