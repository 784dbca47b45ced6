/* scaler.c: fairseq's DynamicLossScaler (see scaler.h; FAIRSEQ_SPEC.md §5.3).
 *
 * The arithmetic follows fairseq/optim/dynamic_loss_scaler.py line by line,
 * in doubles as Python floats are, so the sequence of scales (and the text of
 * the NOTE line) is the same for the same sequence of overflows.
 */
#include "core/scaler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

void moe_scaler_init(moe_scaler *s, double init_scale, int64_t window, double tolerance, double threshold,
                     double min_scale)
{
    memset(s, 0, sizeof *s);
    s->scale = init_scale;
    s->scale_factor = 2.0;
    s->scale_window = window > 0 ? window : 1;
    s->tolerance = tolerance;
    s->threshold = threshold;
    s->min_scale = min_scale;
    s->iter = 0;
    s->last_overflow_iter = -1;
    s->last_rescale_iter = -1;
    s->overflows_since_rescale = 0;
}

int moe_scaler_default_window(int world, int update_freq)
{
    if (world < 1)
        world = 1;
    if (update_freq < 1)
        update_freq = 1;
    /* Python: int(2**14 / world / update_freq), true division left to right */
    int w = (int)(16384.0 / (double)world / (double)update_freq);
    return w > 0 ? w : 1;
}

void moe_scaler_update(moe_scaler *s)
{
    if ((s->iter - s->last_overflow_iter) % s->scale_window == 0) {
        s->scale *= s->scale_factor;
        s->last_rescale_iter = s->iter;
    }
    s->iter++;
}

moe_status moe_scaler_check_overflow(moe_scaler *s, double grad_norm, char *note, size_t note_size)
{
    if (isfinite(grad_norm))
        return MOE_OK;
    double prev_scale = s->scale;
    int64_t iter_since_rescale = s->iter - s->last_rescale_iter;
    s->last_overflow_iter = s->iter;
    s->overflows_since_rescale++;
    double pct_overflow = (double)s->overflows_since_rescale / (double)iter_since_rescale;
    if (pct_overflow >= s->tolerance) {
        s->scale /= s->scale_factor;
        if (s->threshold > 0.0 && s->scale < s->threshold)
            s->scale = s->threshold;
        s->last_rescale_iter = s->iter;
        s->overflows_since_rescale = 0;
    }
    char num[40];
    if (s->scale <= s->min_scale) {
        s->scale = prev_scale;
        moe_format_pyfloat(num, sizeof num, s->min_scale);
        char msg[256];
        snprintf(msg, sizeof msg,
                 "Minimum loss scale reached (%s). Your loss is probably exploding. Try lowering the learning "
                 "rate, using gradient clipping or increasing the batch size.",
                 num);
        if (note && note_size)
            snprintf(note, note_size, "%s", msg);
        return moe_error_set(MOE_ERR_MIN_SCALE, "%s", msg);
    }
    s->iter++;
    moe_format_pyfloat(num, sizeof num, s->scale);
    if (note && note_size)
        snprintf(note, note_size, "gradient overflow detected, ignoring gradient, setting loss scale to: %s", num);
    return MOE_ERR_OVERFLOW;
}

void moe_format_pyfloat(char *buf, size_t size, double v)
{
    if (size == 0)
        return;
    if (isnan(v)) {
        snprintf(buf, size, "nan");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, size, "%sinf", v < 0 ? "-" : "");
        return;
    }
    /* shortest %e form that reads back as the same double */
    char e[40];
    for (int prec = 0; prec < 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec, v);
        if (strtod(e, NULL) == v)
            break;
    }
    /* split "-d.ddde+XX" into sign, digits and decimal exponent */
    const char *p = e;
    int neg = *p == '-';
    if (neg)
        p++;
    char digits[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < (int)sizeof digits - 1)
            digits[nd++] = *p;
    digits[nd] = '\0';
    int exp10 = *p == 'e' ? atoi(p + 1) : 0;
    while (nd > 1 && digits[nd - 1] == '0') /* %e pads nothing, but be safe */
        digits[--nd] = '\0';

    char out[64];
    size_t o = 0;
    if (neg)
        out[o++] = '-';
    if (v == 0.0) {
        snprintf(out + o, sizeof out - o, "0.0");
    } else if (exp10 < -4 || exp10 >= 16) {
        /* Python: d[.ddd]e[+-]XX with at least two exponent digits */
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        snprintf(out + o, sizeof out - o, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (exp10 < 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -exp10 - 1; i++)
            out[o++] = '0';
        for (int i = 0; i < nd; i++)
            out[o++] = digits[i];
        out[o] = '\0';
    } else {
        for (int i = 0; i <= exp10; i++)
            out[o++] = i < nd ? digits[i] : '0';
        out[o++] = '.';
        if (nd > exp10 + 1)
            for (int i = exp10 + 1; i < nd; i++)
                out[o++] = digits[i];
        else
            out[o++] = '0';
        out[o] = '\0';
    }
    snprintf(buf, size, "%s", out);
}
