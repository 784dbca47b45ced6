/* test_profile.c: the trace recorder (core/profile.c) through a fake host
 * whose backend has device timers: markers are numbered, and the "device"
 * time of marker k is k milliseconds, so every span's timestamp and duration
 * in the file is known exactly. Checks the range of updates recorded, the
 * nesting and category inheritance, that ending a span ends the spans begun
 * inside it (the root unit a training forward gathers and its backward
 * releases), that ending a closed span changes nothing, and the file's
 * Chrome trace-event JSON. The wall-time path is exercised end to end by
 * test_observe. */
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/profile.h"

static int g_next_mark, g_live_marks, g_syncs;

static moe_status fake_mark(moe_ctx *ctx, void **mark)
{
    (void)ctx;
    int *m = malloc(sizeof *m);
    if (!m)
        return MOE_ERR_NOMEM;
    *m = g_next_mark++;
    g_live_marks++;
    *mark = m;
    return MOE_OK;
}

static moe_status fake_elapsed(moe_ctx *ctx, const void *from, const void *to, double *ms)
{
    (void)ctx;
    *ms = (double)(*(const int *)to - *(const int *)from);
    return MOE_OK;
}

static void fake_free(moe_ctx *ctx, void *mark)
{
    (void)ctx;
    free(mark);
    g_live_marks--;
}

static moe_status fake_sync(moe_ctx *ctx)
{
    (void)ctx;
    g_syncs++;
    return MOE_OK;
}

static moe_backend_ops g_backend;
static moe_host g_host;
static char g_path[64];

static int setup(void **state)
{
    (void)state;
    memset(&g_backend, 0, sizeof g_backend);
    g_backend.synchronize = fake_sync;
    g_backend.timer_mark = fake_mark;
    g_backend.timer_elapsed_ms = fake_elapsed;
    g_backend.timer_free = fake_free;
    memset(&g_host, 0, sizeof g_host);
    g_host.size = (uint32_t)sizeof g_host;
    g_host.backend = &g_backend;
    g_host.world = 1;
    g_next_mark = g_live_marks = g_syncs = 0;
    snprintf(g_path, sizeof g_path, "/tmp/moelm-test-profile-XXXXXX");
    int fd = mkstemp(g_path);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    moe_profile_reset();
    unlink(g_path);
    return 0;
}

/* The "X" events of the file, in order; `device`: the track must say the
 * times are the device's. */
static json_t *events(int device)
{
    json_error_t err;
    json_t *root = json_load_file(g_path, 0, &err);
    if (!root)
        fail_msg("not JSON: %s (line %d)", err.text, err.line);
    json_t *out = json_array();
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(root, "traceEvents"), i, e)
    {
        const char *ph = json_string_value(json_object_get(e, "ph"));
        if (strcmp(ph, "X") == 0)
            json_array_append(out, e);
        if (device && strcmp(ph, "M") == 0 &&
            strcmp(json_string_value(json_object_get(e, "name")), "thread_name") == 0)
            assert_string_equal(json_string_value(json_object_get(json_object_get(e, "args"), "name")),
                                "compute stream (device timers)");
    }
    json_decref(root);
    return out;
}

static void expect_span(json_t *e, const char *name, const char *cat, double ts_ms, double dur_ms, int update)
{
    assert_string_equal(json_string_value(json_object_get(e, "name")), name);
    assert_string_equal(json_string_value(json_object_get(e, "cat")), cat);
    double ts = json_number_value(json_object_get(e, "ts")), dur = json_number_value(json_object_get(e, "dur"));
    if (fabs(ts - ts_ms * 1e3) > 1e-6 || fabs(dur - dur_ms * 1e3) > 1e-6)
        fail_msg("%s: ts %g dur %g (us), expected %g and %g", name, ts, dur, ts_ms * 1e3, dur_ms * 1e3);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(e, "args"), "update")), update);
}

static void test_profile_spans_from_device_timers(void **state)
{
    (void)state;
    assert_int_equal(moe_profile_configure(g_path, "2-2"), MOE_OK);
    assert_true(moe_profile_wanted());
    moe_profile_attach(&g_host);

    /* update 1: not chosen, nothing recorded */
    moe_profile_step_begin(1);
    assert_int_equal(moe_profile_begin(MOE_PROF_STEP, "update"), -1);
    assert_int_equal(moe_profile_step_end(1), MOE_OK);
    assert_int_equal(g_next_mark, 0);

    /* update 2: origin marker 0; each begin and end takes the next marker */
    moe_profile_step_begin(2);
    int upd = moe_profile_begin(MOE_PROF_STEP, "update");          /* mark 1 */
    int fwd = moe_profile_begin(MOE_PROF_FORWARD, "forward");      /* mark 2 */
    int root = moe_profile_begin(MOE_PROF_INHERIT, "decoder");     /* mark 3 */
    int op = moe_profile_begin(MOE_PROF_INHERIT, "matmul");        /* mark 4 */
    moe_profile_end(op);                                           /* mark 5 */
    int comm = moe_profile_begin(MOE_PROF_COMM, "all_to_all");     /* mark 6 */
    moe_profile_end(comm);                                         /* mark 7 */
    moe_profile_end(fwd); /* ends "decoder" too: marks 8 (decoder), 9 (forward) */
    moe_profile_end(root); /* already ended: nothing */
    int bwd = moe_profile_begin(MOE_PROF_BACKWARD, "backward");    /* mark 10 */
    int op2 = moe_profile_begin(MOE_PROF_INHERIT, "matmul");       /* mark 11 */
    moe_profile_end(op2);                                          /* mark 12 */
    moe_profile_end(bwd);                                          /* mark 13 */
    moe_profile_end(upd);                                          /* mark 14 */
    moe_profile_end(12345); /* never begun */
    assert_int_equal(moe_profile_step_end(2), MOE_OK); /* the last chosen update: written */
    assert_int_equal(g_next_mark, 15);
    assert_int_equal(g_live_marks, 0); /* every marker freed */
    assert_true(g_syncs >= 1);

    json_t *ev = events(1);
    assert_int_equal(json_array_size(ev), 7);
    expect_span(json_array_get(ev, 0), "update", "step", 1, 13, 2);
    expect_span(json_array_get(ev, 1), "forward", "forward", 2, 7, 2);
    expect_span(json_array_get(ev, 2), "decoder", "forward", 3, 5, 2); /* truncated at the forward's end */
    expect_span(json_array_get(ev, 3), "matmul", "forward", 4, 1, 2);
    expect_span(json_array_get(ev, 4), "all_to_all", "communication", 6, 1, 2);
    expect_span(json_array_get(ev, 5), "backward", "backward", 10, 3, 2);
    expect_span(json_array_get(ev, 6), "matmul", "backward", 11, 1, 2);
    json_decref(ev);
}

static void test_profile_range_not_reached(void **state)
{
    (void)state;
    assert_int_equal(moe_profile_configure(g_path, "5-6"), MOE_OK);
    moe_profile_attach(&g_host);
    moe_profile_step_begin(1);
    assert_int_equal(moe_profile_begin(MOE_PROF_STEP, "update"), -1);
    assert_int_equal(moe_profile_step_end(1), MOE_OK);
    /* training ends first: the file is still a valid trace, without spans */
    assert_int_equal(moe_profile_finish(), MOE_OK);
    json_t *ev = events(0);
    assert_int_equal(json_array_size(ev), 0);
    json_decref(ev);
}

static void test_profile_bad_ranges(void **state)
{
    (void)state;
    const char *bad[] = {"0", "3-2", "x", "2-", "-1", "1-2-3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(moe_profile_configure(g_path, bad[i]), MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(moe_error_message(), "--profile-updates"));
        moe_error_clear();
    }
    assert_int_equal(moe_profile_configure("/nonexistent/dir/trace.json", "1"), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "--profile"));
    moe_error_clear();
    assert_int_equal(moe_profile_configure(NULL, "1"), MOE_OK);
    assert_false(moe_profile_wanted());
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_profile_spans_from_device_timers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_profile_range_not_reached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_profile_bad_ranges, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
