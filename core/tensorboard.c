/* tensorboard.c: see tensorboard.h.
 *
 * Protobuf by hand: a field is its key (field number << 3 | wire type:
 * 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32) then its value;
 * nested messages and packed repeated doubles are length-delimited. The
 * field numbers are those of tensorflow/core/util/event.proto and
 * tensorflow/core/framework/summary.proto:
 *   Event          wall_time 1 (double), step 2 (int64), file_version 3
 *                  (string), summary 5 (Summary)
 *   Summary        value 1 (repeated Value)
 *   Summary.Value  tag 1 (string), simple_value 2 (float), histo 5
 *   HistogramProto min 1, max 2, num 3, sum 4, sum_squares 5 (double),
 *                  bucket_limit 6, bucket 7 (packed repeated double)
 */
#include "core/tensorboard.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/internal.h"
#include "core/log.h"

/* ------------------------------------------------------------ CRC-32C */

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* Castagnoli, reflected */
        crc_table[i] = c;
    }
    crc_ready = 1;
}

uint32_t moe_crc32c(const void *data, size_t n)
{
    if (!crc_ready)
        crc_init();
    const unsigned char *p = data;
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

uint32_t moe_tb_masked_crc(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

/* ------------------------------------------------------------ encoding */

typedef struct pbuf {
    unsigned char *p;
    size_t len, cap;
    int failed;
} pbuf;

static void pb_put(pbuf *b, const void *data, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *q = realloc(b->p, cap);
        if (!q) {
            b->failed = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void pb_varint(pbuf *b, uint64_t v)
{
    unsigned char tmp[10];
    size_t n = 0;
    do {
        tmp[n] = (unsigned char)(v & 0x7F);
        v >>= 7;
        if (v)
            tmp[n] |= 0x80;
        n++;
    } while (v);
    pb_put(b, tmp, n);
}

static void pb_key(pbuf *b, unsigned field, unsigned wire) { pb_varint(b, (uint64_t)field << 3 | wire); }

static void le64(unsigned char *o, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        o[i] = (unsigned char)(v >> (8 * i));
}

static void pb_double(pbuf *b, unsigned field, double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    unsigned char o[8];
    le64(o, u);
    pb_key(b, field, 1);
    pb_put(b, o, 8);
}

static void pb_float(pbuf *b, unsigned field, float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    unsigned char o[4] = {(unsigned char)u, (unsigned char)(u >> 8), (unsigned char)(u >> 16),
                          (unsigned char)(u >> 24)};
    pb_key(b, field, 5);
    pb_put(b, o, 4);
}

static void pb_bytes(pbuf *b, unsigned field, const void *data, size_t n)
{
    pb_key(b, field, 2);
    pb_varint(b, n);
    pb_put(b, data, n);
}

static void pb_packed_doubles(pbuf *b, unsigned field, const double *v, int n)
{
    pb_key(b, field, 2);
    pb_varint(b, (uint64_t)n * 8u);
    for (int i = 0; i < n; i++) {
        uint64_t u;
        memcpy(&u, &v[i], sizeof u);
        unsigned char o[8];
        le64(o, u);
        pb_put(b, o, 8);
    }
}

/* ------------------------------------------------------------ files */

typedef struct tb_file {
    char *tag;
    FILE *f;
} tb_file;

struct moe_tb {
    char *dir;
    tb_file *files;
    int n, cap;
    int seq;
};

static moe_status mkdirs(const char *dir)
{
    char at[4096];
    switch (moe_mkdir_p(dir, 0777, at, sizeof at, NULL)) {
    case MOE_MKDIR_OK:
        return MOE_OK;
    case MOE_MKDIR_NOT_DIR:
        return moe_error_set(MOE_ERR_IO, "--tensorboard-logdir '%s': expected a directory, found '%s' is not one",
                             dir, at);
    default:
        return moe_error_set(MOE_ERR_IO, "--tensorboard-logdir '%s': cannot create '%s' (%s)", dir, at,
                             strerror(errno));
    }
}

/* One TFRecord around `data`. */
static moe_status write_record(FILE *f, const pbuf *data, const char *what)
{
    if (data->failed)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory encoding a TensorBoard event");
    unsigned char head[12];
    le64(head, (uint64_t)data->len);
    uint32_t c = moe_tb_masked_crc(moe_crc32c(head, 8));
    for (int i = 0; i < 4; i++)
        head[8 + i] = (unsigned char)(c >> (8 * i));
    uint32_t d = moe_tb_masked_crc(moe_crc32c(data->p, data->len));
    unsigned char tail[4] = {(unsigned char)d, (unsigned char)(d >> 8), (unsigned char)(d >> 16),
                             (unsigned char)(d >> 24)};
    if (fwrite(head, 1, 12, f) != 12 || fwrite(data->p, 1, data->len, f) != data->len || fwrite(tail, 1, 4, f) != 4)
        return moe_error_set(MOE_ERR_IO, "cannot write the TensorBoard event file %s: %s", what, strerror(errno));
    return MOE_OK;
}

static moe_status file_for(moe_tb *tb, const char *tag, FILE **out)
{
    for (int i = 0; i < tb->n; i++)
        if (strcmp(tb->files[i].tag, tag) == 0) {
            *out = tb->files[i].f;
            return MOE_OK;
        }
    if (tb->n == tb->cap) {
        int cap = tb->cap ? 2 * tb->cap : 4;
        tb_file *g = realloc(tb->files, (size_t)cap * sizeof *g);
        if (!g)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        tb->files = g;
        tb->cap = cap;
    }
    size_t dl = strlen(tb->dir) + strlen(tag) + 2;
    char *sub = malloc(dl);
    char host[256] = "localhost";
    if (!sub)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    snprintf(sub, dl, "%s/%s", tb->dir, tag);
    moe_status st = mkdirs(sub);
    if (st != MOE_OK) {
        free(sub);
        return st;
    }
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    size_t pl = dl + strlen(host) + 96;
    char *path = malloc(pl);
    char *tagc = malloc(strlen(tag) + 1);
    if (!path || !tagc) {
        free(sub);
        free(path);
        free(tagc);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    /* torch's SummaryWriter name: events.out.tfevents.<time>.<host>.<pid>.<n> */
    snprintf(path, pl, "%s/events.out.tfevents.%010lld.%s.%ld.%d", sub, (long long)time(NULL), host, (long)getpid(),
             tb->seq++);
    free(sub);
    FILE *f = fopen(path, "wb");
    if (!f) {
        st = moe_error_set(MOE_ERR_IO, "cannot create the TensorBoard event file %s: %s", path, strerror(errno));
        free(path);
        free(tagc);
        return st;
    }
    pbuf b = {0};
    pb_double(&b, 1, moe_wall_s());
    pb_bytes(&b, 3, "brain.Event:2", 13);
    st = write_record(f, &b, path);
    free(b.p);
    free(path);
    if (st != MOE_OK) {
        fclose(f);
        free(tagc);
        return st;
    }
    memcpy(tagc, tag, strlen(tag) + 1);
    tb->files[tb->n].tag = tagc;
    tb->files[tb->n].f = f;
    tb->n++;
    *out = f;
    return MOE_OK;
}

moe_status moe_tb_open(const char *logdir, moe_tb **out)
{
    *out = NULL;
    if (!logdir || !*logdir)
        return moe_error_set(MOE_ERR_INVALID_ARG, "--tensorboard-logdir: expected a directory, found an empty name");
    MOE_TRY(mkdirs(logdir));
    moe_tb *tb = calloc(1, sizeof *tb);
    char *dir = malloc(strlen(logdir) + 1);
    if (!tb || !dir) {
        free(tb);
        free(dir);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    memcpy(dir, logdir, strlen(logdir) + 1);
    tb->dir = dir;
    *out = tb;
    return MOE_OK;
}

void moe_tb_close(moe_tb *tb)
{
    if (!tb)
        return;
    for (int i = 0; i < tb->n; i++) {
        fclose(tb->files[i].f);
        free(tb->files[i].tag);
    }
    free(tb->files);
    free(tb->dir);
    free(tb);
}

moe_status moe_tb_flush(moe_tb *tb)
{
    for (int i = 0; tb && i < tb->n; i++)
        if (fflush(tb->files[i].f) != 0)
            return moe_error_set(MOE_ERR_IO, "cannot write TensorBoard events below %s: %s", tb->dir,
                                 strerror(errno));
    return MOE_OK;
}

/* Event{wall_time, step, summary{value{<value>}}} */
static moe_status write_summary(moe_tb *tb, const char *tag, int64_t step, const pbuf *value)
{
    FILE *f = NULL;
    MOE_TRY(file_for(tb, tag, &f));
    pbuf summary = {0}, ev = {0};
    pb_bytes(&summary, 1, value->p, value->len);
    pb_double(&ev, 1, moe_wall_s());
    pb_key(&ev, 2, 0);
    pb_varint(&ev, (uint64_t)(step < 0 ? 0 : step));
    pb_bytes(&ev, 5, summary.p, summary.len);
    ev.failed |= summary.failed | value->failed;
    moe_status st = write_record(f, &ev, tb->dir);
    free(summary.p);
    free(ev.p);
    return st;
}

moe_status moe_tb_scalar(moe_tb *tb, const char *tag, const char *name, int64_t step, double value)
{
    pbuf v = {0};
    pb_bytes(&v, 1, name, strlen(name));
    pb_float(&v, 2, (float)value);
    moe_status st = write_summary(tb, tag, step, &v);
    free(v.p);
    return st;
}

moe_status moe_tb_histogram(moe_tb *tb, const char *tag, const char *name, int64_t step, double lo, double hi,
                            const double *limits, const double *counts, int n, double num, double sum,
                            double sum_squares)
{
    pbuf h = {0}, v = {0};
    pb_double(&h, 1, lo);
    pb_double(&h, 2, hi);
    pb_double(&h, 3, num);
    pb_double(&h, 4, sum);
    pb_double(&h, 5, sum_squares);
    pb_packed_doubles(&h, 6, limits, n);
    pb_packed_doubles(&h, 7, counts, n);
    pb_bytes(&v, 1, name, strlen(name));
    pb_bytes(&v, 5, h.p, h.len);
    v.failed |= h.failed;
    moe_status st = write_summary(tb, tag, step, &v);
    free(h.p);
    free(v.p);
    return st;
}

moe_status moe_tb_stats(moe_tb *tb, const char *tag, const char *prefix, int64_t step, const moe_stat_kv *kv, int n)
{
    size_t pl = prefix ? strlen(prefix) : 0;
    for (int i = 0; i < n; i++) {
        const char *key = kv[i].key;
        if (pl && strncmp(key, prefix, pl) == 0)
            key += pl;
        if (strcmp(key, "num_updates") == 0)
            continue;
        char *end;
        double v = strtod(kv[i].value, &end);
        while (*end == ' ')
            end++;
        if (end == kv[i].value || *end)
            continue; /* not a number */
        MOE_TRY(moe_tb_scalar(tb, tag, key, step, v));
    }
    return MOE_OK;
}
