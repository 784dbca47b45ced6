/* checkpoint.c: see checkpoint.h for the file format. */
#include "core/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "core/internal.h"

static const char MAGIC[8] = {'M', 'O', 'E', 'L', 'M', 'C', 'K', 'P'};
static const char END_MAGIC[8] = {'M', 'O', 'E', 'L', 'M', 'E', 'N', 'D'};
#define NAME_FIELD 64
#define CHUNK_BYTES ((uint64_t)16 << 20) /* host staging buffer */
#define TRAILER_BYTES 16u

/* ------------------------------------------------------------- checksum */

/* 64-bit words (little-endian) folded by xor, multiply by an odd constant
 * and xor-shift: each step is a bijection of the state, so any one changed
 * word changes the sum. The tail word carries its byte count, then the total
 * length is folded in. Independent of how the stream is chunked. */
typedef struct ck_hash {
    uint64_t h, pend, len;
    int npend;
} ck_hash;

static void ck_word(ck_hash *c, uint64_t w)
{
    c->h = (c->h ^ w) * 0x9E3779B97F4A7C15ull;
    c->h ^= c->h >> 32;
}

static void ck_init(ck_hash *c)
{
    memset(c, 0, sizeof *c);
    c->h = 0xcbf29ce484222325ull;
}

static void ck_update(ck_hash *c, const void *p, size_t n)
{
    const unsigned char *b = p;
    c->len += n;
    while (n > 0 && c->npend > 0) {
        c->pend |= (uint64_t)*b++ << (8 * c->npend);
        n--;
        if (++c->npend == 8) {
            ck_word(c, c->pend);
            c->pend = 0;
            c->npend = 0;
        }
    }
    for (; n >= 8; n -= 8, b += 8) {
        uint64_t w;
        memcpy(&w, b, 8); /* little-endian hosts only (checked) */
        ck_word(c, w);
    }
    for (; n > 0; n--) {
        c->pend |= (uint64_t)*b++ << (8 * c->npend);
        c->npend++;
    }
}

static uint64_t ck_final(const ck_hash *c0)
{
    ck_hash c = *c0;
    if (c.npend)
        ck_word(&c, c.pend | ((uint64_t)c.npend << 56));
    ck_word(&c, c.len);
    return c.h;
}

static int little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* --------------------------------------------------------------- header */

typedef struct buf {
    unsigned char *p;
    size_t n, cap;
    int oom;
} buf;

static void put(buf *b, const void *src, size_t n)
{
    if (b->oom)
        return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 1024;
        while (cap < b->n + n)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_i32(buf *b, int32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_i64(buf *b, int64_t v) { put(b, &v, 8); }
static void put_f64(buf *b, double v) { put(b, &v, 8); }
static void put_name(buf *b, const char *s)
{
    char field[NAME_FIELD] = {0};
    snprintf(field, sizeof field, "%s", s ? s : "");
    put(b, field, sizeof field);
}

typedef struct cur {
    const unsigned char *p;
    size_t n, at;
    int short_read;
} cur;

static void get(cur *c, void *dst, size_t n)
{
    if (c->at + n > c->n) {
        c->short_read = 1;
        memset(dst, 0, n);
        return;
    }
    memcpy(dst, c->p + c->at, n);
    c->at += n;
}
static uint32_t get_u32(cur *c) { uint32_t v; get(c, &v, 4); return v; }
static int32_t get_i32(cur *c) { int32_t v; get(c, &v, 4); return v; }
static uint64_t get_u64(cur *c) { uint64_t v; get(c, &v, 8); return v; }
static int64_t get_i64(cur *c) { int64_t v; get(c, &v, 8); return v; }
static double get_f64(cur *c) { double v; get(c, &v, 8); return v; }
static void get_name(cur *c, char *out)
{
    get(c, out, NAME_FIELD);
    out[NAME_FIELD - 1] = '\0';
}

static const char *dtype_name(uint32_t d)
{
    switch (d) {
    case MOE_F32: return "fp32";
    case MOE_F16: return "fp16";
    case MOE_BF16: return "bf16";
    default: return "?";
    }
}

static uint64_t opt_state_bytes(const moe_ckpt_run *run)
{
    return run->opt_ops->state_bytes && run->opt ? run->opt_ops->state_bytes(run->opt) : 0;
}

/* bytes of a unit's data in the file */
static uint64_t unit_data_bytes(const moe_unit_info *u, moe_dtype act)
{
    uint64_t b = (uint64_t)u->shard * moe_dtype_size(act);
    if (u->master)
        b += (uint64_t)u->shard * 4u;
    return b;
}

static void build_header(const moe_ckpt_run *run, const moe_ckpt_state *s, buf *b)
{
    const moe_host *h = moe_runtime_host(run->rt);
    int n = moe_runtime_num_units(run->rt);
    int any_master = 0, sharded = 0;
    uint64_t data = 0;
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        any_master |= u.master != NULL;
        sharded |= u.sharded;
        data += unit_data_bytes(&u, h->act_dtype);
    }
    data += opt_state_bytes(run);
    put(b, MAGIC, 8);
    put_u32(b, MOE_CKPT_VERSION);
    put_u32(b, 0);   /* header bytes, patched below */
    put_u64(b, 0);   /* file bytes, patched below */
    put_u32(b, (uint32_t)h->world);
    put_u32(b, (uint32_t)h->rank);
    put_u32(b, (uint32_t)h->act_dtype);
    put_u32(b, (uint32_t)h->grad_dtype);
    put_u32(b, (uint32_t)any_master);
    put_u32(b, (uint32_t)sharded);
    put_name(b, run->arch);
    put_name(b, run->optimizer);
    put_i64(b, s->num_updates);
    put_i64(b, s->epoch);
    put_i64(b, s->iter);
    put_u32(b, (uint32_t)s->end_of_epoch);
    put_u32(b, (uint32_t)s->has_scaler);
    put_f64(b, s->best_valid_loss);
    put_f64(b, s->scaler.scale);
    put_i64(b, s->scaler.scale_window);
    put_i64(b, s->scaler.iter);
    put_i64(b, s->scaler.last_overflow_iter);
    put_i64(b, s->scaler.last_rescale_iter);
    put_i64(b, s->scaler.overflows_since_rescale);
    put_u64(b, opt_state_bytes(run));
    put_u32(b, (uint32_t)n);
    put_u32(b, 0);
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        size_t len = strlen(u.name);
        put_i32(b, u.expert_index);
        put_u32(b, (uint32_t)u.sharded);
        put_u32(b, u.master != NULL);
        put_u32(b, (uint32_t)len);
        put_i64(b, u.numel);
        put_i64(b, u.padded);
        put_i64(b, u.shard);
        put(b, u.name, len);
    }
    if (b->oom)
        return;
    uint32_t hb = (uint32_t)b->n;
    uint64_t fb = b->n + data + TRAILER_BYTES;
    memcpy(b->p + 12, &hb, 4);
    memcpy(b->p + 16, &fb, 8);
}

/* ---------------------------------------------------------------- write */

typedef struct writer {
    FILE *f;
    const char *path;
    ck_hash ck;
} writer;

static moe_status w_bytes(writer *w, const void *p, size_t n)
{
    ck_update(&w->ck, p, n);
    if (n && fwrite(p, 1, n, w->f) != n)
        return moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", w->path, strerror(errno));
    return MOE_OK;
}

/* backend memory, through the staging buffer */
static moe_status w_device(writer *w, const moe_host *h, const void *dev, uint64_t bytes, void *stage)
{
    for (uint64_t off = 0; off < bytes; off += CHUNK_BYTES) {
        uint64_t m = bytes - off < CHUNK_BYTES ? bytes - off : CHUNK_BYTES;
        MOE_TRY(h->backend->copy_to_host(h->ctx, stage, (const char *)dev + off, m));
        MOE_TRY(w_bytes(w, stage, (size_t)m));
    }
    return MOE_OK;
}

static moe_status write_body(const moe_ckpt_run *run, const moe_ckpt_state *s, writer *w, void *stage)
{
    const moe_host *h = moe_runtime_host(run->rt);
    buf hdr = {0};
    build_header(run, s, &hdr);
    if (hdr.oom) {
        free(hdr.p);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing checkpoint %s", w->path);
    }
    moe_status st = w_bytes(w, hdr.p, hdr.n);
    free(hdr.p);
    MOE_TRY(st);
    MOE_TRY(h->backend->synchronize(h->ctx));
    int n = moe_runtime_num_units(run->rt);
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        const void *param = u.sharded ? u.param_shard : u.param;
        if (u.shard > 0 && !param)
            return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit '%s' has no parameters to save", u.name);
        MOE_TRY(w_device(w, h, param, (uint64_t)u.shard * moe_dtype_size(h->act_dtype), stage));
        if (u.master)
            MOE_TRY(w_device(w, h, u.master, (uint64_t)u.shard * 4u, stage));
    }
    uint64_t ob = opt_state_bytes(run);
    for (uint64_t off = 0; off < ob; off += CHUNK_BYTES) {
        uint64_t m = ob - off < CHUNK_BYTES ? ob - off : CHUNK_BYTES;
        MOE_TRY(run->opt_ops->save_state(run->opt, off, stage, m));
        MOE_TRY(w_bytes(w, stage, (size_t)m));
    }
    uint64_t sum = ck_final(&w->ck);
    if (fwrite(&sum, 1, 8, w->f) != 8 || fwrite(END_MAGIC, 1, 8, w->f) != 8)
        return moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", w->path, strerror(errno));
    return MOE_OK;
}

static void fsync_dir_of(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

moe_status moe_ckpt_save(const moe_ckpt_run *run, const moe_ckpt_state *s, const char *path)
{
    if (!little_endian())
        return moe_error_set(MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (opt_state_bytes(run) > 0 && !run->opt_ops->save_state)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "optimizer %s reports state but cannot save it", run->optimizer);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    void *stage = malloc(CHUNK_BYTES);
    if (!stage)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory for the checkpoint staging buffer");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    FILE *f = fd >= 0 ? fdopen(fd, "wb") : NULL;
    if (!f) {
        moe_status e = moe_error_set(MOE_ERR_IO, "cannot create checkpoint %s: %s", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
        free(stage);
        return e;
    }
    writer w = {f, path, {0, 0, 0, 0}};
    ck_init(&w.ck);
    moe_status st = write_body(run, s, &w, stage);
    free(stage);
    if (st == MOE_OK && fflush(f) != 0)
        st = moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", tmp, strerror(errno));
    if (st == MOE_OK && fsync(fileno(f)) != 0)
        st = moe_error_set(MOE_ERR_IO, "cannot sync checkpoint %s: %s", tmp, strerror(errno));
    if (fclose(f) != 0 && st == MOE_OK)
        st = moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", tmp, strerror(errno));
    if (st == MOE_OK && rename(tmp, path) != 0)
        st = moe_error_set(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st != MOE_OK) {
        unlink(tmp);
        return st;
    }
    fsync_dir_of(path);
    return MOE_OK;
}

/* ----------------------------------------------------------------- read */

typedef struct reader {
    FILE *f;
    const char *path;
    ck_hash ck;
} reader;

static moe_status r_bytes(reader *r, void *p, size_t n)
{
    if (n && fread(p, 1, n, r->f) != n)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated (read failed: %s)", r->path,
                             ferror(r->f) ? strerror(errno) : "end of file");
    ck_update(&r->ck, p, n);
    return MOE_OK;
}

static moe_status r_device(reader *r, const moe_host *h, void *dev, uint64_t bytes, void *stage)
{
    for (uint64_t off = 0; off < bytes; off += CHUNK_BYTES) {
        uint64_t m = bytes - off < CHUNK_BYTES ? bytes - off : CHUNK_BYTES;
        MOE_TRY(r_bytes(r, stage, (size_t)m));
        if (dev)
            MOE_TRY(h->backend->copy_from_host(h->ctx, (char *)dev + off, stage, m));
    }
    return MOE_OK;
}

/* header fields against this run: the first difference, in one line */
static moe_status check_header(const moe_ckpt_run *run, const char *path, cur *c, int load_optimizer,
                               moe_ckpt_state *s, uint64_t *opt_bytes)
{
    const moe_host *h = moe_runtime_host(run->rt);
    uint32_t world = get_u32(c), rank = get_u32(c), act = get_u32(c), grad = get_u32(c);
    uint32_t master = get_u32(c), sharded = get_u32(c);
    char arch[NAME_FIELD], optimizer[NAME_FIELD];
    get_name(c, arch);
    get_name(c, optimizer);
    s->num_updates = get_i64(c);
    s->epoch = get_i64(c);
    s->iter = get_i64(c);
    s->end_of_epoch = (int)get_u32(c);
    s->has_scaler = (int)get_u32(c);
    s->best_valid_loss = get_f64(c);
    s->scaler.scale = get_f64(c);
    s->scaler.scale_window = get_i64(c);
    s->scaler.iter = get_i64(c);
    s->scaler.last_overflow_iter = get_i64(c);
    s->scaler.last_rescale_iter = get_i64(c);
    s->scaler.overflows_since_rescale = get_i64(c);
    *opt_bytes = get_u64(c);
    uint32_t n = get_u32(c);
    (void)get_u32(c);
    if (c->short_read)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s has a malformed header", path);

    if ((int)world != h->world)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s was written by %u ranks, this run has %d (a different "
                             "--distributed-world-size); resume with the same world size",
                             path, world, h->world);
    if ((int)rank != h->rank)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s belongs to rank %u, this is rank %d", path, rank,
                             h->rank);
    if (strcmp(arch, run->arch ? run->arch : "") != 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s is of --arch %s, this run is %s", path, arch,
                             run->arch ? run->arch : "");
    if (act != (uint32_t)h->act_dtype || grad != (uint32_t)h->grad_dtype)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s holds %s parameters and %s gradients, this run %s and %s (different "
                             "--fp16/--bf16/--memory-efficient-* flags)",
                             path, dtype_name(act), dtype_name(grad), dtype_name((uint32_t)h->act_dtype),
                             dtype_name((uint32_t)h->grad_dtype));
    int nu = moe_runtime_num_units(run->rt);
    int run_master = 0, run_sharded = 0;
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        run_master |= u.master != NULL;
        run_sharded |= u.sharded;
    }
    if ((int)master != run_master)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s %s fp32 master weights, this run %s", path,
                             master ? "has" : "has no", run_master ? "keeps them" : "does not");
    if ((int)sharded != run_sharded)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s was %swritten with --ddp-backend fully_sharded, "
                             "this run %s",
                             path, sharded ? "" : "not ", run_sharded ? "uses it" : "does not");
    if ((int)n != nu)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s has %u parameter units, this run %d (a different model shape: "
                             "--decoder-layers, --moe-freq or --moe-expert-count?)",
                             path, n, nu);
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        int32_t expert = get_i32(c);
        uint32_t ush = get_u32(c), umaster = get_u32(c), len = get_u32(c);
        int64_t numel = get_i64(c), padded = get_i64(c), shard = get_i64(c);
        char name[256] = {0};
        if (len >= sizeof name || c->short_read)
            return moe_error_set(MOE_ERR_IO, "checkpoint %s has a malformed unit table", path);
        get(c, name, len);
        if (c->short_read)
            return moe_error_set(MOE_ERR_IO, "checkpoint %s has a malformed unit table", path);
        if (strcmp(name, u.name) != 0 || expert != u.expert_index)
            return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s: unit %d is '%s' (expert %d), in this run "
                                 "'%s' (expert %d): a different model layout",
                                 path, i, name, expert, u.name, u.expert_index);
        if (numel != u.numel || padded != u.padded || shard != u.shard || (int)ush != u.sharded ||
            (int)umaster != (u.master != NULL))
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s: unit '%s' has %lld parameters (shard %lld), in this run %lld "
                                 "(shard %lld): a different model shape (--decoder-embed-dim, "
                                 "--decoder-ffn-embed-dim, --moe-expert-count, vocabulary?)",
                                 path, u.name, (long long)numel, (long long)shard, (long long)u.numel,
                                 (long long)u.shard);
    }
    if (load_optimizer) {
        uint64_t have = opt_state_bytes(run);
        if (strcmp(optimizer, run->optimizer ? run->optimizer : "") != 0)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s holds the state of optimizer %s, this run uses %s (give "
                                 "--reset-optimizer to start it afresh)",
                                 path, optimizer, run->optimizer ? run->optimizer : "");
        if (*opt_bytes != have)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s holds %llu bytes of %s state, this run's has %llu (different "
                                 "optimizer options such as --fp16-adam-stats or --momentum; give "
                                 "--reset-optimizer to start it afresh)",
                                 path, (unsigned long long)*opt_bytes, optimizer, (unsigned long long)have);
        if (have > 0 && !run->opt_ops->load_state)
            return moe_error_set(MOE_ERR_UNSUPPORTED, "optimizer %s cannot load its state; give --reset-optimizer",
                                 optimizer);
    }
    return MOE_OK;
}

static moe_status load_open(const moe_ckpt_run *run, const char *path, int load_optimizer, moe_ckpt_state *s,
                            reader *r, void *stage)
{
    const moe_host *h = moe_runtime_host(run->rt);
    unsigned char head[24];
    MOE_TRY(r_bytes(r, head, sizeof head));
    if (memcmp(head, MAGIC, 8) != 0)
        return moe_error_set(MOE_ERR_IO, "%s is not a moelm checkpoint (bad magic)", path);
    uint32_t version, hb;
    uint64_t fb;
    memcpy(&version, head + 8, 4);
    memcpy(&hb, head + 12, 4);
    memcpy(&fb, head + 16, 8);
    if (version != MOE_CKPT_VERSION)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s has format version %u, this moelm reads version %u", path,
                             version, MOE_CKPT_VERSION);
    struct stat sb;
    if (fstat(fileno(r->f), &sb) != 0 || (uint64_t)sb.st_size != fb)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated or damaged: %lld bytes, the header says %llu",
                             path, (long long)sb.st_size, (unsigned long long)fb);
    if (hb < sizeof head || hb > fb || hb > (64u << 20))
        return moe_error_set(MOE_ERR_IO, "checkpoint %s has a malformed header", path);
    unsigned char *hdr = malloc(hb);
    if (!hdr)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
    memcpy(hdr, head, sizeof head);
    moe_status st = r_bytes(r, hdr + sizeof head, hb - sizeof head);
    uint64_t ob = 0;
    if (st == MOE_OK) {
        cur c = {hdr, hb, sizeof head, 0};
        st = check_header(run, path, &c, load_optimizer, s, &ob);
    }
    free(hdr);
    MOE_TRY(st);
    /* data: sizes follow from the (checked) unit table */
    uint64_t data = 0;
    int n = moe_runtime_num_units(run->rt);
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        data += unit_data_bytes(&u, h->act_dtype);
    }
    if ((uint64_t)hb + data + ob + TRAILER_BYTES != fb)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is damaged: its sections do not add up to its size", path);
    MOE_TRY(h->backend->synchronize(h->ctx));
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        void *param = u.sharded ? u.param_shard : u.param;
        MOE_TRY(r_device(r, h, param, (uint64_t)u.shard * moe_dtype_size(h->act_dtype), stage));
        if (u.master)
            MOE_TRY(r_device(r, h, u.master, (uint64_t)u.shard * 4u, stage));
    }
    for (uint64_t off = 0; off < ob; off += CHUNK_BYTES) {
        uint64_t m = ob - off < CHUNK_BYTES ? ob - off : CHUNK_BYTES;
        MOE_TRY(r_bytes(r, stage, (size_t)m));
        if (load_optimizer)
            MOE_TRY(run->opt_ops->load_state(run->opt, off, stage, m));
    }
    uint64_t want = ck_final(&r->ck), sum;
    unsigned char end[8];
    if (fread(&sum, 1, 8, r->f) != 8 || fread(end, 1, 8, r->f) != 8)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated (no trailer)", path);
    if (sum != want || memcmp(end, END_MAGIC, 8) != 0)
        return moe_error_set(MOE_ERR_IO,
                             "checkpoint %s is corrupt: checksum mismatch (stored %016llx, computed %016llx); "
                             "restore an older checkpoint or start afresh",
                             path, (unsigned long long)sum, (unsigned long long)want);
    return h->backend->synchronize(h->ctx);
}

moe_status moe_ckpt_load(const moe_ckpt_run *run, const char *path, int load_optimizer, moe_ckpt_state *s)
{
    if (!little_endian())
        return moe_error_set(MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    memset(s, 0, sizeof *s);
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error_set(MOE_ERR_IO, "cannot open checkpoint %s: %s", path, strerror(errno));
    void *stage = malloc(CHUNK_BYTES);
    if (!stage) {
        fclose(f);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory for the checkpoint staging buffer");
    }
    reader r = {f, path, {0, 0, 0, 0}};
    ck_init(&r.ck);
    moe_status st = load_open(run, path, load_optimizer, s, &r, stage);
    free(stage);
    fclose(f);
    return st;
}

/* ---------------------------------------------------------------- names */

void moe_ckpt_rank_path(char *out, size_t size, const char *dir, const char *name, int rank)
{
    size_t n = strlen(name);
    int has_pt = n >= 3 && strcmp(name + n - 3, ".pt") == 0;
    int stem = (int)(has_pt ? n - 3 : n);
    if (name[0] == '/' || !dir || !*dir)
        snprintf(out, size, "%.*s-rank-%d.pt", stem, name, rank);
    else
        snprintf(out, size, "%s/%.*s-rank-%d.pt", dir, stem, name, rank);
}

moe_status moe_ckpt_mkdirs(const char *dir)
{
    char p[4096];
    snprintf(p, sizeof p, "%s", dir);
    size_t n = strlen(p);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            return moe_error_set(MOE_ERR_IO, "cannot create --save-dir %s: %s", p, strerror(errno));
        p[i] = c;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return moe_error_set(MOE_ERR_IO, "--save-dir %s is not a directory", dir);
    return MOE_OK;
}
