/* test_scaler.c: the dynamic loss scaler (core/scaler.c) against fairseq's
 * DynamicLossScaler sequences (FAIRSEQ_SPEC.md §5.3) and the Python float
 * repr its messages use.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/log.h"
#include "core/scaler.h"

static const char *const NOTE_PREFIX = "gradient overflow detected, ignoring gradient, setting loss scale to: ";

static void expect_overflow(moe_scaler *s, double gnorm, const char *scale_text)
{
    char note[200], want[200];
    assert_int_equal(moe_scaler_check_overflow(s, gnorm, note, sizeof note), MOE_ERR_OVERFLOW);
    snprintf(want, sizeof want, "%s%s", NOTE_PREFIX, scale_text);
    assert_string_equal(note, want);
}

static void test_scaler_default_window(void **state)
{
    (void)state;
    assert_int_equal(moe_scaler_default_window(8, 1), 2048);  /* the reference: 16384/8/1 */
    assert_int_equal(moe_scaler_default_window(1, 1), 16384);
    assert_int_equal(moe_scaler_default_window(8, 2), 1024);
    assert_int_equal(moe_scaler_default_window(3, 1), 5461);  /* int() truncates 5461.33 */
    assert_int_equal(moe_scaler_default_window(3, 7), 780);   /* 16384/3/7 = 780.19 */
}

/* The sample log: overflows at the first three steps (128 -> 64 -> 32 -> 16),
 * then the scale stays 16 for 250 updates with the default window 2048. */
static void test_scaler_three_overflows_then_steady(void **state)
{
    (void)state;
    moe_scaler s;
    moe_scaler_init(&s, 128.0, moe_scaler_default_window(8, 1), 0.0, 0.0, 1e-4);
    expect_overflow(&s, INFINITY, "64.0");
    assert_true(s.scale == 64.0);
    expect_overflow(&s, NAN, "32.0");
    expect_overflow(&s, INFINITY, "16.0");
    assert_true(s.scale == 16.0);
    for (int i = 0; i < 250; i++) {
        assert_int_equal(moe_scaler_check_overflow(&s, 1.5 + i, NULL, 0), MOE_OK);
        moe_scaler_update(&s);
    }
    assert_true(s.scale == 16.0);
    assert_int_equal(s.iter, 253);
}

/* Growth comes `window` clean steps after the last overflow (and after
 * `window` steps from the start when there was none). */
static void test_scaler_growth_after_window(void **state)
{
    (void)state;
    moe_scaler s;
    moe_scaler_init(&s, 4.0, 3, 0.0, 0.0, 1e-4);
    moe_scaler_update(&s);
    moe_scaler_update(&s);
    assert_true(s.scale == 4.0);
    moe_scaler_update(&s); /* third clean step */
    assert_true(s.scale == 8.0);

    moe_scaler_init(&s, 128.0, 4, 0.0, 0.0, 1e-4);
    expect_overflow(&s, INFINITY, "64.0");
    expect_overflow(&s, INFINITY, "32.0");
    expect_overflow(&s, INFINITY, "16.0");
    for (int i = 1; i <= 3; i++) {
        moe_scaler_update(&s);
        assert_true(s.scale == 16.0);
    }
    moe_scaler_update(&s); /* the 4th clean step since the last overflow */
    assert_true(s.scale == 32.0);
    for (int i = 1; i <= 3; i++)
        moe_scaler_update(&s);
    assert_true(s.scale == 32.0);
    moe_scaler_update(&s);
    assert_true(s.scale == 64.0);
}

/* Tolerance: the scale shrinks only when overflows since the last rescale
 * reach that fraction of the iterations since it; the step is skipped anyway. */
static void test_scaler_tolerance(void **state)
{
    (void)state;
    moe_scaler s;
    moe_scaler_init(&s, 128.0, 1000, 0.5, 0.0, 1e-4);
    for (int i = 0; i < 3; i++)
        moe_scaler_update(&s);              /* iters 0..2 clean */
    expect_overflow(&s, INFINITY, "128.0"); /* 1 of 4 */
    expect_overflow(&s, INFINITY, "128.0"); /* 2 of 5 */
    expect_overflow(&s, INFINITY, "64.0");  /* 3 of 6 >= 0.5 */
    assert_int_equal(s.overflows_since_rescale, 0);
}

static void test_scaler_threshold_clamps(void **state)
{
    (void)state;
    moe_scaler s;
    moe_scaler_init(&s, 128.0, 2048, 0.0, 100.0, 1e-4);
    expect_overflow(&s, INFINITY, "100.0");
    expect_overflow(&s, INFINITY, "100.0");
}

/* At the minimum: the previous scale is restored and training must stop, with
 * fairseq's message (min_loss_scale printed as Python prints 1e-4). */
static void test_scaler_min_scale(void **state)
{
    (void)state;
    moe_error_clear();
    moe_scaler s;
    moe_scaler_init(&s, 0x1p-12, 2048, 0.0, 0.0, 1e-4);
    expect_overflow(&s, INFINITY, "0.0001220703125");
    char note[300];
    assert_int_equal(moe_scaler_check_overflow(&s, INFINITY, note, sizeof note), MOE_ERR_MIN_SCALE);
    assert_true(s.scale == 0x1p-13); /* restored, not 6.1e-05 */
    const char *want = "Minimum loss scale reached (0.0001). Your loss is probably exploding. Try lowering the "
                       "learning rate, using gradient clipping or increasing the batch size.";
    assert_string_equal(note, want);
    assert_non_null(strstr(moe_error_message(), "Minimum loss scale reached (0.0001)"));
    moe_error_clear();
    /* a scale landing exactly on the minimum is refused too (<=) */
    moe_scaler_init(&s, 2.0, 2048, 0.0, 0.0, 1.0);
    assert_int_equal(moe_scaler_check_overflow(&s, NAN, NULL, 0), MOE_ERR_MIN_SCALE);
    assert_true(s.scale == 2.0);
    moe_error_clear();
}

static void expect_repr(double v, const char *want)
{
    char buf[64];
    moe_format_pyfloat(buf, sizeof buf, v);
    assert_string_equal(buf, want);
}

static void test_scaler_python_float_repr(void **state)
{
    (void)state;
    expect_repr(64.0, "64.0");
    expect_repr(0.5, "0.5");
    expect_repr(0x1p-13, "0.0001220703125");
    expect_repr(0x1p-14, "6.103515625e-05");
    expect_repr(1e-4, "0.0001");
    expect_repr(1e-5, "1e-05");
    expect_repr(0.1, "0.1");
    expect_repr(1.0 / 3.0, "0.3333333333333333");
    expect_repr(128.0, "128.0");
    expect_repr(-2.5, "-2.5");
    expect_repr(0.0, "0.0");
    expect_repr(123456789.0, "123456789.0");
    expect_repr(1e15, "1000000000000000.0");
    expect_repr(1e16, "1e+16");
    expect_repr(0x1p60, "1.152921504606847e+18");
    expect_repr(1e100, "1e+100");
    expect_repr(INFINITY, "inf");
    expect_repr(NAN, "nan");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scaler_default_window),
        cmocka_unit_test(test_scaler_three_overflows_then_steady),
        cmocka_unit_test(test_scaler_growth_after_window),
        cmocka_unit_test(test_scaler_tolerance),
        cmocka_unit_test(test_scaler_threshold_clamps),
        cmocka_unit_test(test_scaler_min_scale),
        cmocka_unit_test(test_scaler_python_float_repr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
