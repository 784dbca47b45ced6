/* test_observe.c: what a user sees of a run besides its log, run as a user
 * would: --tensorboard-logdir event files (read back here by a reader of the
 * TFRecord framing and the Event protobuf, CRCs checked, and by TensorBoard's
 * own reader, tests/tb_read.py, when the tensorboard Python package is
 * installed: scripts/test.sh puts it in build-test/tb-venv) and --profile
 * traces (parsed as JSON), on one rank and on 2 MPI ranks.
 *
 * The scalars must be the numbers of the JSON log lines (fairseq's
 * TensorBoard wrapper logs the same rounded values), the expert-load
 * histograms must count every routed token, and the trace must hold the
 * chosen updates' layer, op, communication and optimizer spans.
 */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/tensorboard.h"
#include "runcmd.h"

/* 4 experts, top-2, 2 rows of 16 tokens: 64 routings an update per rank */
#define MODEL                                                                                                    \
    "--cpu --task dummy_lm --tokens-per-sample 16 --dict-size 28 --arch transformer_lm_gpt "                     \
    "--decoder-layers 2 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2 "          \
    "--moe-expert-count 4 --moe-freq 2 --moe-second-expert-policy all --criterion moe_cross_entropy "           \
    "--optimizer adam --lr 0.001 --batch-size 2 --no-progress-bar --no-save --log-format json --log-interval 2 " \
    "--max-update 6 --validate-interval-updates 3 --max-valid-steps 2 "

static char g_dir[64];
static int have_mpirun;

/* ------------------------------------------------------------ event files */

typedef struct tb_value {
    char run[256], tag[96];
    int64_t step;
    int histo;
    double value;                 /* scalar */
    double num, lo, hi;           /* histogram */
    int nb;
    double limits[64], counts[64];
} tb_value;

static tb_value *g_vals;
static int g_nvals;

static uint64_t rd_varint(const unsigned char **p, const unsigned char *end)
{
    uint64_t v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        unsigned char b = *(*p)++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80))
            return v;
    }
    fail_msg("truncated varint");
    return 0;
}

static double rd_double(const unsigned char *p)
{
    uint64_t u = 0;
    for (int i = 7; i >= 0; i--)
        u = u << 8 | p[i];
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* Reads one field; length-delimited and fixed ones set data and len. */
static int rd_field(const unsigned char **p, const unsigned char *end, unsigned *field, unsigned *wire,
                    uint64_t *v, const unsigned char **data, size_t *len)
{
    if (*p >= end)
        return 0;
    uint64_t key = rd_varint(p, end);
    *field = (unsigned)(key >> 3);
    *wire = (unsigned)(key & 7);
    switch (*wire) {
    case 0: *v = rd_varint(p, end); break;
    case 1: assert_true(*p + 8 <= end); *data = *p; *p += 8; break;
    case 5: assert_true(*p + 4 <= end); *data = *p; *p += 4; break;
    case 2:
        *len = (size_t)rd_varint(p, end);
        assert_true(*p + *len <= end);
        *data = *p;
        *p += *len;
        break;
    default: fail_msg("wire type %u", *wire);
    }
    return 1;
}

static void parse_value(const char *run, int64_t step, const unsigned char *p, const unsigned char *end)
{
    tb_value v;
    memset(&v, 0, sizeof v);
    snprintf(v.run, sizeof v.run, "%s", run);
    v.step = step;
    unsigned f, w;
    uint64_t iv;
    const unsigned char *d = NULL;
    size_t n = 0;
    while (rd_field(&p, end, &f, &w, &iv, &d, &n)) {
        if (f == 1 && w == 2)
            snprintf(v.tag, sizeof v.tag, "%.*s", (int)n, (const char *)d);
        else if (f == 2 && w == 5) {
            uint32_t u = (uint32_t)d[0] | (uint32_t)d[1] << 8 | (uint32_t)d[2] << 16 | (uint32_t)d[3] << 24;
            float fl;
            memcpy(&fl, &u, sizeof fl);
            v.value = fl;
        } else if (f == 5 && w == 2) {
            v.histo = 1;
            const unsigned char *q = d, *qe = d + n, *hd = NULL;
            size_t hn = 0;
            while (rd_field(&q, qe, &f, &w, &iv, &hd, &hn)) {
                if (f == 1)
                    v.lo = rd_double(hd);
                else if (f == 2)
                    v.hi = rd_double(hd);
                else if (f == 3)
                    v.num = rd_double(hd);
                else if ((f == 6 || f == 7) && w == 2) {
                    assert_true(hn % 8 == 0 && hn / 8 <= 64);
                    v.nb = (int)(hn / 8);
                    for (int i = 0; i < v.nb; i++)
                        (f == 6 ? v.limits : v.counts)[i] = rd_double(hd + 8 * i);
                }
            }
        }
    }
    g_vals = realloc(g_vals, (size_t)(g_nvals + 1) * sizeof *g_vals);
    assert_non_null(g_vals);
    g_vals[g_nvals++] = v;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Every record of one event file: framing and CRCs checked, events parsed. */
static void read_event_file(const char *run, const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char head[12];
    int first = 1;
    while (fread(head, 1, 12, f) == 12) {
        uint64_t len = 0;
        for (int i = 7; i >= 0; i--)
            len = len << 8 | head[i];
        assert_int_equal(le32(head + 8), moe_tb_masked_crc(moe_crc32c(head, 8)));
        assert_true(len < (1u << 24));
        unsigned char *data = malloc(len + 4);
        assert_non_null(data);
        assert_int_equal(fread(data, 1, len + 4, f), len + 4);
        assert_int_equal(le32(data + len), moe_tb_masked_crc(moe_crc32c(data, len)));
        const unsigned char *p = data, *end = data + len, *d = NULL;
        unsigned fld, w;
        uint64_t iv;
        size_t n = 0;
        int64_t step = 0;
        int has_version = 0;
        while (rd_field(&p, end, &fld, &w, &iv, &d, &n)) {
            if (fld == 2 && w == 0)
                step = (int64_t)iv;
            else if (fld == 3 && w == 2)
                has_version = n == 13 && memcmp(d, "brain.Event:2", 13) == 0;
            else if (fld == 5 && w == 2) {
                const unsigned char *q = d, *qe = d + n, *vd = NULL;
                size_t vn = 0;
                while (rd_field(&q, qe, &fld, &w, &iv, &vd, &vn))
                    if (fld == 1 && w == 2)
                        parse_value(run, step, vd, vd + vn);
            }
        }
        if (first)
            assert_true(has_version); /* the file's first event names the format */
        first = 0;
        free(data);
    }
    assert_true(feof(f));
    fclose(f);
}

static void read_logdir(const char *logdir)
{
    free(g_vals);
    g_vals = NULL;
    g_nvals = 0;
    DIR *d = opendir(logdir);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char sub[512];
        snprintf(sub, sizeof sub, "%s/%s", logdir, e->d_name);
        DIR *d2 = opendir(sub);
        assert_non_null(d2);
        struct dirent *f;
        while ((f = readdir(d2)) != NULL) {
            if (!strstr(f->d_name, "tfevents"))
                continue;
            char path[1024];
            snprintf(path, sizeof path, "%s/%s", sub, f->d_name);
            read_event_file(e->d_name, path);
        }
        closedir(d2);
    }
    closedir(d);
}

static const tb_value *find_value(const char *run, const char *tag, int64_t step)
{
    for (int i = 0; i < g_nvals; i++)
        if (strcmp(g_vals[i].run, run) == 0 && strcmp(g_vals[i].tag, tag) == 0 && g_vals[i].step == step)
            return &g_vals[i];
    return NULL;
}

/* ------------------------------------------------------------ the log */

/* The JSON stats of the log lines of `tag` ("train_inner", "valid"). */
static int log_lines(const char *out, const char *tag, json_t **objs, int max)
{
    char needle[64];
    snprintf(needle, sizeof needle, "| %s | {", tag);
    int n = 0;
    for (const char *p = strstr(out, needle); p && n < max; p = strstr(p + 1, needle)) {
        const char *brace = strchr(p, '{');
        const char *eol = strchr(brace, '\n');
        char *line = strndup(brace, eol ? (size_t)(eol - brace) : strlen(brace));
        json_error_t err;
        objs[n] = json_loads(line, 0, &err);
        if (!objs[n])
            fail_msg("log line is not JSON: %s", line);
        free(line);
        n++;
    }
    return n;
}

/* Every numeric field of the log line is a scalar of `run` at its step. */
static void expect_scalars_match(const char *run, json_t *obj, const char *prefix)
{
    char nu_key[64];
    snprintf(nu_key, sizeof nu_key, "%snum_updates", prefix);
    json_t *nu = json_object_get(obj, nu_key);
    assert_non_null(nu);
    int64_t step = strtoll(json_string_value(nu), NULL, 10);
    const char *key;
    json_t *val;
    int checked = 0;
    json_object_foreach(obj, key, val) {
        if (!json_is_string(val))
            continue;
        const char *k = key;
        if (prefix[0] && strncmp(k, prefix, strlen(prefix)) == 0)
            k += strlen(prefix);
        if (strcmp(k, "num_updates") == 0)
            continue;
        const tb_value *v = find_value(run, k, step);
        if (!v)
            fail_msg("no scalar %s/%s at step %lld", run, k, (long long)step);
        double want = strtod(json_string_value(val), NULL);
        if (fabs(v->value - want) > 1e-6 * fabs(want) + 1e-30 && !(isnan(want) && isnan(v->value)))
            fail_msg("%s/%s at %lld: %.9g in the log, %.9g in TensorBoard", run, k, (long long)step, want, v->value);
        checked++;
    }
    assert_true(checked >= 5);
}

static void check_logdir_against_log(const char *logdir, const char *out, int world)
{
    read_logdir(logdir);
    json_t *objs[16];
    int n = log_lines(out, "train_inner", objs, 16);
    assert_int_equal(n, 3); /* updates 2, 4, 6 */
    for (int i = 0; i < n; i++) {
        expect_scalars_match("train_inner", objs[i], "");
        int64_t step = 2 * (i + 1);
        /* expert load: every token's two choices (policy all), on every rank */
        const tb_value *h = find_value("train_inner", "expert_load/decoder.layers.1", step);
        if (!h)
            fail_msg("no expert_load histogram at step %lld", (long long)step);
        assert_true(h->histo);
        assert_int_equal(h->nb, 4);
        double total = 0;
        for (int e = 0; e < 4; e++) {
            assert_true(fabs(h->limits[e] - (e + 0.5)) < 1e-12);
            total += h->counts[e];
        }
        assert_true(fabs(total - 64.0 * world) < 1e-9);
        assert_true(fabs(h->num - 64.0 * world) < 1e-9);
        assert_true(h->lo == -0.5 && h->hi == 3.5);
        assert_non_null(find_value("train_inner", "expert_dropped/decoder.layers.1", step));
        json_decref(objs[i]);
    }
    n = log_lines(out, "valid", objs, 16);
    assert_int_equal(n, 2); /* updates 3 and 6 */
    for (int i = 0; i < n; i++) {
        expect_scalars_match("valid", objs[i], "valid_");
        json_decref(objs[i]);
    }
    n = log_lines(out, "train", objs, 16);
    assert_int_equal(n, 1); /* the epoch's end */
    expect_scalars_match("train", objs[0], "train_");
    json_decref(objs[0]);
}

/* TensorBoard's own reader, when it is installed. */
static void check_with_tensorboard(const char *logdir)
{
    char py[1024];
    snprintf(py, sizeof py, "%s/../tb-venv/bin/python", MOE_TEST_BIN_DIR);
    if (access(py, X_OK) != 0)
        snprintf(py, sizeof py, "python3");
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s %s/tests/tb_read.py %s", py, MOE_TEST_SOURCE_DIR, logdir);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status == 77 || r.status == 127) {
        printf("SKIP (TensorBoard's reader): the tensorboard Python package is not installed (scripts/test.sh "
               "installs it into build-test/tb-venv); the event files were read by this test's own reader\n");
        moe_cmd_result_free(&r);
        return;
    }
    if (r.status != 0)
        fail_msg("tb_read.py failed (%d): %s", r.status, r.err);
    json_error_t err;
    json_t *all = json_loads(r.out, 0, &err);
    assert_non_null(all);
    /* every scalar and histogram this test read is there, with the same value */
    int seen = 0;
    for (int i = 0; i < g_nvals; i++) {
        const tb_value *v = &g_vals[i];
        json_t *series = json_object_get(json_object_get(json_object_get(all, v->run), v->histo ? "histograms"
                                                                                                : "scalars"),
                                         v->tag);
        if (!series)
            fail_msg("TensorBoard's reader has no %s/%s", v->run, v->tag);
        size_t k;
        json_t *row;
        int found = 0;
        json_array_foreach(series, k, row) {
            if (json_integer_value(json_array_get(row, 0)) != v->step)
                continue;
            double got = json_number_value(json_array_get(row, 1));
            double want = v->histo ? v->num : v->value;
            if (fabs(got - want) > 1e-6 * fabs(want))
                fail_msg("%s/%s at %lld: TensorBoard reads %.9g, expected %.9g", v->run, v->tag, (long long)v->step,
                         got, want);
            found = 1;
        }
        assert_true(found);
        seen++;
    }
    assert_true(seen > 50);
    printf("TensorBoard's reader agrees on %d values\n", seen);
    json_decref(all);
    moe_cmd_result_free(&r);
}

/* ------------------------------------------------------------ the trace */

static void check_trace(const char *path, int world)
{
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    if (!root)
        fail_msg("%s is not JSON: %s (line %d)", path, err.text, err.line);
    json_t *ev = json_object_get(root, "traceEvents");
    assert_true(json_is_array(ev));
    int layer_fwd[2] = {0, 0}, layer_bwd[2] = {0, 0}, optim = 0, comm = 0, ops = 0, updates = 0;
    int rows[8] = {0};
    size_t i;
    json_t *e;
    json_array_foreach(ev, i, e) {
        const char *ph = json_string_value(json_object_get(e, "ph"));
        const char *name = json_string_value(json_object_get(e, "name"));
        int pid = (int)json_integer_value(json_object_get(e, "pid"));
        if (strcmp(ph, "M") == 0 && strcmp(name, "process_name") == 0) {
            char want[32];
            snprintf(want, sizeof want, "rank %d", pid);
            assert_string_equal(json_string_value(json_object_get(json_object_get(e, "args"), "name")), want);
            rows[pid] = 1;
            continue;
        }
        if (strcmp(ph, "X") != 0)
            continue;
        const char *cat = json_string_value(json_object_get(e, "cat"));
        json_int_t u = json_integer_value(json_object_get(json_object_get(e, "args"), "update"));
        assert_true(u == 3 || u == 4);
        assert_true(json_number_value(json_object_get(e, "dur")) >= 0);
        for (int l = 0; l < 2; l++) {
            char lname[32];
            snprintf(lname, sizeof lname, "decoder.layers.%d", l);
            if (strcmp(name, lname) == 0) {
                layer_fwd[l] += strcmp(cat, "forward") == 0;
                layer_bwd[l] += strcmp(cat, "backward") == 0;
            }
        }
        optim += strcmp(name, "adam_step") == 0 && strcmp(cat, "optimizer") == 0;
        comm += strcmp(cat, "communication") == 0;
        ops += strcmp(name, "matmul") == 0 || strcmp(name, "attention_backward") == 0;
        updates += strcmp(name, "update") == 0;
    }
    for (int r = 0; r < world; r++)
        assert_true(rows[r]);
    /* two updates on every rank: each layer's forward and backward */
    for (int l = 0; l < 2; l++) {
        assert_int_equal(layer_fwd[l], 2 * world);
        assert_int_equal(layer_bwd[l], 2 * world);
    }
    assert_int_equal(updates, 2 * world);
    assert_true(optim >= 2 * world);
    assert_true(comm >= 2 * world); /* the statistics all-reduce, at least */
    assert_true(ops > 20);
    json_decref(root);
}

/* ------------------------------------------------------------ tests */

static void run_observed(const char *launcher, int world)
{
    char logdir[128], trace[128], cmd[2048];
    snprintf(logdir, sizeof logdir, "%s/tb-%d", g_dir, world);
    snprintf(trace, sizeof trace, "%s/trace-%d.json", g_dir, world);
    snprintf(cmd, sizeof cmd, "%s%s/moelm-train " MODEL "--tensorboard-logdir %s --profile %s --profile-updates 3-4",
             launcher, MOE_TEST_BIN_DIR, logdir, trace);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 0)
        fail_msg("status %d:\n%s\n%s", r.status, r.out, r.err);
    assert_non_null(strstr(r.out, "wrote the trace of updates 3-4"));
    /* watching changes nothing: the same run unobserved logs the same numbers */
    snprintf(cmd, sizeof cmd, "%s%s/moelm-train " MODEL, launcher, MOE_TEST_BIN_DIR);
    moe_cmd_result plain;
    assert_int_equal(moe_run_shell(cmd, &plain), 0);
    assert_int_equal(plain.status, 0);
    json_t *a[16], *b[16];
    int na = log_lines(r.out, "train_inner", a, 16), nb = log_lines(plain.out, "train_inner", b, 16);
    assert_int_equal(na, nb);
    for (int i = 0; i < na; i++) {
        const char *keys[] = {"loss", "moe_gate_loss", "gnorm", "inner_loss", "expert1_balance_top"};
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++)
            assert_string_equal(json_string_value(json_object_get(a[i], keys[k])),
                                json_string_value(json_object_get(b[i], keys[k])));
        json_decref(a[i]);
        json_decref(b[i]);
    }
    moe_cmd_result_free(&plain);
    check_logdir_against_log(logdir, r.out, world);
    check_with_tensorboard(logdir);
    check_trace(trace, world);
    moe_cmd_result_free(&r);
}

static void test_observe_one_rank(void **s)
{
    (void)s;
    run_observed("", 1);
}

static void test_observe_two_ranks(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        return;
    }
    run_observed("mpirun --oversubscribe -np 2 ", 2);
}

/* the writer's primitives against known answers */
static void test_observe_crc32c(void **s)
{
    (void)s;
    assert_int_equal(moe_crc32c("123456789", 9), 0xE3069283u); /* the CRC-32C check value */
    assert_int_equal(moe_crc32c("", 0), 0u);
    /* TFRecord's mask: rotate right 15, add 0xa282ead8 */
    assert_int_equal(moe_tb_masked_crc(0), 0xa282ead8u);
    assert_int_equal(moe_tb_masked_crc(0xE3069283u), ((0xE3069283u >> 15) | (0xE3069283u << 17)) + 0xa282ead8u);
}

static void test_observe_bad_arguments(void **s)
{
    (void)s;
    moe_cmd_result r;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--profile %s/t.json --profile-updates 5-3", MOE_TEST_BIN_DIR,
             g_dir);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_equal(r.status, 2);
    assert_non_null(strstr(r.err, "--profile-updates"));
    moe_cmd_result_free(&r);
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--profile %s/no/such/dir/t.json", MOE_TEST_BIN_DIR, g_dir);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_equal(r.status, 2);
    assert_non_null(strstr(r.err, "--profile"));
    moe_cmd_result_free(&r);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/moelm-test-observe-XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    have_mpirun = moe_mpirun_prepare();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_observe_crc32c),
        cmocka_unit_test_setup_teardown(test_observe_one_rank, setup, teardown),
        cmocka_unit_test_setup_teardown(test_observe_two_ranks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_observe_bad_arguments, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    free(g_vals);
    return rc;
}
