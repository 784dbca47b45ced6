/* scaler.h: fairseq's DynamicLossScaler (FAIRSEQ_SPEC.md §5.3) as a plain struct.
 *
 * The trainer multiplies the loss by `scale` before backward, asks
 * moe_scaler_check_overflow with the unscaled grad norm, and calls
 * moe_scaler_update after each successful optimizer step. Iterations count
 * both successful and overflowed steps, as fairseq's _iter does.
 *
 * Not here: the gradient norm itself, skipping the step, logging. The scaler
 * only decides the scale and writes the text fairseq puts in its exceptions;
 * the trainer logs it ("NOTE: " + note) or ends the run.
 */
#ifndef MOE_CORE_SCALER_H
#define MOE_CORE_SCALER_H

#include <stddef.h>
#include <stdint.h>

#include "moe/status.h"

typedef struct moe_scaler {
    double scale;               /* current loss scale */
    double scale_factor;        /* 2, fairseq's fixed growth/shrink factor */
    int64_t scale_window;       /* clean iterations between growths */
    double tolerance;           /* --fp16-scale-tolerance */
    double threshold;           /* --threshold-loss-scale; <= 0 means None */
    double min_scale;           /* --min-loss-scale */
    int64_t iter;               /* steps seen, overflowed ones included */
    int64_t last_overflow_iter; /* -1: none yet */
    int64_t last_rescale_iter;  /* -1: none yet */
    int64_t overflows_since_rescale;
} moe_scaler;

/* threshold <= 0: no lower clamp (fairseq's None). */
void moe_scaler_init(moe_scaler *s, double init_scale, int64_t window, double tolerance, double threshold,
                     double min_scale);

/* fairseq's default --fp16-scale-window: int(2^14 / world / update_freq). */
int moe_scaler_default_window(int world, int update_freq);

/* grad_norm finite: MOE_OK, nothing changes. Otherwise the overflow is
 * counted and the scale shrinks (when the overflow rate reaches the
 * tolerance); then
 *   - MOE_ERR_OVERFLOW: `note` holds "gradient overflow detected, ignoring
 *     gradient, setting loss scale to: 64.0" (Python's float repr), the step is
 *     to be skipped;
 *   - MOE_ERR_MIN_SCALE: the new scale would be <= min_scale; the previous
 *     scale is restored, the error message is set and also written to `note`.
 * note may be NULL. */
moe_status moe_scaler_check_overflow(moe_scaler *s, double grad_norm, char *note, size_t note_size);

/* After a successful step: grow by scale_factor when `scale_window`
 * iterations have passed since the last overflow, then count the iteration. */
void moe_scaler_update(moe_scaler *s);


#endif
