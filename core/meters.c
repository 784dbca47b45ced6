/* meters.c: fairseq's meters and MetersDict (fairseq/logging/meters.py,
 * FAIRSEQ_SPEC.md §8.1) for one aggregator such as "train_inner".
 *
 * What each kind reports, in Python's terms:
 *  - scalar (AverageMeter): sum/count if count > 0 else the last value; an
 *    update with weight 0 sets the last value only.
 *  - speed (TimeMeter): n / (seconds since reset); the call that creates the
 *    meter only starts its clock (metrics.log_speed resets a new meter instead
 *    of updating it), later calls add to n.
 *  - stopwatch (StopwatchMeter, stopped with weight 0 as train.py does): the
 *    summed seconds.
 *  - ppl (DerivedMeter of utils.get_perplexity): round(2 ** avg(base), 2),
 *    0 when the base has no value, inf on overflow.
 * Each meter rounds with Python's round(v, digits) when digits >= 0. Round and
 * priority are fixed by the call that creates the key, as in fairseq; later
 * calls only update. Output order is (priority, creation index), which is
 * MetersDict's bisect.insort of (priority, len(priorities), key).
 *
 * Deliberately not here: the aggregator stack of fairseq's metrics.py (the
 * trainer feeds each meters object it wants), state dicts, wall-clock reads
 * (every time is passed in, so tests are exact). Differences from fairseq,
 * where fairseq would raise or print None: a meter with no value since the
 * last reset is left out of moe_meters_format; a speed meter with no elapsed
 * time reports 0.
 */
#include "core/meters.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

typedef enum meter_kind { METER_SCALAR, METER_SPEED, METER_STOPWATCH, METER_PPL } meter_kind;

typedef struct meter {
    char *key;
    meter_kind kind;
    int priority;
    int index; /* creation order, the tie-break */
    int round; /* < 0: none */
    /* scalar */
    int has_val;
    double val, sum, count;
    /* speed: n over (init + now - start); init stays 0 as fairseq's after reset */
    double n, start;
    /* stopwatch */
    double seconds;
    /* ppl */
    char *base;
} meter;

struct moe_meters {
    meter **sorted; /* by (priority, index) */
    int n, cap;
    double created;
};

static const char *kind_name(meter_kind k)
{
    switch (k) {
    case METER_SCALAR: return "scalar";
    case METER_SPEED: return "speed";
    case METER_STOPWATCH: return "stopwatch";
    case METER_PPL: return "ppl";
    }
    return "?";
}

moe_meters *moe_meters_create(double now)
{
    moe_meters *m = calloc(1, sizeof *m);
    if (m)
        m->created = now;
    return m;
}

void moe_meters_destroy(moe_meters *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n; i++) {
        free(m->sorted[i]->key);
        free(m->sorted[i]->base);
        free(m->sorted[i]);
    }
    free(m->sorted);
    free(m);
}

static void reset_meter(meter *x, double now)
{
    x->has_val = 0;
    x->val = x->sum = x->count = 0.0;
    x->n = 0.0;
    x->start = now;
    x->seconds = 0.0;
}

void moe_meters_reset(moe_meters *m, double now)
{
    if (!m)
        return;
    for (int i = 0; i < m->n; i++)
        reset_meter(m->sorted[i], now);
}

static meter *find(const moe_meters *m, const char *key)
{
    if (!m || !key)
        return NULL;
    for (int i = 0; i < m->n; i++)
        if (strcmp(m->sorted[i]->key, key) == 0)
            return m->sorted[i];
    return NULL;
}

/* The meter for `key`: the existing one if its kind matches (NULL with a
 * warning if not), else a new one placed by (priority, creation index). */
static meter *get_or_add(moe_meters *m, const char *key, meter_kind kind, int priority, int round, double now,
                         int *created)
{
    *created = 0;
    if (!m || !key)
        return NULL;
    meter *x = find(m, key);
    if (x) {
        if (x->kind == kind)
            return x;
        moe_log(MOE_LOG_WARNING, "moelm.meters", "meter '%s' is a %s meter; a %s update for it was ignored", key,
                kind_name(x->kind), kind_name(kind));
        return NULL;
    }
    if (m->n == m->cap) {
        int cap = m->cap ? m->cap * 2 : 16;
        meter **s = realloc(m->sorted, (size_t)cap * sizeof *s);
        if (!s)
            goto nomem;
        m->sorted = s;
        m->cap = cap;
    }
    x = calloc(1, sizeof *x);
    if (!x || !(x->key = malloc(strlen(key) + 1))) {
        free(x);
        goto nomem;
    }
    strcpy(x->key, key);
    x->kind = kind;
    x->priority = priority;
    x->index = m->n;
    x->round = round;
    reset_meter(x, now);
    /* insertion: after every meter of lower or equal priority (all have a
     * smaller index), before the first of higher priority */
    int pos = m->n;
    while (pos > 0 && m->sorted[pos - 1]->priority > priority) {
        m->sorted[pos] = m->sorted[pos - 1];
        pos--;
    }
    m->sorted[pos] = x;
    m->n++;
    *created = 1;
    return x;
nomem:
    moe_log(MOE_LOG_WARNING, "moelm.meters", "out of host memory adding meter '%s'; it will be missing from the logs",
            key);
    return NULL;
}

void moe_meters_scalar(moe_meters *m, const char *key, double value, double weight, int priority, int round)
{
    int created;
    meter *x = get_or_add(m, key, METER_SCALAR, priority, round, 0.0, &created);
    if (!x)
        return;
    x->val = value;
    x->has_val = 1;
    if (weight > 0) {
        x->sum += value * weight;
        x->count += weight;
    }
}

void moe_meters_speed(moe_meters *m, const char *key, double value, double now, int priority, int round)
{
    int created;
    meter *x = get_or_add(m, key, METER_SPEED, priority, round, now, &created);
    if (!x || created)
        return; /* a new meter only starts its clock */
    x->n += value;
}

void moe_meters_stopwatch(moe_meters *m, const char *key, double seconds, int priority, int round)
{
    int created;
    meter *x = get_or_add(m, key, METER_STOPWATCH, priority, round, 0.0, &created);
    if (x)
        x->seconds += seconds;
}

void moe_meters_ppl(moe_meters *m, const char *key, const char *base_key, int priority)
{
    int created;
    meter *x = get_or_add(m, key, METER_PPL, priority, -1, 0.0, &created);
    if (!x || !created || !base_key)
        return;
    x->base = malloc(strlen(base_key) + 1);
    if (x->base)
        strcpy(x->base, base_key);
}

/* Python's round(x, digits): the correctly rounded decimal, exact ties to
 * even (glibc's printf rounding), read back. The same arithmetic as
 * moe_format_stat's rounding in log.c; it is repeated here because
 * moe_meters_value needs the rounded double, not its text. */
static double py_round(double x, int digits)
{
    if (digits < 0 || !isfinite(x) || x == 0.0 || digits > 323 || fabs(x) >= 9007199254740992.0)
        return x;
    char buf[400];
    snprintf(buf, sizeof buf, "%.*f", digits, x);
    return strtod(buf, NULL);
}

/* The meter's unrounded value; 0 if it has none. */
static int raw_value(const moe_meters *m, const meter *x, double now, double *out)
{
    switch (x->kind) {
    case METER_SCALAR:
        if (!x->has_val)
            return 0;
        *out = x->count > 0 ? x->sum / x->count : x->val;
        return 1;
    case METER_SPEED: {
        double elapsed = now - x->start;
        *out = elapsed > 0 ? x->n / elapsed : 0.0;
        return 1;
    }
    case METER_STOPWATCH:
        *out = x->seconds;
        return 1;
    case METER_PPL: {
        const meter *b = find(m, x->base);
        double loss;
        if (!b || b == x || b->kind == METER_PPL || !raw_value(m, b, now, &loss)) {
            *out = 0.0;
            return 1;
        }
        *out = py_round(pow(2.0, loss), 2);
        return 1;
    }
    }
    return 0;
}

static int smoothed_value(const moe_meters *m, const meter *x, double now, double *out)
{
    if (!raw_value(m, x, now, out))
        return 0;
    *out = py_round(*out, x->round);
    return 1;
}

double moe_meters_value(const moe_meters *m, const char *key, double now)
{
    const meter *x = find(m, key);
    double v;
    if (!x || !smoothed_value(m, x, now, &v))
        return NAN;
    return v;
}

int moe_meters_has(const moe_meters *m, const char *key)
{
    return find(m, key) != NULL;
}

int moe_meters_format(const moe_meters *m, const char *prefix, double now, moe_stat_kv *out, int max)
{
    if (!m || !out)
        return 0;
    if (!prefix)
        prefix = "";
    int k = 0;
    for (int i = 0; i < m->n && k < max; i++) {
        const meter *x = m->sorted[i];
        double v;
        if (x->key[0] == '_' || !smoothed_value(m, x, now, &v)) /* fairseq hides "_" keys */
            continue;
        snprintf(out[k].key, sizeof out[k].key, "%s%s", prefix, x->key);
        moe_format_stat(out[k].value, sizeof out[k].value, v, -1);
        k++;
    }
    return k;
}
