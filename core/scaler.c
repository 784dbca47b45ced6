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
#include "core/log.h"

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
