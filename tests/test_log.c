/* test_log.c: the logger (core/log.c): fairseq's number format, the line
 * format and rank rule, json / simple / none stats lines compared byte for
 * byte (past the timestamp) with fairseq's, and the live progress line on a
 * pseudo-terminal.
 *
 * Expected strings are Python's (json.dumps, '{:g}'.format(round(v, d))), and
 * the json line is the first train_inner line of fairseq's MoE README log. */
#define _XOPEN_SOURCE 700 /* posix_openpt, grantpt, unlockpt, ptsname */
#include <ctype.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/log.h"

/* ------------------------------------------------------------ helpers */

static FILE *capture_open(moe_log_format fmt, int rank, moe_log_level min_level)
{
    FILE *f = tmpfile();
    assert_non_null(f);
    moe_log_configure(f, rank, 4, min_level, fmt);
    return f;
}

/* Everything written since capture_open; the logger goes back to stderr. */
static char *capture_close(FILE *f)
{
    moe_log_configure(NULL, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    long n = ftell(f);
    assert_true(n >= 0);
    char *s = calloc((size_t)n + 1, 1);
    assert_non_null(s);
    rewind(f);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    return s;
}

/* "YYYY-MM-DD HH:MM:SS | " at the start of `line`; returns what follows. */
static const char *after_timestamp(const char *line)
{
    const char *shape = "dddd-dd-dd dd:dd:dd | ";
    for (size_t i = 0; shape[i]; i++) {
        if (shape[i] == 'd')
            assert_true(isdigit((unsigned char)line[i]));
        else
            assert_int_equal(line[i], shape[i]);
    }
    return line + strlen(shape);
}

static void assert_stat(double v, int digits, const char *expect)
{
    char buf[32];
    moe_format_stat(buf, sizeof buf, v, digits);
    assert_string_equal(buf, expect);
}

/* ------------------------------------------------------------ numbers */

static void test_log_format_stat_sample_values(void **state)
{
    (void)state;
    assert_stat(20.7138, 3, "20.714");
    assert_stat(1454890.2, -1, "1.45489e+06"); /* ppl, already rounded to 2 */
    assert_stat(5e-4 * 11 / 750, -1, "7.33333e-06");
    assert_stat(65536.0, 1, "65536");
    assert_stat(16.0, 4, "16");
    assert_stat(0.0, 3, "0");
    assert_stat(16.72174999, 8, "16.7217");
    assert_stat(16606.53, 1, "16606.5");
    assert_stat(1.0 / 3.0, 8, "0.333333");
}

static void test_log_format_stat_python_rounding(void **state)
{
    (void)state;
    /* exact ties go to even, inexact ones by their true binary value */
    assert_stat(0.125, 2, "0.12");
    assert_stat(2.675, 2, "2.67");
    assert_stat(2.5, 0, "2");
    assert_stat(62.5, 0, "62");
    assert_stat(1.5, 0, "2");
    assert_stat(0.5, 0, "0");
    assert_stat(-2.5, 0, "-2");
    assert_stat(-0.001, 2, "-0");
}

static void test_log_format_stat_g_style(void **state)
{
    (void)state;
    assert_stat(1e-5, -1, "1e-05");
    assert_stat(0.0001, -1, "0.0001");
    assert_stat(123456789.0, -1, "1.23457e+08");
    assert_stat(1e16, -1, "1e+16");
    assert_stat(INFINITY, 2, "inf");
    assert_stat(-INFINITY, -1, "-inf");
    assert_stat(NAN, -1, "nan");
    assert_stat(-NAN, 3, "nan");
    /* a small buffer is cut, never overrun */
    char small[4] = {'x', 'x', 'x', 'x'};
    moe_format_stat(small, sizeof small, 65536.0, -1);
    assert_string_equal(small, "655");
}

/* ------------------------------------------------------------ lines */

static void test_log_parse_format(void **state)
{
    (void)state;
    moe_log_format f = MOE_LOG_FORMAT_NONE;
    assert_int_equal(moe_log_parse_format("json", &f), MOE_OK);
    assert_int_equal(f, MOE_LOG_FORMAT_JSON);
    assert_int_equal(moe_log_parse_format("simple", &f), MOE_OK);
    assert_int_equal(f, MOE_LOG_FORMAT_SIMPLE);
    assert_int_equal(moe_log_parse_format("none", &f), MOE_OK);
    assert_int_equal(f, MOE_LOG_FORMAT_NONE);
    assert_int_equal(moe_log_parse_format("tqdm", &f), MOE_OK);
    assert_int_equal(f, MOE_LOG_FORMAT_SIMPLE);
    f = MOE_LOG_FORMAT_NONE;
    assert_int_equal(moe_log_parse_format(NULL, &f), MOE_OK); /* fairseq's default */
    assert_int_equal(f, MOE_LOG_FORMAT_SIMPLE);
    moe_error_clear();
    f = MOE_LOG_FORMAT_JSON;
    assert_int_equal(moe_log_parse_format("JSON", &f), MOE_ERR_INVALID_ARG);
    assert_int_equal(f, MOE_LOG_FORMAT_JSON);
    assert_non_null(strstr(moe_error_message(), "expected one of json, simple, none, tqdm; found 'JSON'"));
    moe_error_clear();
}

static void test_log_line_format(void **state)
{
    (void)state;
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    assert_int_equal(moe_log_get_format(), MOE_LOG_FORMAT_JSON);
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "num. expert model params: %s (num. trained: %s)", "402,776,064",
            "402,776,064");
    moe_log(MOE_LOG_WARNING, "fairseq.trainer", "careful");
    moe_log(MOE_LOG_DEBUG, "fairseq.trainer", "hidden at INFO");
    char *s = capture_close(f);
    const char *p = after_timestamp(s);
    const char *l1 = "INFO | fairseq_cli.train | num. expert model params: 402,776,064 (num. trained: 402,776,064)\n";
    assert_memory_equal(p, l1, strlen(l1));
    p = after_timestamp(p + strlen(l1));
    assert_string_equal(p, "WARNING | fairseq.trainer | careful\n");
    free(s);
}

static void test_log_debug_level(void **state)
{
    (void)state;
    FILE *f = capture_open(MOE_LOG_FORMAT_SIMPLE, 0, MOE_LOG_DEBUG);
    moe_log(MOE_LOG_DEBUG, "moelm.loader", "dlopen %s", "x.so");
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), "DEBUG | moelm.loader | dlopen x.so\n");
    free(s);
}

static void test_log_other_ranks_warn_only_with_prefix(void **state)
{
    (void)state;
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 2, MOE_LOG_DEBUG);
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "rank 0 only");
    moe_log(MOE_LOG_DEBUG, "fairseq_cli.train", "rank 0 only");
    moe_stat_kv kv = {"loss", "1"};
    moe_log_stats("train_inner", 1, "10/100", &kv, 1);
    moe_log(MOE_LOG_ERROR, "moelm.comm", "peer %d vanished", 5);
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), "ERROR | [rank 2] moelm.comm | peer 5 vanished\n");
    free(s);
}

/* ------------------------------------------------------------ stats lines */

/* fairseq's first train_inner line of the README's single-node run, values as
 * logged; "wall" comes last, as train.py appends it. */
static const moe_stat_kv sample_kv[] = {
    {"loss", "20.714"},
    {"moe_gate_loss", "16.7217"},
    {"overflow_expert1", "20.84"},
    {"overflow_expert2", "53.493"},
    {"entropy_gating", "1.943"},
    {"expert1_balance_top", "66.521"},
    {"expert1_balance_bottom", "2.528"},
    {"unused_expert1_count", "0.12"},
    {"expert2_balance_top", "50.142"},
    {"expert2_balance_bottom", "5.417"},
    {"unused_expert2_count", "0.052"},
    {"all_to_all_cpu_time_ms", "0"},
    {"all_to_all_cuda_time_ms", "0"},
    {"inner_loss", "20.472"},
    {"ppl", "1.45489e+06"},
    {"wps", "16606.5"},
    {"ups", "0.25"},
    {"wpb", "65536"},
    {"bsz", "32"},
    {"num_updates", "10"},
    {"lr", "7.33333e-06"},
    {"gnorm", "30.01"},
    {"loss_scale", "16"},
    {"train_wall", "62"},
    {"cuda_gb_allocated", "10.4"},
    {"cuda_gb_reserved", "19"},
    {"cuda_gb_free", "21.4"},
    {"wall", "68"},
};

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

static void test_log_stats_json_matches_fairseq_line(void **state)
{
    (void)state;
    const int n = (int)(sizeof sample_kv / sizeof sample_kv[0]);
    /* the iterator position (13 of 3125 after three overflowed steps) ... */
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    moe_log_stats("train_inner", 1, "13/3125", sample_kv, n);
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), sample_line);
    free(s);
    /* ... and the literal give the same line */
    f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    moe_log_stats("train_inner", 1, "0.004", sample_kv, n);
    s = capture_close(f);
    assert_string_equal(after_timestamp(s), sample_line);
    free(s);
}

static void test_log_stats_json_update_is_python_float(void **state)
{
    (void)state;
    moe_stat_kv kv = {"loss", "2"};
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    moe_log_stats("train_inner", 1, "23/3125", &kv, 1);   /* 0.00736 -> 0.007 */
    moe_log_stats("train_inner", 1, "3125/3125", &kv, 1); /* 1.0, not 1 */
    moe_log_stats("train_inner", 2, "1/3125", &kv, 1);    /* 1.00032 -> 1.0 */
    moe_log_stats("train_inner", 1, "1/16", &kv, 1);      /* 0.0625: an exact tie, to even */
    moe_log_stats("train", 2, NULL, &kv, 1);
    moe_log_stats("x", 0, NULL, NULL, 0);
    char *s = capture_close(f);
    const char *expect[] = {
        "INFO | train_inner | {\"epoch\": 1, \"update\": 0.007, \"loss\": \"2\"}\n",
        "INFO | train_inner | {\"epoch\": 1, \"update\": 1.0, \"loss\": \"2\"}\n",
        "INFO | train_inner | {\"epoch\": 2, \"update\": 1.0, \"loss\": \"2\"}\n",
        "INFO | train_inner | {\"epoch\": 1, \"update\": 0.062, \"loss\": \"2\"}\n",
        "INFO | train | {\"epoch\": 2, \"loss\": \"2\"}\n",
        "INFO | x | {}\n",
    };
    const char *p = s;
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        p = after_timestamp(p);
        assert_memory_equal(p, expect[i], strlen(expect[i]));
        p += strlen(expect[i]);
    }
    assert_string_equal(p, "");
    free(s);
}

static void test_log_stats_json_escapes_like_python(void **state)
{
    (void)state;
    /* Python: json.dumps({"epoch": 1, "k\"": "a\\b\nc\u00e9\x7f\x01/"}) */
    moe_stat_kv kv = {"k\"", "a\\b\nc\xc3\xa9\x7f\x01/"};
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    moe_log_stats("t", 1, NULL, &kv, 1);
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), "INFO | t | {\"epoch\": 1, \"k\\\"\": \"a\\\\b\\nc\\u00e9\\u007f\\u0001/\"}\n");
    free(s);
}

static void test_log_stats_simple(void **state)
{
    (void)state;
    moe_stat_kv inner[] = {{"loss", "20.714"}, {"moe_gate_loss", " 16.7217 "}, {"wall", "68"}};
    moe_stat_kv epoch[] = {{"train_loss", "4.2"}, {"train_ppl", "18.38"}, {"train_wall", "300"}};
    moe_stat_kv valid[] = {{"valid_loss", "5"}, {"valid_best_loss", "5"}};
    FILE *f = capture_open(MOE_LOG_FORMAT_SIMPLE, 0, MOE_LOG_INFO);
    moe_log_stats("train_inner", 1, "10/3125", inner, 3);
    moe_log_stats("train_inner", 1, "123456/200000", inner, 1);
    moe_log_stats("train_inner", 1, "0.004", inner, 1);
    moe_log_stats("train", 1, NULL, epoch, 3);
    moe_log_stats("valid", 12, NULL, valid, 2);
    char *s = capture_close(f);
    const char *expect[] = {
        "INFO | train_inner | epoch 001:     10 / 3125 loss=20.714, moe_gate_loss=16.7217, wall=68\n",
        "INFO | train_inner | epoch 001:  123456 / 200000 loss=20.714\n",
        "INFO | train_inner | epoch 001:  update 0.004 loss=20.714\n",
        "INFO | train | epoch 001 | loss 4.2 | ppl 18.38 | wall 300\n",
        "INFO | valid | epoch 012 | valid on 'valid' subset | loss 5 | best_loss 5\n",
    };
    const char *p = s;
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        p = after_timestamp(p);
        assert_memory_equal(p, expect[i], strlen(expect[i]));
        p += strlen(expect[i]);
    }
    assert_string_equal(p, "");
    free(s);
}

static void test_log_stats_none_prints_nothing(void **state)
{
    (void)state;
    moe_stat_kv kv = {"loss", "2"};
    FILE *f = capture_open(MOE_LOG_FORMAT_NONE, 0, MOE_LOG_INFO);
    moe_log_stats("train_inner", 1, "10/100", &kv, 1);
    moe_progress_update("epoch 001: 10 / 100");
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "done training in 1.0 seconds");
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), "INFO | fairseq_cli.train | done training in 1.0 seconds\n");
    free(s);
}

/* ------------------------------------------------------------ live progress */

static void test_log_progress_silent_when_not_a_terminal(void **state)
{
    (void)state;
    FILE *f = capture_open(MOE_LOG_FORMAT_JSON, 0, MOE_LOG_INFO);
    moe_progress_update("epoch 001: 3 / 10");
    moe_log(MOE_LOG_INFO, "c", "m");
    moe_progress_clear();
    char *s = capture_close(f);
    assert_string_equal(after_timestamp(s), "INFO | c | m\n");
    free(s);
}

/* Let the pseudo-terminal pass what was written to its other side. */
static void settle(void)
{
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

/* Read what the terminal side received so far (the slave is flushed). */
static size_t pty_drain(int master, char *buf, size_t cap)
{
    size_t n = 0;
    for (;;) {
        if (n + 1 >= cap)
            break;
        ssize_t r = read(master, buf + n, cap - 1 - n);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    return n;
}

static void test_log_progress_on_a_terminal(void **state)
{
    (void)state;
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0) {
        if (master >= 0)
            close(master);
        skip(); /* no pseudo-terminals in this environment */
    }
    int slave_fd = open(ptsname(master), O_RDWR | O_NOCTTY);
    assert_true(slave_fd >= 0);
    /* no output processing ("\n" -> "\r\n"), so the bytes compare exactly */
    struct termios tio;
    assert_int_equal(tcgetattr(slave_fd, &tio), 0);
    tio.c_oflag &= ~(tcflag_t)OPOST;
    assert_int_equal(tcsetattr(slave_fd, TCSANOW, &tio), 0);
    FILE *tty = fdopen(slave_fd, "w");
    assert_non_null(tty);
    int flags = fcntl(master, F_GETFL);
    fcntl(master, F_SETFL, flags | O_NONBLOCK);
    moe_log_configure(tty, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_JSON);
    char buf[4096];

    moe_progress_update("epoch 001: 3 / 10");
    settle();
    pty_drain(master, buf, sizeof buf);
    assert_string_equal(buf, "\r\033[Kepoch 001: 3 / 10");

    moe_progress_update("epoch 001: 4 / 10\nx");
    settle();
    pty_drain(master, buf, sizeof buf);
    assert_string_equal(buf, "\r\033[Kepoch 001: 4 / 10 x"); /* still one row */

    moe_log(MOE_LOG_INFO, "c", "m");
    settle();
    pty_drain(master, buf, sizeof buf);
    /* erased, the line, then the progress line drawn again below it */
    assert_memory_equal(buf, "\r\033[K", 4);
    const char *p = after_timestamp(buf + 4);
    assert_memory_equal(p, "INFO | c | m", 12);
    assert_string_equal(p + 12, "\nepoch 001: 4 / 10 x");

    moe_progress_clear();
    settle();
    pty_drain(master, buf, sizeof buf);
    assert_string_equal(buf, "\r\033[K");
    moe_progress_clear(); /* nothing shown: nothing written */
    moe_log(MOE_LOG_INFO, "c", "n");
    settle();
    pty_drain(master, buf, sizeof buf);
    assert_memory_equal(after_timestamp(buf), "INFO | c | n", 12);

    moe_log_configure(NULL, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    fclose(tty);
    close(master);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_log_format_stat_sample_values),
        cmocka_unit_test(test_log_format_stat_python_rounding),
        cmocka_unit_test(test_log_format_stat_g_style),
        cmocka_unit_test(test_log_parse_format),
        cmocka_unit_test(test_log_line_format),
        cmocka_unit_test(test_log_debug_level),
        cmocka_unit_test(test_log_other_ranks_warn_only_with_prefix),
        cmocka_unit_test(test_log_stats_json_matches_fairseq_line),
        cmocka_unit_test(test_log_stats_json_update_is_python_float),
        cmocka_unit_test(test_log_stats_json_escapes_like_python),
        cmocka_unit_test(test_log_stats_simple),
        cmocka_unit_test(test_log_stats_none_prints_nothing),
        cmocka_unit_test(test_log_progress_silent_when_not_a_terminal),
        cmocka_unit_test(test_log_progress_on_a_terminal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
