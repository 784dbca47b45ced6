/* profile.c: see profile.h.
 *
 * Spans are kept in one growing array per process while recording, with a
 * stack of the open ones. With device timers each begin and end holds a
 * marker; they are turned into times when the file is written (after a
 * synchronize), against a marker queued when recording started. Writing:
 * every rank formats its spans as JSON text; the lengths and the ranks'
 * wall-clock origins are all-gathered, then the texts (padded to 4-byte
 * words and moved as fp32 elements: collectives only copy them), and rank 0
 * writes one file.
 */
#include "core/profile.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/log.h"

#define MAX_DEPTH 64

typedef struct span {
    const char *name;
    int cat;
    int64_t update;
    double t0, t1;     /* host: microseconds since the recording origin */
    void *m0, *m1;     /* device markers, or NULL */
} span;

static const char *const cat_names[MOE_PROF_NCATS] = {"step", "forward", "backward", "communication", "optimizer",
                                                      "other"};

static struct {
    char *path;
    int64_t first, last;
    int wanted;
    int recording;
    int written;
    const moe_host *h;
    span *spans;
    int n, cap;
    int stack[MAX_DEPTH];
    int depth;
    int64_t update;
    double mono0, real0;   /* the recording origin: monotonic and wall clock, seconds */
    void *origin_mark;     /* device marker at the origin */
    int dropped;           /* spans lost to a failed allocation */
} P;

static int device_timers(void)
{
    const moe_backend_ops *be = P.h ? P.h->backend : NULL;
    return be && be->timer_mark && be->timer_elapsed_ms && be->timer_free;
}

static void *mark(void)
{
    void *m = NULL;
    if (device_timers() && P.h->backend->timer_mark(P.h->ctx, &m) != MOE_OK) {
        moe_error_clear();
        m = NULL;
    }
    return m;
}

moe_status moe_profile_configure(const char *path, const char *updates)
{
    moe_profile_reset();
    if (!path || !*path)
        return MOE_OK;
    long long a = 0, b = 0;
    int end = 0;
    const char *u = updates && *updates ? updates : "2-3";
    if (sscanf(u, "%lld-%lld%n", &a, &b, &end) == 2 && u[end] == '\0') {
    } else if (sscanf(u, "%lld%n", &a, &end) == 1 && u[end] == '\0') {
        b = a;
    } else {
        a = b = 0;
    }
    if (a < 1 || b < a || b > 1000000000000LL)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "argument --profile-updates: expected an update N or a range N-M of updates (1 <= N <= "
                             "M), found '%s'",
                             u);
    P.path = malloc(strlen(path) + 1);
    if (!P.path)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    memcpy(P.path, path, strlen(path) + 1);
    FILE *f = fopen(path, "w"); /* fail now, not after the profiled updates */
    if (!f)
        return moe_error_set(MOE_ERR_INVALID_ARG, "--profile '%s': expected a file that can be written, found %s",
                             path, strerror(errno));
    fclose(f);
    P.first = a;
    P.last = b;
    P.wanted = 1;
    return MOE_OK;
}

int moe_profile_wanted(void) { return P.wanted; }

void moe_profile_attach(const moe_host *h) { P.h = h; }

void moe_profile_step_begin(int64_t update)
{
    P.update = update;
    if (!P.wanted || P.written || update < P.first || update > P.last || P.recording)
        return;
    P.recording = 1;
    if (device_timers()) {
        P.h->backend->synchronize(P.h->ctx); /* the origin is "now" for the device too */
        moe_error_clear();
        P.origin_mark = mark();
    }
    P.mono0 = moe_mono_s();
    P.real0 = moe_wall_s();
}

int moe_profile_begin(int cat, const char *name)
{
    if (!P.recording)
        return -1;
    if (cat == MOE_PROF_INHERIT)
        cat = P.depth > 0 ? P.spans[P.stack[P.depth - 1]].cat : MOE_PROF_OTHER;
    if (P.depth == MAX_DEPTH)
        return -1;
    if (P.n == P.cap) {
        int cap = P.cap ? 2 * P.cap : 4096;
        span *s = realloc(P.spans, (size_t)cap * sizeof *s);
        if (!s) {
            P.dropped++;
            return -1;
        }
        P.spans = s;
        P.cap = cap;
    }
    span *s = &P.spans[P.n];
    s->name = name;
    s->cat = cat;
    s->update = P.update;
    s->m0 = mark();
    s->m1 = NULL;
    s->t0 = (moe_mono_s() - P.mono0) * 1e6;
    s->t1 = s->t0;
    P.stack[P.depth++] = P.n;
    return P.n++;
}

void moe_profile_end(int id)
{
    if (!P.recording || id < 0)
        return;
    int at = -1;
    for (int d = P.depth - 1; d >= 0 && at < 0; d--)
        if (P.stack[d] == id)
            at = d;
    if (at < 0)
        return;
    double t = (moe_mono_s() - P.mono0) * 1e6;
    for (int d = P.depth - 1; d >= at; d--) {
        span *s = &P.spans[P.stack[d]];
        s->t1 = t;
        s->m1 = mark(); /* a marker of its own: each span frees its two */
    }
    P.depth = at;
}

/* ------------------------------------------------------------ output */

typedef struct text {
    char *p;
    size_t len, cap;
    int failed;
} text;

static void tput(text *t, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void tput(text *t, const char *fmt, ...)
{
    if (t->failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    if (n < 0) {
        t->failed = 1;
        va_end(ap);
        return;
    }
    if (t->len + (size_t)n + 1 > t->cap) {
        size_t cap = 2 * (t->len + (size_t)n + 1);
        char *p = realloc(t->p, cap < 65536 ? 65536 : cap);
        if (!p) {
            t->failed = 1;
            va_end(ap);
            return;
        }
        t->p = p;
        t->cap = cap < 65536 ? 65536 : cap;
    }
    vsnprintf(t->p + t->len, (size_t)n + 1, fmt, ap);
    t->len += (size_t)n;
    va_end(ap);
}

/* JSON string content: names are identifiers, but quote what could break it */
static void tput_name(text *t, const char *s)
{
    for (const char *c = s ? s : "?"; *c; c++) {
        if (*c == '"' || *c == '\\')
            tput(t, "\\%c", *c);
        else if ((unsigned char)*c < 0x20)
            tput(t, "\\u%04x", (unsigned)(unsigned char)*c);
        else
            tput(t, "%c", *c);
    }
}

/* This rank's events, times relative to `origin` (wall clock, seconds). */
static void format_rank(text *t, int rank, double origin)
{
    int dev = device_timers() && P.origin_mark;
    if (dev) {
        P.h->backend->synchronize(P.h->ctx);
        moe_error_clear();
    }
    double shift = (P.real0 - origin) * 1e6;
    tput(t, "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"name\":\"rank %d\"}},\n", rank, rank);
    tput(t, "{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"sort_index\":%d}},\n", rank, rank);
    tput(t, "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":\"%s\"}},\n", rank,
         dev ? "compute stream (device timers)" : "host (wall time)");
    for (int i = 0; i < P.n; i++) {
        span *s = &P.spans[i];
        double t0 = s->t0, t1 = s->t1;
        if (dev && s->m0 && s->m1) {
            double a = 0, b = 0;
            if (P.h->backend->timer_elapsed_ms(P.h->ctx, P.origin_mark, s->m0, &a) == MOE_OK &&
                P.h->backend->timer_elapsed_ms(P.h->ctx, P.origin_mark, s->m1, &b) == MOE_OK) {
                t0 = a * 1e3;
                t1 = b * 1e3;
            }
            moe_error_clear();
        }
        tput(t, "{\"name\":\"");
        tput_name(t, s->name);
        tput(t, "\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":%d,\"tid\":0,\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"update\":%lld}},\n",
             cat_names[s->cat], rank, t0 + shift, t1 > t0 ? t1 - t0 : 0.0, (long long)s->update);
    }
}

static void free_marks(void)
{
    if (!device_timers())
        return;
    for (int i = 0; i < P.n; i++) {
        if (P.spans[i].m0)
            P.h->backend->timer_free(P.h->ctx, P.spans[i].m0);
        if (P.spans[i].m1)
            P.h->backend->timer_free(P.h->ctx, P.spans[i].m1);
        P.spans[i].m0 = P.spans[i].m1 = NULL;
    }
    if (P.origin_mark)
        P.h->backend->timer_free(P.h->ctx, P.origin_mark);
    P.origin_mark = NULL;
}

/* all_gather of `n` doubles per rank through backend memory */
static moe_status gather(const moe_host *h, const void *mine, void *all, int64_t n, moe_dtype dt)
{
    void *send = NULL, *recv = NULL;
    uint64_t bytes = (uint64_t)n * moe_dtype_size(dt);
    moe_status st = h->backend->alloc(h->ctx, bytes, "profile gather (send)", &send);
    if (st == MOE_OK)
        st = h->backend->alloc(h->ctx, bytes * (uint64_t)h->world, "profile gather (receive)", &recv);
    if (st == MOE_OK)
        st = h->backend->copy_from_host(h->ctx, send, mine, bytes);
    if (st == MOE_OK)
        st = h->comm_ops->all_gather(h->comm, NULL, recv, send, n, dt);
    if (st == MOE_OK)
        st = h->backend->copy_to_host(h->ctx, all, recv, bytes * (uint64_t)h->world);
    if (send)
        h->backend->free(h->ctx, send);
    if (recv)
        h->backend->free(h->ctx, recv);
    return st;
}

static moe_status write_file(void)
{
    P.recording = 0;
    P.written = 1;
    const moe_host *h = P.h;
    int world = h && h->world > 1 && h->comm_ops ? h->world : 1, rank = world > 1 ? h->rank : 0;
    double origin = P.real0;
    text t = {0};
    char *all = NULL;
    double *meta = NULL;
    moe_status st = MOE_OK;
    if (world > 1) {
        /* origins first: every rank formats against the earliest */
        double mine[2] = {P.real0, 0};
        meta = malloc((size_t)world * 2 * sizeof *meta);
        if (!meta)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing the profile");
        MOE_TRY_GOTO(st, gather(h, mine, meta, 2, MOE_F64), done);
        for (int r = 0; r < world; r++)
            origin = meta[2 * r] < origin ? meta[2 * r] : origin;
    }
    format_rank(&t, rank, origin);
    if (t.failed) {
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory formatting the profile");
        goto done;
    }
    size_t longest = t.len;
    if (world > 1) {
        double mine[2] = {(double)t.len, 0};
        MOE_TRY_GOTO(st, gather(h, mine, meta, 2, MOE_F64), done);
        for (int r = 0; r < world; r++)
            longest = (size_t)meta[2 * r] > longest ? (size_t)meta[2 * r] : longest;
        size_t words = (longest + 3) / 4;
        char *pad = calloc(words, 4);
        all = malloc(words * 4 * (size_t)world);
        if (!pad || !all) {
            free(pad);
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory gathering the profile");
            goto done;
        }
        memcpy(pad, t.p ? t.p : "", t.len);
        st = gather(h, pad, all, (int64_t)words, MOE_F32);
        free(pad);
        if (st != MOE_OK)
            goto done;
    }
    if (rank == 0) {
        FILE *f = fopen(P.path, "w");
        if (!f) {
            st = moe_error_set(MOE_ERR_IO, "--profile '%s': cannot write it: %s", P.path, strerror(errno));
            goto done;
        }
        fputs("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n", f);
        if (world > 1) {
            size_t words = (longest + 3) / 4;
            for (int r = 0; r < world; r++)
                fwrite(all + (size_t)r * words * 4, 1, (size_t)meta[2 * r], f);
        } else if (t.p) {
            fwrite(t.p, 1, t.len, f);
        }
        /* a last event without a trailing comma */
        fprintf(f, "{\"name\":\"moelm profile\",\"ph\":\"M\",\"pid\":0,\"args\":{\"updates\":\"%lld-%lld\"}}\n]}\n",
                (long long)P.first, (long long)P.last);
        if (fclose(f) != 0)
            st = moe_error_set(MOE_ERR_IO, "--profile '%s': cannot write it: %s", P.path, strerror(errno));
        else
            moe_log(MOE_LOG_INFO, "moelm.profile", "wrote the trace of updates %lld-%lld to %s (%d spans on rank 0%s)",
                    (long long)P.first, (long long)P.last, P.path, P.n, P.dropped ? ", some lost to memory" : "");
    }
done:
    free(t.p);
    free(all);
    free(meta);
    free_marks();
    free(P.spans);
    P.spans = NULL;
    P.n = P.cap = P.depth = 0;
    return st;
}

moe_status moe_profile_step_end(int64_t num_updates)
{
    if (!P.recording)
        return MOE_OK;
    if (num_updates < P.last)
        return MOE_OK;
    return write_file();
}

moe_status moe_profile_finish(void)
{
    moe_status st = MOE_OK;
    if (P.wanted && !P.written) {
        if (!P.recording)
            moe_log(MOE_LOG_WARNING, "moelm.profile",
                    "--profile-updates %lld-%lld: training ended before them; %s holds no spans", (long long)P.first,
                    (long long)P.last, P.path);
        st = write_file();
    }
    return st;
}

void moe_profile_reset(void)
{
    if (P.spans)
        free_marks();
    free(P.spans);
    free(P.path);
    memset(&P, 0, sizeof P);
}
