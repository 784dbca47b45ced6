/* matmul.c: the cpu matmul (C = alpha*op(A)op(B) + beta*C, batched, with the
 * bias and bias+activation epilogues of ops.h) and bias_backward.
 *
 * A blocked i-k-j loop, not a BLAS: blocks of op(A) and op(B) are converted
 * (transposed and widened from fp16/bf16 as needed) into fp32 scratch panels,
 * and each output row block is accumulated in an fp32 tile whose inner loop
 * runs over a fixed-width row, so the compiler vectorises it at -O2. Whatever
 * the tiling, each output element is the fp32 sum over p = 0..k-1 in
 * increasing order (vectorisation runs across columns, never across p),
 * rounded once on store.
 *
 * Conventions a reader would trip over:
 *  - beta == 0 does not read C (BLAS convention): C may be uninitialised.
 *  - BIAS_ACT requires beta == 0: pre = alpha*op(A)op(B) + bias, C = act(pre)
 *    (GELU tanh or erf, or relu, d->act) and aux (when given) = pre rounded to
 *    c_dtype. aux uses C's ldc/stride_c.
 *  - Strides and leading dimensions are in elements; stride 0 broadcasts.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

#define CPU_ERROR(c, st, ...)                                                                 \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

/* Tile sizes: the fp32 accumulator tile (MM_MB x MM_NB), the B panel
 * (MM_KB x MM_NB) and the A panel (MM_MB x MM_KB) together fit a typical L2. */
enum { MM_MB = 64, MM_NB = 256, MM_KB = 128 };

static int is_float_dtype(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

static const void *offset(const void *p, moe_dtype dt, int64_t elems)
{
    return (const unsigned char *)p + elems * (int64_t)moe_dtype_size(dt);
}

/* Ap[i][p] = op(A)(i0 + i, p0 + p) for i < mb, p < kb (row stride MM_KB). */
static void pack_a(float *ap, const void *a, moe_dtype dt, int trans, int64_t lda, int64_t i0, int64_t mb,
                   int64_t p0, int64_t kb)
{
    if (!trans) {
        for (int64_t i = 0; i < mb; i++)
            for (int64_t p = 0; p < kb; p++)
                ap[i * MM_KB + p] = moe_cpu_load(a, dt, (i0 + i) * lda + p0 + p);
    } else {
        for (int64_t p = 0; p < kb; p++)
            for (int64_t i = 0; i < mb; i++)
                ap[i * MM_KB + p] = moe_cpu_load(a, dt, (p0 + p) * lda + i0 + i);
    }
}

/* Bp[p][j] = op(B)(p0 + p, j0 + j) for p < kb, j < nb, and 0 for nb <= j < MM_NB,
 * so the kernel always runs full-width rows. */
static void pack_b(float *bp, const void *b, moe_dtype dt, int trans, int64_t ldb, int64_t p0, int64_t kb,
                   int64_t j0, int64_t nb)
{
    if (!trans) {
        for (int64_t p = 0; p < kb; p++)
            for (int64_t j = 0; j < nb; j++)
                bp[p * MM_NB + j] = moe_cpu_load(b, dt, (p0 + p) * ldb + j0 + j);
    } else {
        for (int64_t j = 0; j < nb; j++)
            for (int64_t p = 0; p < kb; p++)
                bp[p * MM_NB + j] = moe_cpu_load(b, dt, (j0 + j) * ldb + p0 + p);
    }
    if (nb < MM_NB)
        for (int64_t p = 0; p < kb; p++)
            memset(bp + p * MM_NB + nb, 0, (size_t)(MM_NB - nb) * sizeof(float));
}

/* acc[i][:] += sum_p Ap[i][p] * Bp[p][:]  (i < mb, p < kb) */
static void tile_kernel(float *restrict acc, const float *restrict ap, const float *restrict bp, int64_t mb,
                        int64_t kb)
{
    for (int64_t i = 0; i < mb; i++) {
        float *restrict ci = acc + i * MM_NB;
        const float *restrict ai = ap + i * MM_KB;
        for (int64_t p = 0; p < kb; p++) {
            const float aip = ai[p];
            const float *restrict bpp = bp + p * MM_NB;
            for (int j = 0; j < MM_NB; j++)
                ci[j] += aip * bpp[j];
        }
    }
}

static moe_status check_desc(moe_ctx *c, const moe_matmul_desc *d)
{
    if (d->batch < 1 || d->m < 0 || d->n < 0 || d->k < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: expected batch >= 1 and m, n, k >= 0, found batch %lld, m %lld, n %lld, k %lld",
                         (long long)d->batch, (long long)d->m, (long long)d->n, (long long)d->k);
    if (!is_float_dtype(d->ab_dtype) || !is_float_dtype(d->c_dtype))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: expected ab_dtype and c_dtype among f32/f16/bf16, found %d and %d",
                         (int)d->ab_dtype, (int)d->c_dtype);
    const int64_t a_cols = d->trans_a ? d->m : d->k, b_cols = d->trans_b ? d->k : d->n;
    if (d->lda < a_cols || d->lda < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: expected lda >= %lld (columns of A as stored, trans_a %d), found %lld",
                         (long long)a_cols, d->trans_a, (long long)d->lda);
    if (d->ldb < b_cols || d->ldb < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: expected ldb >= %lld (columns of B as stored, trans_b %d), found %lld",
                         (long long)b_cols, d->trans_b, (long long)d->ldb);
    if (d->ldc < d->n || d->ldc < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu matmul: expected ldc >= n = %lld, found %lld",
                         (long long)d->n, (long long)d->ldc);
    if (d->epilogue != MOE_EPI_NONE && d->epilogue != MOE_EPI_BIAS && d->epilogue != MOE_EPI_BIAS_ACT)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu matmul: unknown epilogue %d; expected NONE, BIAS or BIAS_ACT",
                         (int)d->epilogue);
    if (d->epilogue != MOE_EPI_NONE && d->bias == NULL)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: epilogue %s needs a bias, found NULL; pass the bias or use MOE_EPI_NONE",
                         d->epilogue == MOE_EPI_BIAS ? "BIAS" : "BIAS_ACT");
    if (d->epilogue == MOE_EPI_BIAS_ACT && d->beta != 0.0f)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: BIAS_ACT expects beta == 0 (C is overwritten with act(pre)), found beta %g",
                         (double)d->beta);
    if (d->epilogue == MOE_EPI_BIAS_ACT && d->act != MOE_ACT_GELU_TANH && d->act != MOE_ACT_GELU_ERF &&
        d->act != MOE_ACT_RELU)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu matmul: unknown activation kind %d; expected GELU_TANH, GELU_ERF or RELU", (int)d->act);
    if (d->m > 0 && d->n > 0 && (d->c == NULL || (d->k > 0 && (d->a == NULL || d->b == NULL))))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu matmul: expected non-NULL a, b and c for a %lldx%lldx%lld product",
                         (long long)d->m, (long long)d->n, (long long)d->k);
    return MOE_OK;
}

/* Writes rows [i0, i0+mb) x columns [j0, j0+nb) of one problem from the tile. */
static void epilogue(const moe_matmul_desc *d, const float *acc, void *cb, void *auxb, const void *biasb, int64_t i0,
                     int64_t mb, int64_t j0, int64_t nb)
{
    const moe_dtype dt = d->c_dtype;
    for (int64_t i = 0; i < mb; i++) {
        const float *row = acc + i * MM_NB;
        const int64_t base = (i0 + i) * d->ldc + j0;
        for (int64_t j = 0; j < nb; j++) {
            float v = d->alpha * row[j];
            if (d->beta != 0.0f)
                v += d->beta * moe_cpu_load(cb, dt, base + j);
            if (d->epilogue != MOE_EPI_NONE)
                v += moe_cpu_load(biasb, dt, j0 + j);
            if (d->epilogue == MOE_EPI_BIAS_ACT) {
                if (auxb != NULL)
                    moe_cpu_store(auxb, dt, base + j, v);
                v = moe_cpu_act(v, d->act);
            }
            moe_cpu_store(cb, dt, base + j, v);
        }
    }
}

moe_status moe_cpu_matmul(moe_ctx *c, const moe_matmul_desc *d)
{
    MOE_TRY(check_desc(c, d));
    if (d->m == 0 || d->n == 0)
        return MOE_OK;

    const size_t floats = (size_t)MM_MB * MM_NB + (size_t)MM_MB * MM_KB + (size_t)MM_KB * MM_NB;
    float *scratch = malloc(floats * sizeof(float));
    if (scratch == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu matmul: out of host memory for %zu bytes of scratch",
                         floats * sizeof(float));
    float *acc = scratch, *ap = acc + MM_MB * MM_NB, *bp = ap + MM_MB * MM_KB;

    for (int64_t bt = 0; bt < d->batch; bt++) {
        const void *a = d->k > 0 ? offset(d->a, d->ab_dtype, bt * d->stride_a) : NULL;
        const void *b = d->k > 0 ? offset(d->b, d->ab_dtype, bt * d->stride_b) : NULL;
        void *cb = (void *)offset(d->c, d->c_dtype, bt * d->stride_c);
        void *auxb = d->aux != NULL ? (void *)offset(d->aux, d->c_dtype, bt * d->stride_c) : NULL;
        const void *biasb = d->bias != NULL ? offset(d->bias, d->c_dtype, bt * d->stride_bias) : NULL;
        for (int64_t i0 = 0; i0 < d->m; i0 += MM_MB) {
            const int64_t mb = d->m - i0 < MM_MB ? d->m - i0 : MM_MB;
            for (int64_t j0 = 0; j0 < d->n; j0 += MM_NB) {
                const int64_t nb = d->n - j0 < MM_NB ? d->n - j0 : MM_NB;
                memset(acc, 0, (size_t)MM_MB * MM_NB * sizeof(float));
                for (int64_t p0 = 0; p0 < d->k; p0 += MM_KB) {
                    const int64_t kb = d->k - p0 < MM_KB ? d->k - p0 : MM_KB;
                    pack_a(ap, a, d->ab_dtype, d->trans_a, d->lda, i0, mb, p0, kb);
                    pack_b(bp, b, d->ab_dtype, d->trans_b, d->ldb, p0, kb, j0, nb);
                    tile_kernel(acc, ap, bp, mb, kb);
                }
                epilogue(d, acc, cb, auxb, biasb, i0, mb, j0, nb);
            }
        }
    }
    free(scratch);
    return MOE_OK;
}

/* dbias(C) += alpha * the column sums of the first N rows of dy (row stride
 * ld), summed in double and rounded once */
static moe_status add_column_sums(moe_ctx *c, const char *op, void *dbias, const void *dy, int64_t N, int64_t C,
                                  int64_t ld, float alpha, moe_dtype dt)
{
    if (C == 0)
        return MOE_OK;
    double *sum = calloc((size_t)C, sizeof(double));
    if (sum == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu %s: out of host memory for %lld column sums", op, (long long)C);
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = 0; j < C; j++)
            sum[j] += (double)moe_cpu_load(dy, dt, r * ld + j);
    for (int64_t j = 0; j < C; j++)
        moe_cpu_store(dbias, dt, j, (float)((double)moe_cpu_load(dbias, dt, j) + (double)alpha * sum[j]));
    free(sum);
    return MOE_OK;
}

moe_status moe_cpu_bias_backward(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt)
{
    if (!is_float_dtype(dt) || N < 0 || C < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu bias_backward: expected a f32/f16/bf16 dtype and N, C >= 0, found dtype %d, N %lld, C %lld",
                         (int)dt, (long long)N, (long long)C);
    return add_column_sums(c, "bias_backward", dbias, dy, N, C, C, 1.0f, dt);
}

/* grouped_matmul (ops.h): each group is one moe_cpu_matmul with its variable
 * dimension cut to rows[g] (the cpu's device memory is the host's), then
 * its bias gradient as bias_backward computes it (column sums in double) */
moe_status moe_cpu_grouped_matmul(moe_ctx *c, const moe_grouped_matmul_args *g)
{
    if (g->groups < 0 || (g->groups > 0 && (g->rows == NULL || g->a == NULL || g->b == NULL || g->c == NULL)))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu grouped_matmul: expected groups >= 0 and rows, a, b, c arrays, found groups %lld",
                         (long long)g->groups);
    if (g->dbias != NULL && !g->trans_a)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu grouped_matmul: dbias needs trans_a (the rows summed are the variable k)");
    if (g->epilogue == MOE_EPI_DACT && (g->trans_a || g->beta != 0.0f || g->aux == NULL))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu grouped_matmul: the DACT epilogue expects trans_a 0, beta 0 and the pre-activations "
                         "(aux)");
    for (int64_t i = 0; i < g->groups; i++) {
        const int64_t r = g->rows[i] < 0 ? 0 : g->rows[i];
        moe_matmul_desc d;
        memset(&d, 0, sizeof d);
        d.trans_a = g->trans_a;
        d.trans_b = g->trans_b;
        d.m = g->trans_a ? g->m : (r < g->m ? r : g->m);
        d.n = g->n;
        d.k = g->trans_a ? (r < g->k ? r : g->k) : g->k;
        d.alpha = g->alpha;
        d.beta = g->beta;
        d.a = g->a[i];
        d.lda = g->lda;
        d.b = g->b[i];
        d.ldb = g->ldb;
        d.c = g->c[i];
        d.ldc = g->ldc;
        d.ab_dtype = d.c_dtype = g->dtype;
        d.batch = 1;
        const int dact = g->epilogue == MOE_EPI_DACT;
        d.epilogue = dact ? MOE_EPI_NONE : g->epilogue;
        d.bias = g->bias != NULL ? g->bias[i] : NULL;
        d.aux = g->aux != NULL && !dact ? g->aux[i] : NULL;
        d.act = g->act;
        MOE_TRY(moe_cpu_matmul(c, &d));
        /* DACT: the product rounded, then act_backward as its own op */
        for (int64_t row = 0; dact && row < d.m; row++) {
            void *cr = (char *)g->c[i] + (size_t)(row * g->ldc) * moe_dtype_size(g->dtype);
            const void *pre = (const char *)g->aux[i] + (size_t)(row * g->ldc) * moe_dtype_size(g->dtype);
            MOE_TRY(moe_cpu_act_backward(c, cr, pre, cr, g->n, g->dtype, g->act));
        }
        if (g->dbias != NULL)
            MOE_TRY(add_column_sums(c, "grouped_matmul", g->dbias[i], d.a, d.k, g->m, g->lda, g->alpha, g->dtype));
    }
    return MOE_OK;
}
