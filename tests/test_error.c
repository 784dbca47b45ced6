/* test_error.c: the per-thread pending error (core/error.c): first message
 * wins, the MOE_TRY trace, truncation, thread isolation, status names. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"

static int setup(void **state)
{
    (void)state;
    moe_error_clear();
    return 0;
}

static void test_error_first_message_wins(void **state)
{
    (void)state;
    assert_string_equal(moe_error_message(), "");
    assert_int_equal(moe_error_set(MOE_ERR_IO, "cannot open '%s': expected a file, found %d entries", "x.bin", 3),
                     MOE_ERR_IO);
    assert_int_equal(moe_error_set(MOE_ERR_INTERNAL, "a later, less precise message"), MOE_ERR_INTERNAL);
    assert_string_equal(moe_error_message(), "cannot open 'x.bin': expected a file, found 3 entries");
    moe_error_clear();
    assert_string_equal(moe_error_message(), "");
    moe_error_set(MOE_ERR_NOMEM, "second");
    assert_string_equal(moe_error_message(), "second");
}

static void test_error_ok_records_nothing(void **state)
{
    (void)state;
    assert_int_equal(moe_error_set(MOE_OK, "not an error"), MOE_OK);
    assert_string_equal(moe_error_message(), "");
    moe_error_set(MOE_ERR_PLUGIN, "real");
    assert_string_equal(moe_error_message(), "real");
}

static void test_error_long_message_is_cut(void **state)
{
    (void)state;
    /* short words only: nothing to shorten, the end is cut */
    char big[3000];
    for (size_t i = 0; i < sizeof big - 1; i++)
        big[i] = i % 4 == 3 ? ' ' : 'a';
    big[sizeof big - 1] = '\0';
    moe_error_set(MOE_ERR_INVALID_ARG, "%s", big);
    const char *m = moe_error_message();
    size_t n = strlen(m);
    assert_true(n > 100 && n < sizeof big - 1);
    assert_string_equal(m + n - 3, "...");
    assert_int_equal(m[0], 'a');
}

/* A 5,000-character value quoted in a message: the value is shortened in
 * its middle, the reason after it is kept whole. */
static void test_error_long_value_keeps_reason(void **state)
{
    (void)state;
    static char dir[5001];
    for (size_t i = 0; i < sizeof dir - 1; i++)
        dir[i] = i % 10 == 0 ? '/' : (char)('a' + i % 26);
    dir[sizeof dir - 1] = '\0';
    moe_error_set(MOE_ERR_IO,
                  "--save-dir '%s': expected a writable directory, found that it cannot be created (File name too "
                  "long); pass a shorter path",
                  dir);
    const char *m = moe_error_message();
    size_t n = strlen(m);
    assert_true(n < 1024);
    assert_non_null(strstr(m, "(File name too long); pass a shorter path"));
    assert_int_equal(strncmp(m, "--save-dir '/bcdefghij/", 23), 0);
    assert_non_null(strstr(m, "...")); /* where the value was shortened */
    /* the value's end is kept too */
    char tail[16];
    memcpy(tail, dir + sizeof dir - 1 - 10, 11);
    tail[11] = '\0';
    char want[32];
    snprintf(want, sizeof want, "%s': expected", tail);
    assert_non_null(strstr(m, want));
    moe_error_clear();

    /* two long values and no quotes: both shortened as needed */
    moe_error_set(MOE_ERR_PLUGIN, "plugin %s: expected a shared object, found %s; remove it", dir, dir);
    m = moe_error_message();
    assert_true(strlen(m) < 1024);
    assert_non_null(strstr(m, "; remove it"));
    assert_int_equal(strncmp(m, "plugin /bcd", 11), 0);
}

static int trace_line_inner;
static int trace_line_outer;

static moe_status fails(void)
{
    return moe_error_set(MOE_ERR_BACKEND, "kernel launch failed: expected 0, found 7");
}

static moe_status inner(void)
{
    trace_line_inner = __LINE__ + 1;
    MOE_TRY(fails());
    return MOE_OK;
}

static moe_status outer(void)
{
    moe_status st;
    trace_line_outer = __LINE__ + 1;
    MOE_TRY_GOTO(st, inner(), done);
done:
    return st;
}

static void test_error_trace_records_path(void **state)
{
    (void)state;
    assert_int_equal(outer(), MOE_ERR_BACKEND);
    char expect[256];
    snprintf(expect, sizeof expect, "fails() (tests/test_error.c:%d)\ninner() (tests/test_error.c:%d)",
             trace_line_inner, trace_line_outer);
    assert_string_equal(moe_error_trace_text(), expect);
    assert_string_equal(moe_error_message(), "kernel launch failed: expected 0, found 7");
    moe_error_clear();
    assert_string_equal(moe_error_trace_text(), "");
}

static void test_error_trace_overflow_keeps_innermost(void **state)
{
    (void)state;
    char stmt[200];
    for (int i = 0; i < 100; i++) {
        snprintf(stmt, sizeof stmt, "step_%03d(a_fairly_long_argument_list, to_fill_the_buffer_quickly)", i);
        moe_error_trace(stmt, "/x/y/core/thing.c", i);
    }
    const char *t = moe_error_trace_text();
    assert_non_null(strstr(t, "step_000(a_fairly_long_argument_list, to_fill_the_buffer_quickly) (core/thing.c:0)"));
    assert_null(strstr(t, "step_099("));
    const char *note = strstr(t, " outer trace entries dropped)");
    assert_non_null(note);
    /* the note counts exactly the entries that are missing */
    int kept = 0;
    for (const char *p = t; (p = strstr(p, "step_")) != NULL; p++)
        kept++;
    int dropped = 0;
    assert_int_equal(sscanf(strrchr(t, '(') + 1, "%d", &dropped), 1);
    assert_int_equal(kept + dropped, 100);
    /* asking twice gives the same text */
    assert_string_equal(moe_error_trace_text(), t);
}

static void *thread_body(void *arg)
{
    char *seen = arg;
    /* a fresh thread starts with no error, whatever the main thread holds */
    snprintf(seen, 128, "[%s]", moe_error_message());
    moe_error_set(MOE_ERR_COMM, "rank 3 timed out");
    moe_error_trace("recv()", "core/comm.c", 9);
    strncat(seen, moe_error_message(), 127 - strlen(seen));
    return NULL;
}

static void test_error_is_per_thread(void **state)
{
    (void)state;
    moe_error_set(MOE_ERR_IO, "main thread's error");
    char seen[128] = "";
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, thread_body, seen), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_string_equal(seen, "[]rank 3 timed out");
    assert_string_equal(moe_error_message(), "main thread's error");
    assert_string_equal(moe_error_trace_text(), "");
}

static void test_error_status_names(void **state)
{
    (void)state;
    assert_string_equal(moe_status_name(MOE_OK), "MOE_OK");
    assert_string_equal(moe_status_name(MOE_ERR_MIN_SCALE), "MOE_ERR_MIN_SCALE");
    assert_string_equal(moe_status_name(MOE_ERR_INTERNAL), "MOE_ERR_INTERNAL");
    /* every code has its own name */
    for (int i = 0; i < MOE_STATUS_COUNT; i++) {
        const char *a = moe_status_name((moe_status)i);
        assert_string_not_equal(a, "MOE_ERR_UNKNOWN");
        for (int j = 0; j < i; j++)
            assert_string_not_equal(a, moe_status_name((moe_status)j));
    }
    assert_string_equal(moe_status_name((moe_status)MOE_STATUS_COUNT), "MOE_ERR_UNKNOWN");
    assert_string_equal(moe_status_name((moe_status)-1), "MOE_ERR_UNKNOWN");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_error_first_message_wins, setup),
        cmocka_unit_test_setup(test_error_ok_records_nothing, setup),
        cmocka_unit_test_setup(test_error_long_message_is_cut, setup),
        cmocka_unit_test_setup(test_error_long_value_keeps_reason, setup),
        cmocka_unit_test_setup(test_error_trace_records_path, setup),
        cmocka_unit_test_setup(test_error_trace_overflow_keeps_innermost, setup),
        cmocka_unit_test_setup(test_error_is_per_thread, setup),
        cmocka_unit_test_setup(test_error_status_names, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
