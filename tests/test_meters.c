/* test_meters.c: fairseq's meters (core/meters.c, FAIRSEQ_SPEC.md §8.1) with
 * injected times: weighted averages, weight-0 last values, the speed meter's
 * uncounted first value, stopwatch sums, perplexity from the unrounded loss,
 * key order, and a whole train_inner interval that must reproduce fairseq's
 * first sample log line byte for byte. Expected numbers are Python's. */
#include <ctype.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/log.h"
#include "core/meters.h"

/* the formatted output as "k=v k=v ..." */
static const char *joined(const moe_meters *m, const char *prefix, double now)
{
    static char out[2048];
    moe_stat_kv kv[64];
    int n = moe_meters_format(m, prefix, now, kv, 64);
    size_t o = 0;
    out[0] = '\0';
    for (int i = 0; i < n; i++)
        o += (size_t)snprintf(out + o, sizeof out - o, "%s%s=%s", i ? " " : "", kv[i].key, kv[i].value);
    return out;
}

static void test_meters_average_uses_weights(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    assert_non_null(m);
    moe_meters_scalar(m, "loss", 2.0, 3.0, 10, 3);
    moe_meters_scalar(m, "loss", 5.0, 1.0, 10, 3);
    assert_true(moe_meters_value(m, "loss", 0.0) == 2.75);
    /* a weight-0 update changes the last value only, not a weighted average */
    moe_meters_scalar(m, "loss", 100.0, 0.0, 10, 3);
    assert_true(moe_meters_value(m, "loss", 0.0) == 2.75);
    /* rounding is the meter's: 3 digits */
    moe_meters_scalar(m, "x", 20.71383, 1.0, 10, 3);
    moe_meters_scalar(m, "x", 20.71384, 1.0, 10, 3);
    assert_true(moe_meters_value(m, "x", 0.0) == 20.714);
    assert_string_equal(joined(m, "", 0.0), "loss=2.75 x=20.714");
    moe_meters_destroy(m);
}

static void test_meters_weight_zero_reports_last_value(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_scalar(m, "lr", 1e-4, 0.0, 300, -1);
    moe_meters_scalar(m, "lr", 5e-4 * 11 / 750, 0.0, 300, -1);
    moe_meters_scalar(m, "num_updates", 9.0, 0.0, 200, -1);
    moe_meters_scalar(m, "num_updates", 10.0, 0.0, 200, -1);
    assert_string_equal(joined(m, "", 0.0), "num_updates=10 lr=7.33333e-06");
    moe_meters_destroy(m);
}

static void test_meters_speed_skips_first_value(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_speed(m, "wps", 1000.0, 10.0, 90, 1); /* starts the clock, not counted */
    moe_meters_speed(m, "wps", 100.0, 11.0, 90, 1);
    moe_meters_speed(m, "wps", 100.0, 12.0, 90, 1);
    assert_true(moe_meters_value(m, "wps", 14.0) == 50.0);
    assert_true(moe_meters_value(m, "wps", 13.0) == 66.7); /* 200/3, round 1 */
    /* after a reset every value counts, over the time since the reset */
    moe_meters_reset(m, 20.0);
    assert_true(moe_meters_value(m, "wps", 20.0) == 0.0);
    moe_meters_speed(m, "wps", 30.0, 21.0, 90, 1);
    assert_true(moe_meters_value(m, "wps", 23.0) == 10.0);
    assert_string_equal(joined(m, "", 23.0), "wps=10");
    moe_meters_destroy(m);
}

static void test_meters_stopwatch_sums(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_stopwatch(m, "train_wall", 30.4, 800, 0);
    moe_meters_stopwatch(m, "train_wall", 31.7, 800, 0);
    assert_true(moe_meters_value(m, "train_wall", 99.0) == 62.0);
    assert_string_equal(joined(m, "", 0.0), "train_wall=62");
    moe_meters_reset(m, 5.0);
    assert_true(moe_meters_value(m, "train_wall", 99.0) == 0.0);
    moe_meters_destroy(m);
}

static void test_meters_ppl_from_unrounded_average(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_ppl(m, "ppl", "loss", 20); /* before its base exists: 0 */
    assert_true(moe_meters_value(m, "ppl", 0.0) == 0.0);
    moe_meters_scalar(m, "loss", 4.00049, 1.0, 10, 3);
    assert_true(moe_meters_value(m, "loss", 0.0) == 4.0);
    /* 2 ** 4.00049 = 16.0054..., not 2 ** 4.0 = 16 */
    assert_true(moe_meters_value(m, "ppl", 0.0) == 16.01);
    assert_string_equal(joined(m, "", 0.0), "loss=4 ppl=16.01");
    moe_meters_scalar(m, "loss", 2000.0, 1.0, 10, 3);
    moe_meters_scalar(m, "loss", 2000.0, 1.0, 10, 3);
    assert_true(isinf(moe_meters_value(m, "ppl", 0.0)));
    assert_string_equal(joined(m, "", 0.0), "loss=1334.67 ppl=inf");
    moe_meters_destroy(m);
}

static void test_meters_order_priority_then_insertion(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_scalar(m, "wpb", 65536, 1, 180, 1);
    moe_meters_scalar(m, "loss", 1, 1, 10, 3);
    moe_meters_speed(m, "ups", 1, 0.0, 100, 2);
    moe_meters_ppl(m, "ppl", "loss", 20);
    moe_meters_scalar(m, "moe_gate_loss", 2, 1, 10, 8);
    moe_meters_scalar(m, "_hidden", 3, 1, 10, 3);
    moe_meters_scalar(m, "gnorm", 4, 1, 400, 3);
    moe_meters_scalar(m, "inner_loss", 1, 1, 10, 3);
    /* a later call with another priority or rounding changes neither */
    moe_meters_scalar(m, "loss", 1.23456, 0, 1, 0);
    assert_string_equal(joined(m, "train_", 0.0),
                        "train_loss=1 train_moe_gate_loss=2 train_inner_loss=1 train_ppl=2 train_ups=0 "
                        "train_wpb=65536 train_gnorm=4");
    assert_true(moe_meters_has(m, "_hidden"));
    /* max bounds the count */
    moe_stat_kv kv[2];
    assert_int_equal(moe_meters_format(m, "", 0.0, kv, 2), 2);
    assert_string_equal(kv[1].key, "moe_gate_loss");
    moe_meters_destroy(m);
}

static void test_meters_reset_keeps_keys_drops_stale(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_scalar(m, "loss", 3, 1, 10, 3);
    moe_meters_scalar(m, "clip", 100, 1, 500, 1);
    moe_meters_scalar(m, "gnorm", 4, 1, 400, 3);
    moe_meters_reset(m, 1.0);
    assert_true(moe_meters_has(m, "clip"));
    assert_true(isnan(moe_meters_value(m, "clip", 1.0)));
    moe_meters_scalar(m, "gnorm", 5, 1, 400, 3);
    moe_meters_scalar(m, "loss", 6, 1, 10, 3);
    assert_string_equal(joined(m, "", 1.0), "loss=6 gnorm=5");
    moe_meters_destroy(m);
}

static void test_meters_absent_key(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    assert_false(moe_meters_has(m, "loss"));
    assert_true(isnan(moe_meters_value(m, "loss", 0.0)));
    assert_int_equal(moe_meters_format(m, "", 0.0, NULL, 0), 0);
    moe_meters_destroy(m);
    moe_meters_destroy(NULL);
}

static void test_meters_kind_mismatch_is_ignored_and_warned(void **state)
{
    (void)state;
    FILE *f = tmpfile();
    assert_non_null(f);
    moe_log_configure(f, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_JSON);
    moe_meters *m = moe_meters_create(0.0);
    moe_meters_scalar(m, "wps", 7, 1, 90, 1);
    moe_meters_speed(m, "wps", 1000, 1.0, 90, 1);
    moe_meters_speed(m, "wps", 1000, 2.0, 90, 1);
    assert_true(moe_meters_value(m, "wps", 3.0) == 7.0);
    moe_meters_destroy(m);
    moe_log_configure(NULL, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    char buf[1024] = "";
    rewind(f);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    assert_non_null(strstr(buf, "| WARNING | moelm.meters | meter 'wps' is a scalar meter; a speed update for it"));
}

/* ------------------------------------------------------------ one interval */

static const char *metric_keys[] = {
    "overflow_expert1", "overflow_expert2", "entropy_gating", "expert1_balance_top", "expert1_balance_bottom",
    "unused_expert1_count", "expert2_balance_top", "expert2_balance_bottom", "unused_expert2_count",
    "all_to_all_cpu_time_ms", "all_to_all_cuda_time_ms",
};
static const double metric_values[] = {20.84, 53.493, 1.943, 66.521, 2.528, 0.12, 50.142, 5.417, 0.052, 0, 0};

/* fairseq's README, first train_inner line of the single-node run */
static const char *sample_line =
    "INFO | train_inner | {\"epoch\": 1, \"update\": 0.004, \"loss\": \"20.714\", \"moe_gate_loss\": \"16.7217\", "
    "\"overflow_expert1\": \"20.84\", \"overflow_expert2\": \"53.493\", \"entropy_gating\": \"1.943\", "
    "\"expert1_balance_top\": \"66.521\", \"expert1_balance_bottom\": \"2.528\", \"unused_expert1_count\": "
    "\"0.12\", \"expert2_balance_top\": \"50.142\", \"expert2_balance_bottom\": \"5.417\", "
    "\"unused_expert2_count\": \"0.052\", \"all_to_all_cpu_time_ms\": \"0\", \"all_to_all_cuda_time_ms\": \"0\", "
    "\"inner_loss\": \"20.472\", \"ppl\": \"1.45489e+06\", \"wps\": \"16606.5\", \"ups\": \"0.25\", \"wpb\": "
    "\"65536\", \"bsz\": \"32\", \"num_updates\": \"10\", \"lr\": \"7.33333e-06\", \"gnorm\": \"30.01\", "
    "\"loss_scale\": \"16\", \"train_wall\": \"62\", \"cuda_gb_allocated\": \"10.4\", \"cuda_gb_reserved\": "
    "\"19\", \"cuda_gb_free\": \"21.4\", \"wall\": \"68\"}\n";

static void test_meters_interval_reproduces_fairseq_line(void **state)
{
    (void)state;
    moe_meters *m = moe_meters_create(0.0);
    const double t1 = 5.0, elapsed = 35.5176; /* 9 counted updates: 589824 tok / 35.5176 s = 16606.5 wps */
    for (int u = 0; u < 10; u++) {
        double now = t1 + elapsed * u / 9.0;
        /* keys created out of priority order on purpose; equal priorities in
         * fairseq's order */
        moe_meters_scalar(m, "cuda_gb_allocated", 10.4, 0, 1500, 1);
        moe_meters_scalar(m, "cuda_gb_reserved", 19.0, 0, 1500, 1);
        moe_meters_scalar(m, "cuda_gb_free", 21.4, 0, 1500, 1);
        moe_meters_stopwatch(m, "train_wall", 6.2, 800, 0);
        moe_meters_speed(m, "wps", 65536, now, 90, 1);
        moe_meters_speed(m, "ups", 1.0, now, 100, 2);
        moe_meters_scalar(m, "loss", 20.714 + (u - 4.5) * 0.1, 65536, 10, 3);
        moe_meters_scalar(m, "moe_gate_loss", 16.72171234, 65536, 10, 8);
        for (size_t k = 0; k < sizeof metric_keys / sizeof metric_keys[0]; k++)
            moe_meters_scalar(m, metric_keys[k], metric_values[k], 1, 10, 3);
        moe_meters_scalar(m, "inner_loss", 20.472476, 65536, 10, 3);
        moe_meters_ppl(m, "ppl", "inner_loss", 20);
        moe_meters_scalar(m, "wpb", 65536, 1, 180, 1);
        moe_meters_scalar(m, "bsz", 32, 1, 190, 1);
        moe_meters_scalar(m, "num_updates", u + 1, 0, 200, -1);
        moe_meters_scalar(m, "lr", 5e-4 * (u + 2) / 750, 0, 300, -1); /* the next update's */
        moe_meters_scalar(m, "gnorm", u == 0 ? 210.1 : 10.0, 1, 400, 3);
        moe_meters_scalar(m, "loss_scale", 16.0, 0, 700, 4);
    }
    moe_stat_kv kv[64];
    int n = moe_meters_format(m, "", t1 + elapsed, kv, 63);
    assert_int_equal(n, 27);
    snprintf(kv[n].key, sizeof kv[n].key, "wall");
    moe_format_stat(kv[n].value, sizeof kv[n].value, 68.3, 0);
    n++;

    FILE *f = tmpfile();
    assert_non_null(f);
    moe_log_configure(f, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_JSON);
    moe_log_stats("train_inner", 1, "13/3125", kv, n);
    moe_log_configure(NULL, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    char buf[4096] = "";
    rewind(f);
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    buf[got] = '\0';
    fclose(f);
    assert_true(got > 22);
    for (int i = 0; i < 19; i++)
        if (i != 4 && i != 7 && i != 10 && i != 13 && i != 16)
            assert_true(isdigit((unsigned char)buf[i]));
    assert_string_equal(buf + 22, sample_line);

    /* the next interval counts all ten updates over the time since the reset */
    moe_meters_reset(m, 50.0);
    for (int u = 0; u < 10; u++)
        moe_meters_speed(m, "ups", 1.0, 50.0 + u, 100, 2);
    assert_true(moe_meters_value(m, "ups", 90.0) == 0.25);
    moe_meters_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_meters_average_uses_weights),
        cmocka_unit_test(test_meters_weight_zero_reports_last_value),
        cmocka_unit_test(test_meters_speed_skips_first_value),
        cmocka_unit_test(test_meters_stopwatch_sums),
        cmocka_unit_test(test_meters_ppl_from_unrounded_average),
        cmocka_unit_test(test_meters_order_priority_then_insertion),
        cmocka_unit_test(test_meters_reset_keeps_keys_drops_stale),
        cmocka_unit_test(test_meters_absent_key),
        cmocka_unit_test(test_meters_kind_mismatch_is_ignored_and_warned),
        cmocka_unit_test(test_meters_interval_reproduces_fairseq_line),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
