/* testutil.h: small helpers shared by the cmocka tests: a fixed-seed random
 * generator with fills that never produce zeros, normwise relative-error
 * comparison, a central-difference gradient driver, and a fake moe_host that
 * records the last error message.
 *
 * Header-only (everything static inline) so a test adds nothing to its
 * SOURCES. It does not include cmocka: helpers return values (and print the
 * worst element on a mismatch), tests assert on them.
 *
 * Set MOE_TEST_VERBOSE=1 to print every comparison's error and tolerance.
 *
 * Conventions: "relative error" is normwise, max_i |got_i - ref_i| divided by
 * max_i |ref_i|, so a single tiny reference entry cannot blow it up and a
 * wrong factor anywhere still shows; tolerances are the caller's, stated next
 * to each check.
 */
#ifndef MOE_TESTS_TESTUTIL_H
#define MOE_TESTS_TESTUTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"

/* ------------------------------------------------------------ random */

typedef struct moe_test_rng {
    uint64_t state;
} moe_test_rng;

static inline moe_test_rng moe_test_rng_make(uint64_t seed)
{
    moe_test_rng r = {seed};
    return r;
}

/* splitmix64: fixed sequence per seed on every platform */
static inline uint64_t moe_test_rng_next(moe_test_rng *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 random bits */
static inline double moe_test_rng_uniform(moe_test_rng *r)
{
    return (double)(moe_test_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* uniform integer in [lo, hi) */
static inline int64_t moe_test_rng_int(moe_test_rng *r, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(moe_test_rng_uniform(r) * (double)(hi - lo));
}

/* x[i] uniform in [lo, hi), redrawn when it would be exactly zero */
static inline void moe_test_fill_uniform(moe_test_rng *r, float *x, int64_t n, float lo, float hi)
{
    for (int64_t i = 0; i < n; i++) {
        float v;
        do
            v = lo + (float)((double)(hi - lo) * moe_test_rng_uniform(r));
        while (v == 0.0f);
        x[i] = v;
    }
}

/* |x[i]| uniform in [min_abs, max_abs] with a random sign: bounded away from
 * zero, for inputs where a zero would hide a missing term */
static inline void moe_test_fill_signed(moe_test_rng *r, float *x, int64_t n, float min_abs, float max_abs)
{
    for (int64_t i = 0; i < n; i++) {
        float m = min_abs + (float)((double)(max_abs - min_abs) * moe_test_rng_uniform(r));
        x[i] = (moe_test_rng_next(r) & 1u) ? m : -m;
    }
}

/* -------------------------------------------------------- comparison */

/* normwise relative error of got against a double reference */
static inline double moe_test_rel_err(const float *got, const double *ref, int64_t n, int64_t *worst)
{
    double num = 0.0, den = 0.0;
    int64_t w = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (!(d <= num)) { /* also catches NaN */
            num = isnan(d) ? INFINITY : d;
            w = i;
        }
        if (fabs(ref[i]) > den)
            den = fabs(ref[i]);
    }
    if (worst != NULL)
        *worst = w;
    return den > 0.0 ? num / den : num;
}

static inline void moe_test_verbose_report(const char *what, double e, double tol)
{
    const char *v = getenv("MOE_TEST_VERBOSE");
    if (v != NULL && v[0] != '\0' && v[0] != '0')
        fprintf(stderr, "%s: relative error %.3g (tolerance %.3g)\n", what, e, tol);
}

/* 1 if rel_err(got, ref) <= tol; otherwise prints what, the error and the worst element */
static inline int moe_test_close(const char *what, const float *got, const double *ref, int64_t n, double tol)
{
    int64_t w = 0;
    double e = moe_test_rel_err(got, ref, n, &w);
    moe_test_verbose_report(what, e, tol);
    if (e <= tol)
        return 1;
    fprintf(stderr, "%s: relative error %.3g > %.3g; worst at [%lld]: got %.9g, expected %.9g\n", what, e, tol,
            (long long)w, n > 0 ? (double)got[w] : 0.0, n > 0 ? ref[w] : 0.0);
    return 0;
}

/* the same with a float reference */
static inline int moe_test_close_f(const char *what, const float *got, const float *ref, int64_t n, double tol)
{
    int64_t w = 0;
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (!(d <= num)) {
            num = isnan(d) ? INFINITY : d;
            w = i;
        }
        if (fabs((double)ref[i]) > den)
            den = fabs((double)ref[i]);
    }
    double e = den > 0.0 ? num / den : num;
    moe_test_verbose_report(what, e, tol);
    if (e <= tol)
        return 1;
    fprintf(stderr, "%s: relative error %.3g > %.3g; worst at [%lld]: got %.9g, expected %.9g\n", what, e, tol,
            (long long)w, n > 0 ? (double)got[w] : 0.0, n > 0 ? (double)ref[w] : 0.0);
    return 0;
}

/* ------------------------------------------------- finite differences */

/* A scalar loss of the current inputs (the test owns what ctx points at). */
typedef double (*moe_test_loss_fn)(void *ctx);

/* grad[i] = (loss(x + h e_i) - loss(x - h e_i)) / (x_i^+ - x_i^-), central
 * differences over all n entries of the fp32 array x, which the loss reads.
 * The divisor is the perturbation as actually stored in fp32. x is restored. */
static inline void moe_test_fd_grad(moe_test_loss_fn loss, void *ctx, float *x, int64_t n, float h, double *grad)
{
    for (int64_t i = 0; i < n; i++) {
        const float x0 = x[i], xp = x0 + h, xm = x0 - h;
        x[i] = xp;
        const double lp = loss(ctx);
        x[i] = xm;
        const double lm = loss(ctx);
        x[i] = x0;
        grad[i] = (lp - lm) / ((double)xp - (double)xm);
    }
}

/* ----------------------------------------------------------- fake host */

/* The last message passed to host->error in this test program. */
static inline char *moe_test_error_buffer(void)
{
    static char buf[1024];
    return buf;
}

static inline const char *moe_test_last_error(void) { return moe_test_error_buffer(); }

static inline void moe_test_clear_error(void) { moe_test_error_buffer()[0] = '\0'; }

static inline moe_status moe_test_host_error(const moe_host *h, moe_status st, const char *fmt, ...)
{
    (void)h;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(moe_test_error_buffer(), 1024, fmt, ap);
    va_end(ap);
    return st;
}

/* warnings and errors go to stderr; info and debug are dropped */
static inline void moe_test_host_log(const moe_host *h, moe_log_level level, const char *component, const char *fmt,
                                     ...)
{
    (void)h;
    if (level < MOE_LOG_WARNING)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", component);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* A host with logging and errors only (everything else NULL/0, fp32 dtypes):
 * enough for backend ops and for plugins that do not touch parameters. */
static inline void moe_test_host_init(moe_host *h)
{
    memset(h, 0, sizeof *h);
    h->size = (uint32_t)sizeof *h;
    h->log = moe_test_host_log;
    h->error = moe_test_host_error;
    h->act_dtype = MOE_F32;
    h->grad_dtype = MOE_F32;
    h->world = 1;
}

#endif
