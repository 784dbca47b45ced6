/* meters.h: fairseq's metric aggregation (fairseq/logging/meters.py) for the
 * train_inner, train and valid lines: average, speed, stopwatch and derived
 * meters, key order by priority then insertion, fairseq's rounding.
 *
 * Time is passed in (seconds, any monotonic origin) so tests are exact.
 */
#ifndef MOE_CORE_METERS_H
#define MOE_CORE_METERS_H

#include "core/log.h"

typedef struct moe_meters moe_meters;

moe_meters *moe_meters_create(double now);
void moe_meters_destroy(moe_meters *m);
/* Reset every meter's value (keys and order are kept); speed meters restart
 * their clock at `now`. */
void moe_meters_reset(moe_meters *m, double now);

/* AverageMeter: avg = sum(value*weight)/sum(weight); weight 0 reports the last value. */
void moe_meters_scalar(moe_meters *m, const char *key, double value, double weight, int priority, int round);
/* TimeMeter: avg = sum of values since reset / seconds since reset. The value
 * passed when the meter is first created is not counted (fairseq's quirk). */
void moe_meters_speed(moe_meters *m, const char *key, double value, double now, int priority, int round);
/* StopwatchMeter as logged by fairseq (weight 0): reports the summed seconds. */
void moe_meters_stopwatch(moe_meters *m, const char *key, double seconds, int priority, int round);
/* Derived: 2^(avg of `base_key`), rounded to 2 decimals (fairseq's ppl). */
void moe_meters_ppl(moe_meters *m, const char *key, const char *base_key, int priority);

double moe_meters_value(const moe_meters *m, const char *key, double now); /* NaN if absent */
int moe_meters_has(const moe_meters *m, const char *key);

/* Formatted values in output order (priority, then first insertion), each
 * key prefixed with `prefix` ("" or "train_"). Returns the count written. */
int moe_meters_format(const moe_meters *m, const char *prefix, double now, moe_stat_kv *out, int max);

#endif
