/* checkpoint.c: see checkpoint.h for the file format.
 *
 * Three layers: the format (checksums, the header's serialization, a writer
 * of sections and footer, the reading of one file's header and footer); an
 * opened checkpoint (moe_ckpt: every file of one save, its units merged by
 * name, each unit's pieces sorted and deduplicated); and the assembly of any
 * element range of a unit from the pieces that overlap it, handed chunk by
 * chunk to a sink (backend memory and the optimizer's load_state when a run
 * resumes, a file being written for the tools, a caller's buffer).
 *
 * Host memory is bounded whatever the model: a few chunk buffers of 16 MiB
 * and the headers; tensors stream through them.
 *
 * Conventions a reader would trip over: "array" numbers the parts of a
 * unit's section in file order (parameters, masters, optimizer fields,
 * scalars), and the sinks receive byte offsets into those parts. A piece is
 * read only after its section's checksum was checked (once per section),
 * except on the path that copies a whole section, which checks it as it goes.
 */
#include "core/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/options.h"
#include "kernels/half.h"

static const char MAGIC[8] = {'M', 'O', 'E', 'L', 'M', 'C', 'K', 'P'};
static const char END_MAGIC[8] = {'M', 'O', 'E', 'L', 'M', 'E', 'N', 'D'};
#define NAME_FIELD 64
#define LAYOUT_NAME 24
#define CHUNK_BYTES ((uint64_t)16 << 20) /* host staging buffer */
#define CHUNK_ELEMS ((int64_t)4 << 20)   /* elements per assembled chunk (16 MiB at fp32) */
#define TRAILER_BYTES 32u                /* u32 n_sections, u32 0, u64 footer sum, u64 file sum, magic */
#define SECTION_ENTRY 24u
#define MAX_NAME 4096u
#define FP16_MAX 65504.0f

/* parts of a unit's section, in file order */
enum { ARR_PARAMS = 0, ARR_MASTER = 1, ARR_FIELD = 2, ARR_SCALARS = ARR_FIELD + MOE_OPT_MAX_FIELDS, ARR_COUNT };

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

static uint64_t ck_of(const void *p, size_t n)
{
    ck_hash c;
    ck_init(&c);
    ck_update(&c, p, n);
    return ck_final(&c);
}

static int little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static moe_status not_little_endian(void)
{
    return moe_error_set(MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
}

/* --------------------------------------------------------------- dtypes */

const char *moe_ckpt_dtype_name(moe_dtype d)
{
    switch (d) {
    case MOE_F32: return "fp32";
    case MOE_F16: return "fp16";
    case MOE_BF16: return "bf16";
    default: return "?";
    }
}

static int storage_dtype(uint32_t d) { return d == MOE_F32 || d == MOE_F16 || d == MOE_BF16; }

static float load_f(const void *p, moe_dtype dt, int64_t i)
{
    switch (dt) {
    case MOE_F16: return moe_f16_to_f32(((const uint16_t *)p)[i]);
    case MOE_BF16: return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static void store_f(void *p, moe_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case MOE_F16: ((uint16_t *)p)[i] = moe_f32_to_f16(v); break;
    case MOE_BF16: ((uint16_t *)p)[i] = moe_f32_to_bf16(v); break;
    default: ((float *)p)[i] = v; break;
    }
}

static void convert(void *dst, moe_dtype ddt, const void *src, moe_dtype sdt, int64_t n)
{
    if (ddt == sdt) {
        memmove(dst, src, (size_t)n * moe_dtype_size(sdt));
        return;
    }
    for (int64_t i = 0; i < n; i++)
        store_f(dst, ddt, i, load_f(src, sdt, i));
}

/* max|x| with NaN sticky, as the optimizer kernels (torch.norm(x, inf)) */
static float absmax_update(float mx, float x)
{
    float ax = fabsf(x);
    if (isnan(mx))
        return mx;
    return (isnan(ax) || ax > mx) ? ax : mx;
}

/* --------------------------------------------------------------- header */

typedef struct hbuf {
    unsigned char *p;
    size_t n, cap;
    int oom;
} hbuf;

static void put(hbuf *b, const void *src, size_t n)
{
    if (b->oom)
        return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 4096;
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
static void put_u32(hbuf *b, uint32_t v) { put(b, &v, 4); }
static void put_i32(hbuf *b, int32_t v) { put(b, &v, 4); }
static void put_u64(hbuf *b, uint64_t v) { put(b, &v, 8); }
static void put_i64(hbuf *b, int64_t v) { put(b, &v, 8); }
static void put_f64(hbuf *b, double v) { put(b, &v, 8); }
static void put_fixed(hbuf *b, const char *s, size_t field)
{
    char tmp[NAME_FIELD] = {0};
    snprintf(tmp, field, "%s", s ? s : "");
    put(b, tmp, field);
}
static void put_str(hbuf *b, const char *s)
{
    size_t n = strlen(s);
    put_u32(b, (uint32_t)n);
    put(b, s, n);
}

typedef struct cur {
    const unsigned char *p;
    size_t n, at;
    int bad;
} cur;

static void get(cur *c, void *dst, size_t n)
{
    if (c->bad || c->at + n > c->n) {
        c->bad = 1;
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
static void get_fixed(cur *c, char *out, size_t field)
{
    get(c, out, field);
    out[field - 1] = '\0';
}
/* a length-prefixed string, malloc'd (NULL: malformed or out of memory) */
static char *get_str(cur *c)
{
    uint32_t n = get_u32(c);
    if (c->bad || n > MAX_NAME * 16 || c->at + n > c->n) {
        c->bad = 1;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s) {
        c->bad = 1;
        return NULL;
    }
    get(c, s, n);
    s[n] = '\0';
    return s;
}

/* One unit record of a file. */
typedef struct ck_unit {
    char *name;
    int expert_index, sharded;
    int64_t numel, padded, start, n;
    int first_tensor, n_tensors;
    int section;
    uint64_t off, bytes;  /* its section in the file */
} ck_unit;

/* One named fp32 buffer of a file (format 3): a gate's state. */
typedef struct ck_buf {
    char *name;
    int64_t n;
    int section;
    uint64_t off, bytes;
} ck_buf;

/* A header, parsed or about to be written. `owned`: the strings are the
 * header's (parsed), else borrowed (a runtime's, an opened checkpoint's). */
typedef struct ck_hdr {
    uint32_t version, header_bytes;
    uint64_t file_bytes;
    uint32_t world, rank, act, grad, master, sharded;
    uint64_t save_id;
    int64_t vocab;
    int32_t padding_idx;
    char arch[NAME_FIELD], optimizer[NAME_FIELD];
    moe_ckpt_state st;
    uint32_t opt_kind, fields, scalars;
    uint32_t fdt[MOE_OPT_MAX_FIELDS];
    int32_t fscale[MOE_OPT_MAX_FIELDS];
    char fname[MOE_OPT_MAX_FIELDS][LAYOUT_NAME], sname[MOE_OPT_MAX_SCALARS][LAYOUT_NAME];
    uint64_t opaque_bytes;
    int argc;
    char **argv;
    int n_units;
    ck_unit *units;
    int n_tensors;
    moe_ckpt_tensor *tensors;
    int n_bufs;
    ck_buf *bufs;
    int owned;
} ck_hdr;

static void hdr_free(ck_hdr *h)
{
    if (h->owned) {
        for (int i = 0; i < h->argc; i++)
            free(h->argv[i]);
        for (int i = 0; i < h->n_units; i++)
            free(h->units[i].name);
        for (int i = 0; i < h->n_tensors; i++)
            free((char *)h->tensors[i].name);
        for (int i = 0; i < h->n_bufs; i++)
            free(h->bufs[i].name);
    }
    free(h->argv);
    free(h->units);
    free(h->tensors);
    free(h->bufs);
    memset(h, 0, sizeof *h);
}

/* optimizer bytes per element of a piece */
static uint64_t field_bytes(const ck_hdr *h)
{
    uint64_t b = 0;
    if (h->opt_kind == MOE_CKPT_OPT_LAYOUT)
        for (uint32_t f = 0; f < h->fields; f++)
            b += moe_dtype_size((moe_dtype)h->fdt[f]);
    return b;
}

static uint64_t unit_bytes(const ck_hdr *h, const ck_unit *u)
{
    uint64_t b = (uint64_t)u->n * (moe_dtype_size((moe_dtype)h->act) + (h->master ? 4u : 0u) + field_bytes(h));
    if (h->opt_kind == MOE_CKPT_OPT_LAYOUT && u->numel > 0)
        b += (uint64_t)h->scalars * 4u;
    return b;
}

static int n_sections_of(const ck_hdr *h)
{
    return 1 + h->n_units + h->n_bufs + (h->opt_kind == MOE_CKPT_OPT_OPAQUE);
}

/* the sections after the header: units, buffers, then (opaque) the optimizer's */
static uint64_t place_sections(ck_hdr *h)
{
    uint64_t off = h->header_bytes;
    for (int i = 0; i < h->n_units; i++) {
        h->units[i].section = 1 + i;
        h->units[i].off = off;
        h->units[i].bytes = unit_bytes(h, &h->units[i]);
        off += h->units[i].bytes;
    }
    for (int i = 0; i < h->n_bufs; i++) {
        h->bufs[i].section = 1 + h->n_units + i;
        h->bufs[i].off = off;
        h->bufs[i].bytes = (uint64_t)h->bufs[i].n * 4u;
        off += h->bufs[i].bytes;
    }
    return off;
}

/* Serializes h; fills header_bytes, file_bytes (and the unit sections'
 * offsets) in h and in the bytes. */
static void build_header(ck_hdr *h, hbuf *b)
{
    put(b, MAGIC, 8);
    put_u32(b, MOE_CKPT_VERSION);
    put_u32(b, 0); /* header bytes, patched below */
    put_u64(b, 0); /* file bytes, patched below */
    put_u32(b, h->world);
    put_u32(b, h->rank);
    put_u32(b, h->act);
    put_u32(b, h->grad);
    put_u32(b, h->master);
    put_u32(b, h->sharded);
    put_u64(b, h->save_id);
    put_i64(b, h->vocab);
    put_i32(b, h->padding_idx);
    put_u32(b, (uint32_t)h->n_units);
    put_u32(b, (uint32_t)h->n_tensors);
    put_u32(b, (uint32_t)h->argc);
    put_fixed(b, h->arch, NAME_FIELD);
    put_fixed(b, h->optimizer, NAME_FIELD);
    const moe_ckpt_state *s = &h->st;
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
    put_u32(b, h->opt_kind);
    put_u32(b, h->fields);
    put_u32(b, h->scalars);
    put_u32(b, 0);
    for (int f = 0; f < MOE_OPT_MAX_FIELDS; f++) {
        put_u32(b, h->fdt[f]);
        put_i32(b, h->fscale[f]);
        put_fixed(b, h->fname[f], LAYOUT_NAME);
    }
    for (int k = 0; k < MOE_OPT_MAX_SCALARS; k++)
        put_fixed(b, h->sname[k], LAYOUT_NAME);
    put_u64(b, h->opaque_bytes);
    for (int i = 0; i < h->argc; i++)
        put_str(b, h->argv[i]);
    for (int i = 0; i < h->n_units; i++) {
        const ck_unit *u = &h->units[i];
        put_i32(b, u->expert_index);
        put_u32(b, (uint32_t)u->sharded);
        put_i64(b, u->numel);
        put_i64(b, u->padded);
        put_i64(b, u->start);
        put_i64(b, u->n);
        put_u32(b, (uint32_t)u->n_tensors);
        put_str(b, u->name);
        for (int k = 0; k < u->n_tensors; k++) {
            const moe_ckpt_tensor *t = &h->tensors[u->first_tensor + k];
            put_u32(b, (uint32_t)t->ndim);
            put_str(b, t->name);
            put_i64(b, t->shape[0]);
            put_i64(b, t->shape[1]);
            put_i64(b, t->offset);
        }
    }
    put_u32(b, (uint32_t)h->n_bufs);
    for (int i = 0; i < h->n_bufs; i++) {
        put_str(b, h->bufs[i].name);
        put_i64(b, h->bufs[i].n);
    }
    if (b->oom)
        return;
    h->header_bytes = (uint32_t)b->n;
    uint64_t off = place_sections(h);
    if (h->opt_kind == MOE_CKPT_OPT_OPAQUE)
        off += h->opaque_bytes;
    h->file_bytes = off + (uint64_t)n_sections_of(h) * SECTION_ENTRY + TRAILER_BYTES;
    memcpy(b->p + 12, &h->header_bytes, 4);
    memcpy(b->p + 16, &h->file_bytes, 8);
}

static moe_status malformed(const char *path, const char *what)
{
    return moe_error_set(MOE_ERR_IO, "checkpoint %s has a malformed header (%s); it was not written by this moelm "
                                     "or is damaged", path, what);
}

static moe_status parse_header(const unsigned char *p, size_t n, const char *path, ck_hdr *h)
{
    memset(h, 0, sizeof *h);
    h->owned = 1;
    cur c = {p, n, 8, 0};
    h->version = get_u32(&c);
    h->header_bytes = get_u32(&c);
    h->file_bytes = get_u64(&c);
    h->world = get_u32(&c);
    h->rank = get_u32(&c);
    h->act = get_u32(&c);
    h->grad = get_u32(&c);
    h->master = get_u32(&c);
    h->sharded = get_u32(&c);
    h->save_id = get_u64(&c);
    h->vocab = get_i64(&c);
    h->padding_idx = get_i32(&c);
    uint32_t n_units = get_u32(&c), n_tensors = get_u32(&c), n_args = get_u32(&c);
    get_fixed(&c, h->arch, NAME_FIELD);
    get_fixed(&c, h->optimizer, NAME_FIELD);
    moe_ckpt_state *s = &h->st;
    s->num_updates = get_i64(&c);
    s->epoch = get_i64(&c);
    s->iter = get_i64(&c);
    s->end_of_epoch = (int)get_u32(&c);
    s->has_scaler = (int)get_u32(&c);
    s->best_valid_loss = get_f64(&c);
    s->scaler.scale = get_f64(&c);
    s->scaler.scale_window = get_i64(&c);
    s->scaler.iter = get_i64(&c);
    s->scaler.last_overflow_iter = get_i64(&c);
    s->scaler.last_rescale_iter = get_i64(&c);
    s->scaler.overflows_since_rescale = get_i64(&c);
    s->save_id = h->save_id;
    h->opt_kind = get_u32(&c);
    h->fields = get_u32(&c);
    h->scalars = get_u32(&c);
    (void)get_u32(&c);
    for (int f = 0; f < MOE_OPT_MAX_FIELDS; f++) {
        h->fdt[f] = get_u32(&c);
        h->fscale[f] = get_i32(&c);
        get_fixed(&c, h->fname[f], LAYOUT_NAME);
    }
    for (int k = 0; k < MOE_OPT_MAX_SCALARS; k++)
        get_fixed(&c, h->sname[k], LAYOUT_NAME);
    h->opaque_bytes = get_u64(&c);
    if (c.bad)
        return malformed(path, "too short");
    if (h->world < 1 || h->rank >= h->world || !storage_dtype(h->act) || !storage_dtype(h->grad) || h->master > 1)
        return malformed(path, "world, rank or dtypes out of range");
    if (h->opt_kind > MOE_CKPT_OPT_OPAQUE || h->fields > MOE_OPT_MAX_FIELDS || h->scalars > MOE_OPT_MAX_SCALARS)
        return malformed(path, "optimizer layout out of range");
    for (uint32_t f = 0; f < h->fields; f++)
        if (!storage_dtype(h->fdt[f]) || h->fscale[f] < -1 || h->fscale[f] >= (int32_t)h->scalars ||
            (h->fscale[f] >= 0 && h->fdt[f] != MOE_F16))
            return malformed(path, "optimizer field out of range");
    if (n_units > (1u << 24) || n_tensors > (1u << 26) || n_args > (1u << 20))
        return malformed(path, "counts out of range");
    h->argv = calloc((size_t)n_args + 1, sizeof *h->argv);
    h->units = calloc(n_units ? n_units : 1, sizeof *h->units);
    h->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *h->tensors);
    if (!h->argv || !h->units || !h->tensors)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
    for (uint32_t i = 0; i < n_args && !c.bad; i++) {
        h->argv[i] = get_str(&c);
        h->argc += h->argv[i] != NULL;
    }
    for (uint32_t i = 0; i < n_units && !c.bad; i++) {
        ck_unit *u = &h->units[i];
        u->expert_index = get_i32(&c);
        u->sharded = (int)get_u32(&c);
        u->numel = get_i64(&c);
        u->padded = get_i64(&c);
        u->start = get_i64(&c);
        u->n = get_i64(&c);
        uint32_t nt = get_u32(&c);
        u->name = get_str(&c);
        h->n_units += u->name != NULL;
        if (c.bad)
            break;
        if (u->numel < 0 || u->padded < u->numel || u->start < 0 || u->n < 0 || u->start > u->padded ||
            u->n > u->padded - u->start || nt > n_tensors - (uint32_t)h->n_tensors)
            return malformed(path, "a unit's sizes are out of range");
        u->first_tensor = h->n_tensors;
        u->n_tensors = (int)nt;
        int64_t end = 0;
        for (uint32_t k = 0; k < nt && !c.bad; k++) {
            moe_ckpt_tensor *t = &h->tensors[h->n_tensors];
            t->ndim = (int)get_u32(&c);
            t->name = get_str(&c);
            t->shape[0] = get_i64(&c);
            t->shape[1] = get_i64(&c);
            t->offset = get_i64(&c);
            if (!t->name)
                break;
            h->n_tensors++;
            if (c.bad)
                break;
            t->numel = t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
            if (t->ndim < 1 || t->ndim > 2 || t->shape[0] < 1 || (t->ndim == 2 && t->shape[1] < 1) ||
                t->offset != end || t->offset + t->numel > u->numel)
                return malformed(path, "a tensor's shape or offset is out of range");
            end += t->numel;
        }
    }
    if (c.bad || h->argc != (int)n_args || h->n_units != (int)n_units || h->n_tensors != (int)n_tensors)
        return malformed(path, "the tables are cut short");
    uint32_t n_bufs = h->version >= 3 ? get_u32(&c) : 0; /* format 2 has no buffers */
    if (n_bufs > (1u << 20))
        return malformed(path, "buffer count out of range");
    h->bufs = calloc(n_bufs ? n_bufs : 1, sizeof *h->bufs);
    if (!h->bufs)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
    for (uint32_t i = 0; i < n_bufs && !c.bad; i++) {
        ck_buf *bf = &h->bufs[i];
        bf->name = get_str(&c);
        bf->n = get_i64(&c);
        if (!bf->name)
            break;
        h->n_bufs++;
        if (!c.bad && (bf->n < 0 || bf->n > ((int64_t)1 << 40)))
            return malformed(path, "a buffer's size is out of range");
    }
    if (c.bad || h->n_bufs != (int)n_bufs)
        return malformed(path, "the buffer table is cut short");
    if (c.at != n)
        return malformed(path, "bytes left over after the tables");
    place_sections(h);
    return MOE_OK;
}

/* ---------------------------------------------------------------- write */

typedef struct ck_writer {
    FILE *f;
    const char *path;  /* in messages */
    ck_hash whole, sec;
    uint64_t pos;
    int n_sec, cur_sec;
    uint64_t *sec_off, *sec_bytes, *sec_sum;
} ck_writer;

static moe_status w_open(ck_writer *w, const char *path, int n_sections)
{
    memset(w, 0, sizeof *w);
    w->path = path;
    ck_init(&w->whole);
    w->n_sec = n_sections;
    w->cur_sec = -1;
    w->sec_off = calloc((size_t)n_sections, sizeof *w->sec_off);
    w->sec_bytes = calloc((size_t)n_sections, sizeof *w->sec_bytes);
    w->sec_sum = calloc((size_t)n_sections, sizeof *w->sec_sum);
    if (!w->sec_off || !w->sec_bytes || !w->sec_sum)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing checkpoint %s", path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    w->f = fd >= 0 ? fdopen(fd, "wb") : NULL;
    if (!w->f) {
        moe_status e = moe_error_set(MOE_ERR_IO, "cannot create checkpoint %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return e;
    }
    return MOE_OK;
}

static moe_status w_raw(ck_writer *w, const void *p, size_t n)
{
    ck_update(&w->whole, p, n);
    w->pos += n;
    if (n && fwrite(p, 1, n, w->f) != n)
        return moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", w->path, strerror(errno));
    return MOE_OK;
}

static moe_status w_put(ck_writer *w, const void *p, size_t n)
{
    ck_update(&w->sec, p, n);
    return w_raw(w, p, n);
}

static void w_begin(ck_writer *w)
{
    w->cur_sec++;
    w->sec_off[w->cur_sec] = w->pos;
    ck_init(&w->sec);
}

static void w_end(ck_writer *w)
{
    w->sec_bytes[w->cur_sec] = w->pos - w->sec_off[w->cur_sec];
    w->sec_sum[w->cur_sec] = ck_final(&w->sec);
}

/* the footer and trailer, then flush and fsync */
static moe_status w_finish(ck_writer *w)
{
    if (w->cur_sec != w->n_sec - 1)
        return moe_error_set(MOE_ERR_INTERNAL, "checkpoint %s: %d sections written, %d announced", w->path,
                             w->cur_sec + 1, w->n_sec);
    hbuf b = {0};
    for (int s = 0; s < w->n_sec; s++) {
        put_u64(&b, w->sec_off[s]);
        put_u64(&b, w->sec_bytes[s]);
        put_u64(&b, w->sec_sum[s]);
    }
    put_u32(&b, (uint32_t)w->n_sec);
    put_u32(&b, 0);
    if (b.oom) {
        free(b.p);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing checkpoint %s", w->path);
    }
    uint64_t fsum = ck_of(b.p, b.n);
    moe_status st = w_raw(w, b.p, b.n);
    free(b.p);
    MOE_TRY(st);
    MOE_TRY(w_raw(w, &fsum, 8));
    uint64_t whole = ck_final(&w->whole);
    MOE_TRY(w_raw(w, &whole, 8));
    MOE_TRY(w_raw(w, END_MAGIC, 8));
    if (fflush(w->f) != 0)
        return moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", w->path, strerror(errno));
    if (fsync(fileno(w->f)) != 0)
        return moe_error_set(MOE_ERR_IO, "cannot sync checkpoint %s: %s", w->path, strerror(errno));
    return MOE_OK;
}

static moe_status w_close(ck_writer *w, moe_status st)
{
    if (w->f && fclose(w->f) != 0 && st == MOE_OK)
        st = moe_error_set(MOE_ERR_IO, "cannot write checkpoint %s: %s", w->path, strerror(errno));
    w->f = NULL;
    free(w->sec_off);
    free(w->sec_bytes);
    free(w->sec_sum);
    w->sec_off = w->sec_bytes = w->sec_sum = NULL;
    return st;
}

void moe_ckpt_sync_dir(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* ------------------------------------------------------------ one file */

typedef struct ck_file {
    char *path;
    int fd;
    uint64_t size;
    ck_hdr h;
    int n_sections;
    uint64_t *sec_off, *sec_bytes, *sec_sum;
    unsigned char *verified;
} ck_file;

static void file_close(ck_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
    free(f->path);
    hdr_free(&f->h);
    free(f->sec_off);
    free(f->sec_bytes);
    free(f->sec_sum);
    free(f->verified);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

static moe_status pread_full(const ck_file *f, void *dst, uint64_t n, uint64_t off)
{
    unsigned char *p = dst;
    while (n > 0) {
        ssize_t got = pread(f->fd, p, n > ((uint64_t)1 << 30) ? ((size_t)1 << 30) : (size_t)n, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated (read failed at byte %llu: %s)", f->path,
                                 (unsigned long long)off, got < 0 ? strerror(errno) : "end of file");
        p += got;
        off += (uint64_t)got;
        n -= (uint64_t)got;
    }
    return MOE_OK;
}

static const char *section_what(const ck_file *f, int sec, char *buf, size_t size)
{
    if (sec == 0)
        snprintf(buf, size, "its header");
    else if (sec <= f->h.n_units)
        snprintf(buf, size, "unit '%s'", f->h.units[sec - 1].name);
    else
        snprintf(buf, size, "its optimizer state");
    return buf;
}

static moe_status corrupt(const ck_file *f, int sec, uint64_t stored, uint64_t computed)
{
    char what[300];
    return moe_error_set(MOE_ERR_IO,
                         "checkpoint %s is corrupt: checksum mismatch in %s (stored %016llx, computed %016llx); "
                         "restore an older checkpoint or start afresh",
                         f->path, section_what(f, sec, what, sizeof what), (unsigned long long)stored,
                         (unsigned long long)computed);
}

/* header and footer: magic, version, size, footer checksum, header checksum,
 * the sections where the header puts them */
static moe_status file_open(ck_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->path = malloc(strlen(path) + 1);
    if (!f->path)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    strcpy(f->path, path);
    f->fd = open(path, O_RDONLY);
    if (f->fd < 0)
        return moe_error_set(MOE_ERR_IO, "cannot open checkpoint %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(f->fd, &sb) != 0)
        return moe_error_set(MOE_ERR_IO, "cannot read checkpoint %s: %s", path, strerror(errno));
    f->size = (uint64_t)sb.st_size;
    unsigned char head[24];
    if (f->size < sizeof head || pread_full(f, head, sizeof head, 0) != MOE_OK) {
        moe_error_clear();
        return moe_error_set(MOE_ERR_IO, "%s is not a moelm checkpoint (%llu bytes, too short)", path,
                             (unsigned long long)f->size);
    }
    if (memcmp(head, MAGIC, 8) != 0)
        return moe_error_set(MOE_ERR_IO, "%s is not a moelm checkpoint (bad magic)", path);
    uint32_t version, hb;
    uint64_t fb;
    memcpy(&version, head + 8, 4);
    memcpy(&hb, head + 12, 4);
    memcpy(&fb, head + 16, 8);
    if (version == 1)
        return moe_error_set(MOE_ERR_UNSUPPORTED,
                             "checkpoint %s was written by an earlier moelm (checkpoint format 1; this moelm reads "
                             "format %u, which any world size can resume): resume it with the moelm that wrote it, "
                             "or start afresh",
                             path, MOE_CKPT_VERSION);
    if (version != MOE_CKPT_VERSION && version != 2)
        return moe_error_set(MOE_ERR_UNSUPPORTED,
                             "checkpoint %s has format version %u, this moelm reads versions 2 and %u; use the moelm "
                             "that wrote it",
                             path, version, MOE_CKPT_VERSION);
    if (f->size != fb)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated or damaged: %llu bytes, the header says %llu",
                             path, (unsigned long long)f->size, (unsigned long long)fb);
    unsigned char tr[TRAILER_BYTES];
    if (fb < hb + (uint64_t)TRAILER_BYTES + SECTION_ENTRY || hb < 544u || hb > (256u << 20))
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated or damaged: its sizes do not add up", path);
    MOE_TRY(pread_full(f, tr, TRAILER_BYTES, fb - TRAILER_BYTES));
    uint32_t nsec;
    uint64_t fsum;
    memcpy(&nsec, tr, 4);
    memcpy(&fsum, tr + 8, 8);
    if (memcmp(tr + 24, END_MAGIC, 8) != 0)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated or damaged: no end marker", path);
    uint64_t table = (uint64_t)nsec * SECTION_ENTRY;
    if (nsec < 1 || table + TRAILER_BYTES + hb > fb)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is truncated or damaged: its footer does not fit", path);
    uint64_t table_off = fb - TRAILER_BYTES - table;
    unsigned char *tb = malloc((size_t)table + 8);
    if (!tb)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
    moe_status st = pread_full(f, tb, table + 8, table_off);
    if (st == MOE_OK && ck_of(tb, (size_t)table + 8) != fsum)
        st = moe_error_set(MOE_ERR_IO,
                           "checkpoint %s is corrupt: checksum mismatch in its footer; restore an older checkpoint "
                           "or start afresh",
                           path);
    if (st == MOE_OK) {
        f->n_sections = (int)nsec;
        f->sec_off = malloc(nsec * sizeof *f->sec_off);
        f->sec_bytes = malloc(nsec * sizeof *f->sec_bytes);
        f->sec_sum = malloc(nsec * sizeof *f->sec_sum);
        f->verified = calloc(nsec, 1);
        if (!f->sec_off || !f->sec_bytes || !f->sec_sum || !f->verified)
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
        for (uint32_t s = 0; st == MOE_OK && s < nsec; s++) {
            memcpy(&f->sec_off[s], tb + 24 * s, 8);
            memcpy(&f->sec_bytes[s], tb + 24 * s + 8, 8);
            memcpy(&f->sec_sum[s], tb + 24 * s + 16, 8);
        }
    }
    free(tb);
    MOE_TRY(st);
    if (f->sec_off[0] != 0 || f->sec_bytes[0] != hb)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is damaged: its footer misplaces the header", path);
    unsigned char *hdr = malloc(hb);
    if (!hdr)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", path);
    st = pread_full(f, hdr, hb, 0);
    if (st == MOE_OK) {
        uint64_t sum = ck_of(hdr, hb);
        if (sum != f->sec_sum[0])
            st = corrupt(f, 0, f->sec_sum[0], sum);
    }
    if (st == MOE_OK)
        st = parse_header(hdr, hb, path, &f->h);
    free(hdr);
    MOE_TRY(st);
    f->verified[0] = 1;
    /* the sections where the header says they are */
    const ck_hdr *h = &f->h;
    if (f->n_sections != n_sections_of(h))
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is damaged: %d sections, its header describes %d", path,
                             f->n_sections, n_sections_of(h));
    uint64_t off = hb;
    for (int s = 1; s < f->n_sections; s++) {
        uint64_t want = s <= h->n_units             ? h->units[s - 1].bytes
                        : s <= h->n_units + h->n_bufs ? h->bufs[s - 1 - h->n_units].bytes
                                                      : h->opaque_bytes;
        if (f->sec_off[s] != off || f->sec_bytes[s] != want)
            return moe_error_set(MOE_ERR_IO, "checkpoint %s is damaged: its sections do not add up to its size",
                                 path);
        off += want;
    }
    if (off != table_off)
        return moe_error_set(MOE_ERR_IO, "checkpoint %s is damaged: its sections do not add up to its size", path);
    return MOE_OK;
}

/* --------------------------------------------------- opened checkpoint */

typedef struct ck_mu {
    moe_ckpt_unit pub;
    moe_ckpt_piece *pieces;
    int *recs;        /* per piece: its unit record in the file */
    int cap;
    int *primary;     /* the pieces read from: disjoint, by start (replicas dropped) */
    int n_primary;
} ck_mu;

struct moe_ckpt {
    char name[4200];
    int n_files;
    ck_file *files;
    moe_ckpt_meta meta;
    ck_mu *mus;
    int n_mus, cap_mus;
    int *order;          /* display order: mu ids */
    int *hash;           /* open addressing: mu id + 1, 0 empty */
    int hash_cap;
    unsigned char *stage; /* CHUNK_BYTES */
    unsigned char *raw;   /* CHUNK_ELEMS * 4 */
    unsigned char *conv;  /* CHUNK_ELEMS * 4 */
};

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h;
}

int moe_ckpt_find_unit(const moe_ckpt *c, const char *name)
{
    if (!c->hash_cap)
        return -1;
    for (uint64_t i = fnv1a(name) & (uint64_t)(c->hash_cap - 1);; i = (i + 1) & (uint64_t)(c->hash_cap - 1)) {
        int v = c->hash[i];
        if (!v)
            return -1;
        if (strcmp(c->mus[v - 1].pub.name, name) == 0)
            return v - 1;
    }
}

static moe_status hash_insert(moe_ckpt *c, int id)
{
    if (2 * (c->n_mus + 1) > c->hash_cap) {
        int cap = c->hash_cap ? 2 * c->hash_cap : 256;
        while (2 * (c->n_mus + 1) > cap)
            cap *= 2;
        int *h = calloc((size_t)cap, sizeof *h);
        if (!h)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        free(c->hash);
        c->hash = h;
        c->hash_cap = cap;
        for (int j = 0; j < c->n_mus; j++)
            if (j != id) {
                uint64_t i = fnv1a(c->mus[j].pub.name) & (uint64_t)(cap - 1);
                while (h[i])
                    i = (i + 1) & (uint64_t)(cap - 1);
                h[i] = j + 1;
            }
    }
    uint64_t i = fnv1a(c->mus[id].pub.name) & (uint64_t)(c->hash_cap - 1);
    while (c->hash[i])
        i = (i + 1) & (uint64_t)(c->hash_cap - 1);
    c->hash[i] = id + 1;
    return MOE_OK;
}

static moe_status add_piece(ck_mu *m, int file, int rec, const ck_unit *u)
{
    if (m->pub.n_pieces == m->cap) {
        int cap = m->cap ? 2 * m->cap : 4;
        moe_ckpt_piece *p = realloc(m->pieces, (size_t)cap * sizeof *p);
        if (!p)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        m->pieces = p;
        int *r = realloc(m->recs, (size_t)cap * sizeof *r);
        if (!r)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        m->recs = r;
        m->cap = cap;
    }
    m->pieces[m->pub.n_pieces].file = file;
    m->pieces[m->pub.n_pieces].start = u->start;
    m->pieces[m->pub.n_pieces].n = u->n;
    m->recs[m->pub.n_pieces] = rec;
    m->pub.n_pieces++;
    return MOE_OK;
}

static const char *shape_text(char *buf, size_t size, int ndim, const int64_t *shape)
{
    if (ndim == 2)
        snprintf(buf, size, "%lldx%lld", (long long)shape[0], (long long)shape[1]);
    else
        snprintf(buf, size, "%lld", (long long)shape[0]);
    return buf;
}

/* the same unit in two files of one save */
static moe_status same_unit(const moe_ckpt *c, const ck_mu *m, int fi, const ck_unit *u)
{
    const ck_file *f = &c->files[fi];
    const char *p0 = c->files[m->pieces[0].file].path;
    if (u->numel != m->pub.numel || u->expert_index != m->pub.expert_index || u->n_tensors != m->pub.n_tensors)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint files %s and %s disagree on unit '%s' (%lld and %lld parameters): files of "
                             "different runs mixed",
                             p0, f->path, u->name, (long long)m->pub.numel, (long long)u->numel);
    for (int k = 0; k < u->n_tensors; k++) {
        const moe_ckpt_tensor *a = &m->pub.tensors[k], *b = &f->h.tensors[u->first_tensor + k];
        if (strcmp(a->name, b->name) != 0 || a->ndim != b->ndim || a->shape[0] != b->shape[0] ||
            a->shape[1] != b->shape[1] || a->offset != b->offset)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint files %s and %s disagree on tensor '%s' of unit '%s': files of different "
                                 "runs mixed",
                                 p0, f->path, b->name, u->name);
    }
    return MOE_OK;
}

/* File fi's units into the model's: a unit seen before gets a piece, a new
 * one is placed after the unit that precedes it in this file, past the units
 * this file does not have (other ranks' experts of that layer). */
static moe_status merge_file(moe_ckpt *c, int fi, int *mark, int *pos_of)
{
    const ck_file *f = &c->files[fi];
    for (int r = 0; r < f->h.n_units; r++) {
        int id = moe_ckpt_find_unit(c, f->h.units[r].name);
        if (id >= 0)
            mark[id] = fi;
    }
    int pos = -1;
    for (int r = 0; r < f->h.n_units; r++) {
        const ck_unit *u = &f->h.units[r];
        int id = moe_ckpt_find_unit(c, u->name);
        if (id >= 0) {
            if (c->mus[id].pieces[c->mus[id].pub.n_pieces - 1].file == fi)
                return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s names unit '%s' twice", f->path, u->name);
            MOE_TRY(same_unit(c, &c->mus[id], fi, u));
            MOE_TRY(add_piece(&c->mus[id], fi, r, u));
            pos = pos_of[id];
            continue;
        }
        /* a new unit */
        if (c->n_mus == c->cap_mus)
            return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit table overflow");
        id = c->n_mus++;
        ck_mu *m = &c->mus[id];
        memset(m, 0, sizeof *m);
        m->pub.name = u->name;
        m->pub.expert_index = u->expert_index;
        m->pub.numel = u->numel;
        m->pub.n_tensors = u->n_tensors;
        m->pub.tensors = &f->h.tensors[u->first_tensor];
        MOE_TRY(add_piece(m, fi, r, u));
        MOE_TRY(hash_insert(c, id));
        mark[id] = fi;
        int q = pos + 1;
        int n_order = c->n_mus - 1;
        while (q < n_order && mark[c->order[q]] != fi)
            q++;
        memmove(&c->order[q + 1], &c->order[q], (size_t)(n_order - q) * sizeof *c->order);
        c->order[q] = id;
        for (int k = q; k <= n_order; k++)
            pos_of[c->order[k]] = k;
        pos = q;
    }
    return MOE_OK;
}

static int by_start(const void *a, const void *b, const moe_ckpt_piece *p)
{
    const moe_ckpt_piece *x = &p[*(const int *)a], *y = &p[*(const int *)b];
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return x->file < y->file ? -1 : x->file > y->file;
}

/* pieces sorted by (start, file), replicas dropped from the primary list,
 * coverage of [0, numel) checked */
static moe_status finish_unit(moe_ckpt *c, ck_mu *m)
{
    int n = m->pub.n_pieces;
    int *idx = malloc((size_t)n * sizeof *idx);
    m->primary = malloc((size_t)n * sizeof *m->primary);
    moe_ckpt_piece *ps = malloc((size_t)n * sizeof *ps);
    int *rs = malloc((size_t)n * sizeof *rs);
    if (!idx || !m->primary || !ps || !rs) {
        free(idx);
        free(ps);
        free(rs);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    for (int i = 0; i < n; i++)
        idx[i] = i;
    /* insertion sort: a handful of pieces per unit */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && by_start(&idx[j - 1], &idx[j], m->pieces) > 0; j--) {
            int t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    for (int i = 0; i < n; i++) {
        ps[i] = m->pieces[idx[i]];
        rs[i] = m->recs[idx[i]];
    }
    free(idx);
    free(m->pieces);
    free(m->recs);
    m->pieces = ps;
    m->recs = rs;
    m->pub.pieces = ps;
    int64_t covered = 0, prev_start = -1, prev_n = -1;
    m->n_primary = 0;
    for (int i = 0; i < n; i++) {
        const moe_ckpt_piece *p = &ps[i];
        if (p->start == prev_start && p->n == prev_n)
            continue; /* a replica (an expert on several ranks) */
        if (p->n > 0 && p->start < covered)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s: the pieces of unit '%s' overlap (files of different runs or "
                                 "shardings mixed)",
                                 c->files[p->file].path, m->pub.name);
        if (p->start > covered && covered < m->pub.numel)
            break;
        m->primary[m->n_primary++] = i;
        prev_start = p->start;
        prev_n = p->n;
        if (p->start + p->n > covered)
            covered = p->start + p->n;
    }
    if (covered < m->pub.numel)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s lacks elements %lld.. of unit '%s' (%lld parameters): a rank's file is "
                             "missing or from another save",
                             c->files[0].path, (long long)covered, m->pub.name, (long long)m->pub.numel);
    return MOE_OK;
}

/* every file of one save agrees with the first */
static moe_status same_save(const moe_ckpt *c, int fi)
{
    const ck_hdr *a = &c->files[0].h, *b = &c->files[fi].h;
    const char *pa = c->files[0].path, *pb = c->files[fi].path;
    if (b->world != a->world)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint files %s and %s are of different saves (written by %u and %u ranks): "
                             "every rank's file must come from the same save",
                             pa, pb, a->world, b->world);
    if (b->save_id != a->save_id || b->st.num_updates != a->st.num_updates || b->st.epoch != a->st.epoch)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint files %s and %s are of different saves (%lld and %lld updates, save ids "
                             "%016llx and %016llx): every rank's file must come from the same save",
                             pa, pb, (long long)a->st.num_updates, (long long)b->st.num_updates,
                             (unsigned long long)a->save_id, (unsigned long long)b->save_id);
    int same = strcmp(a->arch, b->arch) == 0 && strcmp(a->optimizer, b->optimizer) == 0 && a->act == b->act &&
               a->grad == b->grad && a->master == b->master && a->vocab == b->vocab &&
               a->opt_kind == b->opt_kind && a->fields == b->fields && a->scalars == b->scalars &&
               a->argc == b->argc && memcmp(a->fdt, b->fdt, sizeof a->fdt) == 0 &&
               memcmp(a->fscale, b->fscale, sizeof a->fscale) == 0;
    for (int i = 0; same && i < a->argc; i++)
        same = strcmp(a->argv[i], b->argv[i]) == 0;
    if (!same)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint files %s and %s disagree on the run (arch, precision, optimizer or command "
                             "line): files of different runs mixed",
                             pa, pb);
    return MOE_OK;
}

static void fill_meta(moe_ckpt *c)
{
    const ck_hdr *h = &c->files[0].h;
    moe_ckpt_meta *m = &c->meta;
    memset(m, 0, sizeof *m);
    m->version = h->version;
    m->world = (int)h->world;
    m->act_dtype = (moe_dtype)h->act;
    m->grad_dtype = (moe_dtype)h->grad;
    m->master = (int)h->master;
    m->save_id = h->save_id;
    m->vocab = h->vocab;
    m->padding_idx = h->padding_idx;
    snprintf(m->arch, sizeof m->arch, "%s", h->arch);
    snprintf(m->optimizer, sizeof m->optimizer, "%s", h->optimizer);
    m->state = h->st;
    m->opt_kind = (int)h->opt_kind;
    m->opt_layout.fields = h->opt_kind == MOE_CKPT_OPT_LAYOUT ? (int)h->fields : 0;
    m->opt_layout.scalars = h->opt_kind == MOE_CKPT_OPT_LAYOUT ? (int)h->scalars : 0;
    for (int f = 0; f < MOE_OPT_MAX_FIELDS; f++) {
        m->opt_layout.field_dtype[f] = (moe_dtype)h->fdt[f];
        m->opt_layout.field_scale[f] = h->fscale[f];
        snprintf(m->names_[f], LAYOUT_NAME, "%s", h->fname[f]);
        m->opt_layout.field_name[f] = m->names_[f];
    }
    for (int k = 0; k < MOE_OPT_MAX_SCALARS; k++) {
        snprintf(m->names_[MOE_OPT_MAX_FIELDS + k], LAYOUT_NAME, "%s", h->sname[k]);
        m->opt_layout.scalar_name[k] = m->names_[MOE_OPT_MAX_FIELDS + k];
    }
    m->opt_opaque_bytes = h->opaque_bytes;
    m->argc = h->argc;
    m->argv = h->argv;
    for (int i = 0; i < c->n_files; i++)
        for (int u = 0; u < c->files[i].h.n_units; u++)
            m->sharded |= c->files[i].h.units[u].sharded;
}

/* "dir/stem-rank-<r>.pt" -> its length up to "-rank-", or -1 */
static int rank_suffix(const char *path)
{
    size_t n = strlen(path);
    if (n < 3 || strcmp(path + n - 3, ".pt") != 0)
        return -1;
    size_t d = n - 3;
    while (d > 0 && path[d - 1] >= '0' && path[d - 1] <= '9')
        d--;
    if (d == n - 3 || d < 6 || strncmp(path + d - 6, "-rank-", 6) != 0)
        return -1;
    return (int)(d - 6);
}

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static int is_file(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

int moe_ckpt_exists(const char *path)
{
    char r0[4200];
    moe_ckpt_rank_path(r0, sizeof r0, NULL, path, 0);
    return is_file(path) || is_file(r0);
}

static moe_status open_set(moe_ckpt *c, const char *path)
{
    char stem[4200], p[4200];
    ck_file first;
    int first_rank = 0;
    moe_status st;
    if (is_file(path)) {
        if ((st = file_open(&first, path)) != MOE_OK) {
            file_close(&first);
            return st;
        }
        first_rank = (int)first.h.rank;
        int cut = rank_suffix(path);
        if (first.h.world == 1) {
            c->n_files = 1;
        } else if (cut < 0) {
            moe_status e = moe_error_set(MOE_ERR_INVALID_ARG,
                                         "checkpoint %s was written by %u ranks but is not named <name>-rank-<r>.pt; "
                                         "keep the per-rank files' names",
                                         path, first.h.world);
            file_close(&first);
            return e;
        }
        if (cut >= 0)
            snprintf(stem, sizeof stem, "%.*s.pt", cut, path);
        else
            snprintf(stem, sizeof stem, "%s", path);
    } else {
        snprintf(stem, sizeof stem, "%s", path);
        moe_ckpt_rank_path(p, sizeof p, NULL, stem, 0);
        if (!is_file(p))
            return moe_error_set(MOE_ERR_IO, "no checkpoint %s (neither that file nor its per-rank files %s, ...)",
                                 path, p);
        if ((st = file_open(&first, p)) != MOE_OK) {
            file_close(&first);
            return st;
        }
    }
    int cut = rank_suffix(base_name(stem));
    const char *bn = base_name(stem);
    if (cut >= 0)
        snprintf(c->name, sizeof c->name, "%.*s.pt", cut, bn);
    else
        snprintf(c->name, sizeof c->name, "%s", bn);
    int world = (int)first.h.world;
    c->n_files = c->n_files == 1 ? 1 : world;
    c->files = calloc((size_t)c->n_files, sizeof *c->files);
    if (!c->files) {
        file_close(&first);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    for (int i = 0; i < c->n_files; i++)
        c->files[i].fd = -1;
    if (c->n_files == 1)
        first_rank = 0;
    c->files[first_rank] = first;
    for (int r = 0; r < c->n_files; r++) {
        if (r == first_rank)
            continue;
        moe_ckpt_rank_path(p, sizeof p, NULL, stem, r);
        if (!is_file(p))
            return moe_error_set(MOE_ERR_IO, "checkpoint %s is missing: %s says the checkpoint was written by %d ranks",
                                 p, c->files[first_rank].path, world);
        MOE_TRY(file_open(&c->files[r], p));
    }
    return MOE_OK;
}

moe_status moe_ckpt_open(const char *path, moe_ckpt **out)
{
    *out = NULL;
    if (!little_endian())
        return not_little_endian();
    moe_ckpt *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    moe_status st = open_set(c, path);
    for (int i = 0; st == MOE_OK && i < c->n_files; i++)
        if ((int)c->files[i].h.rank != i)
            st = moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint file %s holds rank %u's state, expected rank %d's",
                               c->files[i].path, c->files[i].h.rank, i);
    int total = 0;
    for (int i = 1; st == MOE_OK && i < c->n_files; i++)
        st = same_save(c, i);
    for (int i = 0; st == MOE_OK && i < c->n_files; i++)
        total += c->files[i].h.n_units;
    int *mark = NULL, *pos_of = NULL;
    if (st == MOE_OK) {
        c->cap_mus = total > 0 ? total : 1;
        c->mus = calloc((size_t)c->cap_mus, sizeof *c->mus);
        c->order = calloc((size_t)c->cap_mus, sizeof *c->order);
        mark = malloc((size_t)c->cap_mus * sizeof *mark);
        pos_of = malloc((size_t)c->cap_mus * sizeof *pos_of);
        if (!c->mus || !c->order || !mark || !pos_of)
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    for (int i = 0; st == MOE_OK && i < c->n_files; i++)
        st = merge_file(c, i, mark, pos_of);
    free(mark);
    free(pos_of);
    for (int i = 0; st == MOE_OK && i < c->n_mus; i++)
        st = finish_unit(c, &c->mus[i]);
    if (st != MOE_OK) {
        moe_ckpt_close(c);
        return st;
    }
    fill_meta(c);
    *out = c;
    return MOE_OK;
}

void moe_ckpt_close(moe_ckpt *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->n_mus; i++) {
        free(c->mus[i].pieces);
        free(c->mus[i].recs);
        free(c->mus[i].primary);
    }
    for (int i = 0; i < c->n_files; i++)
        file_close(&c->files[i]);
    free(c->files);
    free(c->mus);
    free(c->order);
    free(c->hash);
    free(c->stage);
    free(c->raw);
    free(c->conv);
    free(c);
}

const moe_ckpt_meta *moe_ckpt_get_meta(const moe_ckpt *c) { return &c->meta; }
int moe_ckpt_num_files(const moe_ckpt *c) { return c->n_files; }
const char *moe_ckpt_file_path(const moe_ckpt *c, int file) { return c->files[file].path; }
uint64_t moe_ckpt_file_bytes(const moe_ckpt *c, int file) { return c->files[file].size; }
const char *moe_ckpt_name(const moe_ckpt *c) { return c->name; }
int moe_ckpt_num_units(const moe_ckpt *c) { return c->n_mus; }
const moe_ckpt_unit *moe_ckpt_unit_at(const moe_ckpt *c, int unit) { return &c->mus[c->order[unit]].pub; }

static moe_status buffers(moe_ckpt *c)
{
    if (!c->stage)
        c->stage = malloc(CHUNK_BYTES);
    if (!c->raw)
        c->raw = malloc((size_t)CHUNK_ELEMS * 4u);
    if (!c->conv)
        c->conv = malloc((size_t)CHUNK_ELEMS * 4u);
    if (!c->stage || !c->raw || !c->conv)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory for the checkpoint staging buffers");
    return MOE_OK;
}

/* ------------------------------------------------------------- sections */

/* A sink receives bytes of a part (ARR_*) at a byte offset into it. */
typedef moe_status (*ck_put_fn)(void *ctx, int part, uint64_t off, const void *data, uint64_t bytes);

typedef struct ck_part {
    int part;
    uint64_t off, len;   /* in the section */
} ck_part;

/* Reads a whole section in order, checking its checksum, and hands the bytes
 * of the listed parts to put. */
static moe_status scan_section(moe_ckpt *c, int fi, int sec, const ck_part *parts, int n_parts, ck_put_fn fn,
                               void *ctx)
{
    MOE_TRY(buffers(c));
    ck_file *f = &c->files[fi];
    uint64_t off = f->sec_off[sec], bytes = f->sec_bytes[sec];
    ck_hash h;
    ck_init(&h);
    for (uint64_t pos = 0; pos < bytes;) {
        uint64_t m = bytes - pos < CHUNK_BYTES ? bytes - pos : CHUNK_BYTES;
        MOE_TRY(pread_full(f, c->stage, m, off + pos));
        ck_update(&h, c->stage, (size_t)m);
        for (int k = 0; k < n_parts; k++) {
            uint64_t lo = parts[k].off > pos ? parts[k].off : pos;
            uint64_t hi = parts[k].off + parts[k].len < pos + m ? parts[k].off + parts[k].len : pos + m;
            if (lo < hi)
                MOE_TRY(fn(ctx, parts[k].part, lo - parts[k].off, c->stage + (lo - pos), hi - lo));
        }
        pos += m;
    }
    uint64_t sum = ck_final(&h);
    if (sum != f->sec_sum[sec])
        return corrupt(f, sec, f->sec_sum[sec], sum);
    f->verified[sec] = 1;
    return MOE_OK;
}

static moe_status ensure_verified(moe_ckpt *c, int fi, int sec)
{
    if (c->files[fi].verified[sec])
        return MOE_OK;
    return scan_section(c, fi, sec, NULL, 0, NULL, NULL);
}

moe_status moe_ckpt_verify(moe_ckpt *c)
{
    MOE_TRY(buffers(c));
    for (int fi = 0; fi < c->n_files; fi++) {
        ck_file *f = &c->files[fi];
        uint64_t end = f->size - 16; /* the whole-file checksum covers what precedes it */
        ck_hash whole, sec;
        ck_init(&whole);
        ck_init(&sec);
        int s = 0;
        uint64_t sec_end = f->sec_off[0] + f->sec_bytes[0];
        for (uint64_t pos = 0; pos < end;) {
            uint64_t m = end - pos < CHUNK_BYTES ? end - pos : CHUNK_BYTES;
            MOE_TRY(pread_full(f, c->stage, m, pos));
            ck_update(&whole, c->stage, (size_t)m);
            uint64_t at = pos;
            while (s < f->n_sections && at < pos + m) {
                uint64_t take = (sec_end < pos + m ? sec_end : pos + m) - at;
                ck_update(&sec, c->stage + (at - pos), (size_t)take);
                at += take;
                if (at == sec_end) {
                    uint64_t sum = ck_final(&sec);
                    if (sum != f->sec_sum[s])
                        return corrupt(f, s, f->sec_sum[s], sum);
                    f->verified[s] = 1;
                    ck_init(&sec);
                    if (++s < f->n_sections)
                        sec_end = f->sec_off[s] + f->sec_bytes[s];
                }
            }
            pos += m;
        }
        uint64_t stored;
        MOE_TRY(pread_full(f, &stored, 8, end));
        uint64_t sum = ck_final(&whole);
        if (sum != stored)
            return moe_error_set(MOE_ERR_IO,
                                 "checkpoint %s is corrupt: checksum mismatch of the whole file (stored %016llx, "
                                 "computed %016llx); restore an older checkpoint or start afresh",
                                 f->path, (unsigned long long)stored, (unsigned long long)sum);
    }
    return MOE_OK;
}

/* ------------------------------------------------------------- assembly */

static moe_dtype arr_dtype(const ck_hdr *h, int arr)
{
    if (arr == ARR_PARAMS)
        return (moe_dtype)h->act;
    if (arr >= ARR_FIELD && arr < ARR_SCALARS)
        return (moe_dtype)h->fdt[arr - ARR_FIELD];
    return MOE_F32;
}

/* byte offset of a part in a unit's section, and its length */
static uint64_t part_offset(const ck_hdr *h, const ck_unit *u, int arr, uint64_t *len)
{
    uint64_t n = (uint64_t)u->n, off = 0;
    uint64_t act = moe_dtype_size((moe_dtype)h->act);
    if (arr == ARR_PARAMS) {
        *len = n * act;
        return 0;
    }
    off += n * act;
    if (arr == ARR_MASTER) {
        *len = h->master ? n * 4u : 0u;
        return off;
    }
    if (h->master)
        off += n * 4u;
    uint32_t fields = h->opt_kind == MOE_CKPT_OPT_LAYOUT ? h->fields : 0;
    for (uint32_t f = 0; f < fields; f++) {
        uint64_t fl = n * moe_dtype_size((moe_dtype)h->fdt[f]);
        if (arr == ARR_FIELD + (int)f) {
            *len = fl;
            return off;
        }
        off += fl;
    }
    if (arr == ARR_SCALARS) {
        *len = h->opt_kind == MOE_CKPT_OPT_LAYOUT && u->numel > 0 ? (uint64_t)h->scalars * 4u : 0u;
        return off;
    }
    *len = 0;
    return off;
}

/* elements [first, first + n) of piece i's array, as stored */
static moe_status piece_read(moe_ckpt *c, const ck_mu *m, int i, int arr, int64_t first, int64_t n, void *dst)
{
    int fi = m->pieces[i].file;
    const ck_file *f = &c->files[fi];
    const ck_unit *u = &f->h.units[m->recs[i]];
    MOE_TRY(ensure_verified(c, fi, u->section));
    uint64_t len, off = part_offset(&f->h, u, arr, &len);
    size_t es = moe_dtype_size(arr_dtype(&f->h, arr));
    if ((uint64_t)(first + n) * es > len)
        return moe_error_set(MOE_ERR_INTERNAL, "checkpoint %s: read past part %d of unit '%s'", f->path, arr,
                             u->name);
    return pread_full(f, dst, (uint64_t)n * es, u->off + off + (uint64_t)first * es);
}

/* elements [a, a + len) of a unit's array as stored, zeros past numel;
 * len <= CHUNK_ELEMS */
static moe_status assemble_raw(moe_ckpt *c, const ck_mu *m, int arr, int64_t a, int64_t len, void *dst)
{
    size_t es = moe_dtype_size(arr_dtype(&c->files[0].h, arr));
    memset(dst, 0, (size_t)len * es);
    for (int k = 0; k < m->n_primary; k++) {
        const moe_ckpt_piece *p = &m->pieces[m->primary[k]];
        int64_t lo = a > p->start ? a : p->start;
        int64_t hi = a + len;
        if (p->start + p->n < hi)
            hi = p->start + p->n;
        if (m->pub.numel < hi)
            hi = m->pub.numel;
        if (lo < hi)
            MOE_TRY(piece_read(c, m, m->primary[k], arr, lo - p->start, hi - lo, (char *)dst + (size_t)(lo - a) * es));
    }
    return MOE_OK;
}

/* elements [a, a + len) of an array in out_dt, chunk by chunk, to part `part` of the sink */
static moe_status produce(moe_ckpt *c, const ck_mu *m, int arr, int64_t a, int64_t len, moe_dtype out_dt, int part,
                          ck_put_fn fn, void *ctx)
{
    MOE_TRY(buffers(c));
    moe_dtype sdt = arr_dtype(&c->files[0].h, arr);
    size_t os = moe_dtype_size(out_dt);
    for (int64_t x = 0; x < len; x += CHUNK_ELEMS) {
        int64_t k = len - x < CHUNK_ELEMS ? len - x : CHUNK_ELEMS;
        MOE_TRY(assemble_raw(c, m, arr, a + x, k, c->raw));
        const void *out = c->raw;
        if (out_dt != sdt) {
            convert(c->conv, out_dt, c->raw, sdt, k);
            out = c->conv;
        }
        MOE_TRY(fn(ctx, part, (uint64_t)x * os, out, (uint64_t)k * os));
    }
    return MOE_OK;
}

/* a piece's scalar s (fp32) */
static moe_status piece_scalar(moe_ckpt *c, const ck_mu *m, int i, int s, float *v)
{
    return piece_read(c, m, i, ARR_SCALARS, s, 1, v);
}

/* A scaled fp16 field cut anew: dequantized with each piece's scale, then
 * requantized over [a, a + len) with the kernel's rule (optim.c). */
static moe_status produce_scaled(moe_ckpt *c, const ck_mu *m, int f, int64_t a, int64_t len, ck_put_fn fn, void *ctx,
                                 float *scale_out)
{
    MOE_TRY(buffers(c));
    const int arr = ARR_FIELD + f, s = c->files[0].h.fscale[f];
    float mx = 0.0f;
    for (int pass = 0; pass < 2; pass++) {
        const float nscale = 1e-8f + mx / FP16_MAX;
        for (int64_t x = 0; x < len; x += CHUNK_ELEMS) {
            int64_t k = len - x < CHUNK_ELEMS ? len - x : CHUNK_ELEMS;
            uint16_t *out = (uint16_t *)c->conv;
            if (pass == 1)
                memset(out, 0, (size_t)k * 2u); /* past numel: 0 / scale */
            for (int q = 0; q < m->n_primary; q++) {
                int i = m->primary[q];
                const moe_ckpt_piece *p = &m->pieces[i];
                int64_t lo = a + x > p->start ? a + x : p->start, hi = a + x + k;
                if (p->start + p->n < hi)
                    hi = p->start + p->n;
                if (m->pub.numel < hi)
                    hi = m->pub.numel;
                if (lo >= hi)
                    continue;
                float sc;
                MOE_TRY(piece_scalar(c, m, i, s, &sc));
                const uint16_t *raw = (const uint16_t *)c->raw;
                MOE_TRY(piece_read(c, m, i, arr, lo - p->start, hi - lo, c->raw));
                for (int64_t e = 0; e < hi - lo; e++) {
                    float v = moe_f16_to_f32(raw[e]) * sc;
                    if (pass == 0)
                        mx = absmax_update(mx, v);
                    else
                        out[lo - (a + x) + e] = moe_f32_to_f16(v / nscale);
                }
            }
            if (pass == 1)
                MOE_TRY(fn(ctx, ARR_FIELD + f, (uint64_t)x * 2u, out, (uint64_t)k * 2u));
        }
        if (pass == 1)
            *scale_out = nscale;
    }
    return MOE_OK;
}

/* What a range is wanted as. */
typedef struct ck_want {
    moe_dtype act;       /* parameters in this dtype */
    int params_src;      /* ARR_PARAMS, or ARR_MASTER (converted) */
    int master;          /* also fp32 masters */
    int master_src;      /* ARR_MASTER, or ARR_PARAMS (widened) */
    int opt;             /* also the optimizer fields and scalars (a laid-out state) */
} ck_want;

/* Elements [start, start + n) of model unit m, as `w` says, to the sink:
 * the parts in file order (parameters, masters, fields, scalars). A file's
 * piece of exactly that range is copied byte for byte in one read. */
static moe_status fill_range(moe_ckpt *c, const ck_mu *m, int64_t start, int64_t n, const ck_want *w, ck_put_fn fn,
                             void *ctx)
{
    const ck_hdr *h = &c->files[0].h;
    if (n == 0)
        return MOE_OK;
    int verbatim = -1;
    if (w->params_src == ARR_PARAMS && w->act == (moe_dtype)h->act && (!w->master || w->master_src == ARR_MASTER))
        for (int i = 0; i < m->pub.n_pieces && verbatim < 0; i++)
            if (m->pieces[i].start == start && m->pieces[i].n == n)
                verbatim = i;
    if (verbatim >= 0) {
        const ck_file *f = &c->files[m->pieces[verbatim].file];
        const ck_unit *u = &f->h.units[m->recs[verbatim]];
        ck_part parts[ARR_COUNT];
        int np = 0;
        for (int arr = 0; arr < ARR_COUNT; arr++) {
            if (arr == ARR_MASTER && !w->master)
                continue;
            if (arr >= ARR_FIELD && !w->opt)
                continue;
            uint64_t len, off = part_offset(&f->h, u, arr, &len);
            if (len > 0)
                parts[np++] = (ck_part){arr, off, len};
        }
        return scan_section(c, m->pieces[verbatim].file, u->section, parts, np, fn, ctx);
    }
    MOE_TRY(produce(c, m, w->params_src, start, n, w->act, ARR_PARAMS, fn, ctx));
    if (w->master)
        MOE_TRY(produce(c, m, w->master_src, start, n, MOE_F32, ARR_MASTER, fn, ctx));
    if (!w->opt)
        return MOE_OK;
    float scalars[MOE_OPT_MAX_SCALARS] = {0};
    int set[MOE_OPT_MAX_SCALARS] = {0};
    for (uint32_t f = 0; f < h->fields; f++) {
        if (h->fscale[f] >= 0) {
            MOE_TRY(produce_scaled(c, m, (int)f, start, n, fn, ctx, &scalars[h->fscale[f]]));
            set[h->fscale[f]] = 1;
        } else {
            MOE_TRY(produce(c, m, ARR_FIELD + (int)f, start, n, (moe_dtype)h->fdt[f], ARR_FIELD + (int)f, fn, ctx));
        }
    }
    if (h->scalars == 0 || m->pub.numel == 0)
        return MOE_OK;
    /* a scalar no field refers to: the first overlapping piece's */
    int from = m->primary[0];
    for (int q = 0; q < m->n_primary; q++) {
        const moe_ckpt_piece *p = &m->pieces[m->primary[q]];
        if (p->start < start + n && p->start + p->n > start) {
            from = m->primary[q];
            break;
        }
    }
    for (uint32_t s = 0; s < h->scalars; s++)
        if (!set[s])
            MOE_TRY(piece_scalar(c, m, from, (int)s, &scalars[s]));
    return fn(ctx, ARR_SCALARS, 0, scalars, (uint64_t)h->scalars * 4u);
}

/* ---------------------------------------------------------- reading API */

typedef struct mem_sink {
    void *dst;
} mem_sink;

static moe_status mem_put(void *ctx, int part, uint64_t off, const void *data, uint64_t bytes)
{
    (void)part;
    memcpy((char *)((mem_sink *)ctx)->dst + off, data, (size_t)bytes);
    return MOE_OK;
}

int moe_ckpt_num_buffers(const moe_ckpt *c) { return c->files[0].h.n_bufs; }

void moe_ckpt_buffer_at(const moe_ckpt *c, int i, const char **name, int64_t *n)
{
    *name = c->files[0].h.bufs[i].name;
    *n = c->files[0].h.bufs[i].n;
}

int moe_ckpt_find_buffer(const moe_ckpt *c, const char *name)
{
    for (int i = 0; i < c->files[0].h.n_bufs; i++)
        if (strcmp(c->files[0].h.bufs[i].name, name) == 0)
            return i;
    return -1;
}

moe_status moe_ckpt_read_buffer(moe_ckpt *c, int i, float *dst)
{
    const ck_buf *b = &c->files[0].h.bufs[i];
    mem_sink sink = {dst};
    ck_part part = {0, 0, b->bytes};
    return scan_section(c, 0, b->section, &part, 1, mem_put, &sink);
}

moe_status moe_ckpt_read(moe_ckpt *c, int unit, int master, int64_t first, int64_t n, moe_dtype dtype, void *dst)
{
    const ck_mu *m = &c->mus[c->order[unit]];
    if (master && !c->meta.master)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s holds no fp32 master weights", c->files[0].path);
    if (first < 0 || n < 0 || first + n > m->pub.numel)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s: elements %lld..%lld are outside unit '%s'",
                             c->files[0].path, (long long)first, (long long)(first + n), m->pub.name);
    mem_sink s = {dst};
    return produce(c, m, master ? ARR_MASTER : ARR_PARAMS, first, n, dtype, ARR_PARAMS, mem_put, &s);
}

/* ------------------------------------------------ the run's optimizer */

#define ARR_OPAQUE ARR_COUNT /* a sink part: the opaque optimizer bytes */

static moe_status run_opt_layout(const moe_ckpt_run *run, ck_hdr *h)
{
    h->opt_kind = MOE_CKPT_OPT_NONE;
    snprintf(h->optimizer, sizeof h->optimizer, "%s", run->optimizer ? run->optimizer : "");
    for (int f = 0; f < MOE_OPT_MAX_FIELDS; f++)
        h->fscale[f] = -1;
    if (!run->opt_ops || !run->opt)
        return MOE_OK;
    uint64_t bytes = run->opt_ops->state_bytes ? run->opt_ops->state_bytes(run->opt) : 0;
    if (run->opt_ops->state_layout) {
        moe_opt_state_layout l;
        memset(&l, 0, sizeof l);
        run->opt_ops->state_layout(run->opt, &l);
        if (l.fields < 0 || l.fields > MOE_OPT_MAX_FIELDS || l.scalars < 0 || l.scalars > MOE_OPT_MAX_SCALARS)
            return moe_error_set(MOE_ERR_INTERNAL, "optimizer %s: its state layout has %d fields and %d scalars, "
                                 "at most %d and %d are possible", h->optimizer, l.fields, l.scalars,
                                 MOE_OPT_MAX_FIELDS, MOE_OPT_MAX_SCALARS);
        for (int f = 0; f < l.fields; f++)
            if (!storage_dtype((uint32_t)l.field_dtype[f]) || l.field_scale[f] < -1 ||
                l.field_scale[f] >= l.scalars || (l.field_scale[f] >= 0 && l.field_dtype[f] != MOE_F16))
                return moe_error_set(MOE_ERR_INTERNAL, "optimizer %s: field %d of its state layout is not fp32/fp16/"
                                     "bf16 or refers to a scalar it lacks (scaled fields are fp16)", h->optimizer, f);
        h->opt_kind = MOE_CKPT_OPT_LAYOUT;
        h->fields = (uint32_t)l.fields;
        h->scalars = (uint32_t)l.scalars;
        for (int f = 0; f < l.fields; f++) {
            h->fdt[f] = (uint32_t)l.field_dtype[f];
            h->fscale[f] = l.field_scale[f];
            snprintf(h->fname[f], LAYOUT_NAME, "%s", l.field_name[f] ? l.field_name[f] : "");
        }
        for (int k = 0; k < l.scalars; k++)
            snprintf(h->sname[k], LAYOUT_NAME, "%s", l.scalar_name[k] ? l.scalar_name[k] : "");
    } else if (bytes > 0) {
        h->opt_kind = MOE_CKPT_OPT_OPAQUE;
        h->opaque_bytes = bytes;
    }
    return MOE_OK;
}

/* Where tensor k's parts lie in the optimizer's byte string: the trainer
 * hands it one tensor per unit with numel > 0, in unit order, n = the shard. */
typedef struct opt_map {
    uint64_t fpe;        /* field bytes per element */
    uint64_t scal_base;  /* where the scalars begin */
    uint64_t total;
} opt_map;

static moe_status opt_map_make(const ck_hdr *h, moe_runtime *rt, const moe_ckpt_run *run, opt_map *m)
{
    memset(m, 0, sizeof *m);
    if (h->opt_kind != MOE_CKPT_OPT_LAYOUT)
        return MOE_OK;
    m->fpe = field_bytes(h);
    int64_t total_n = 0, k = 0;
    for (int i = 0; i < moe_runtime_num_units(rt); i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        if (u.numel > 0) {
            total_n += u.shard;
            k++;
        }
    }
    m->scal_base = (uint64_t)total_n * m->fpe;
    m->total = m->scal_base + (uint64_t)k * h->scalars * 4u;
    uint64_t have = run->opt_ops->state_bytes ? run->opt_ops->state_bytes(run->opt) : 0;
    if (have != m->total)
        return moe_error_set(MOE_ERR_INTERNAL,
                             "optimizer %s: its state layout describes %llu bytes over this run's tensors, "
                             "state_bytes says %llu",
                             h->optimizer, (unsigned long long)m->total, (unsigned long long)have);
    return MOE_OK;
}

static void opt_offsets(const ck_hdr *h, const opt_map *m, int64_t prefix_n, int64_t n, int k, uint64_t *field_off,
                        uint64_t *scalar_off)
{
    uint64_t off = (uint64_t)prefix_n * m->fpe;
    for (uint32_t f = 0; f < h->fields; f++) {
        field_off[f] = off;
        off += (uint64_t)n * moe_dtype_size((moe_dtype)h->fdt[f]);
    }
    *scalar_off = m->scal_base + (uint64_t)k * h->scalars * 4u;
}

/* ----------------------------------------------------------------- save */

/* the runtime's units and tensors into h (names borrowed) */
static moe_status hdr_from_runtime(moe_runtime *rt, ck_hdr *h)
{
    int nu = moe_runtime_num_units(rt), np = moe_runtime_num_params(rt);
    h->units = calloc(nu ? (size_t)nu : 1u, sizeof *h->units);
    h->tensors = calloc(np ? (size_t)np : 1u, sizeof *h->tensors);
    int *count = calloc(nu ? (size_t)nu + 1 : 2u, sizeof *count);
    if (!h->units || !h->tensors || !count) {
        free(count);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing a checkpoint");
    }
    for (int p = 0; p < np; p++) {
        moe_param_info pi;
        moe_runtime_param(rt, p, &pi);
        count[pi.unit + 1]++;
    }
    for (int i = 0; i < nu; i++)
        count[i + 1] += count[i];
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        ck_unit *cu = &h->units[i];
        cu->name = (char *)u.name;
        cu->expert_index = u.expert_index;
        cu->sharded = u.sharded;
        cu->numel = u.numel;
        cu->padded = u.padded;
        cu->start = u.start;
        cu->n = u.shard;
        cu->first_tensor = count[i];
        cu->n_tensors = count[i + 1] - count[i];
        h->sharded |= (uint32_t)u.sharded;
        h->master |= u.master != NULL;
    }
    int *fill = calloc(nu ? (size_t)nu : 1u, sizeof *fill);
    if (!fill) {
        free(count);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing a checkpoint");
    }
    for (int p = 0; p < np; p++) {
        moe_param_info pi;
        moe_runtime_param(rt, p, &pi);
        moe_ckpt_tensor *t = &h->tensors[count[pi.unit] + fill[pi.unit]++];
        t->name = pi.name;
        t->ndim = pi.ndim;
        t->shape[0] = pi.shape[0];
        t->shape[1] = pi.shape[1];
        t->offset = pi.offset;
        t->numel = pi.numel;
    }
    free(fill);
    free(count);
    h->n_units = nu;
    h->n_tensors = np;
    return MOE_OK;
}

/* backend memory to the file, through the staging buffer */
static moe_status w_device(ck_writer *w, const moe_host *h, const void *dev, uint64_t bytes, void *stage)
{
    for (uint64_t off = 0; off < bytes; off += CHUNK_BYTES) {
        uint64_t m = bytes - off < CHUNK_BYTES ? bytes - off : CHUNK_BYTES;
        MOE_TRY(h->backend->copy_to_host(h->ctx, stage, (const char *)dev + off, m));
        MOE_TRY(w_put(w, stage, (size_t)m));
    }
    return MOE_OK;
}

/* optimizer bytes [off, off + bytes) to the file */
static moe_status w_opt(ck_writer *w, const moe_ckpt_run *run, uint64_t off, uint64_t bytes, void *stage)
{
    for (uint64_t x = 0; x < bytes; x += CHUNK_BYTES) {
        uint64_t m = bytes - x < CHUNK_BYTES ? bytes - x : CHUNK_BYTES;
        MOE_TRY(run->opt_ops->save_state(run->opt, off + x, stage, m));
        MOE_TRY(w_put(w, stage, (size_t)m));
    }
    return MOE_OK;
}

static moe_status save_body(const moe_ckpt_run *run, ck_hdr *hd, ck_writer *w, void *stage)
{
    const moe_host *h = moe_runtime_host(run->rt);
    hbuf b = {0};
    build_header(hd, &b);
    if (b.oom) {
        free(b.p);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory writing checkpoint %s", w->path);
    }
    w_begin(w);
    moe_status st = w_put(w, b.p, b.n);
    free(b.p);
    MOE_TRY(st);
    w_end(w);
    MOE_TRY(h->backend->synchronize(h->ctx));
    opt_map om;
    MOE_TRY(opt_map_make(hd, run->rt, run, &om));
    int64_t prefix = 0;
    int k = 0;
    for (int i = 0; i < hd->n_units; i++) {
        moe_unit_info u;
        moe_runtime_unit(run->rt, i, &u);
        w_begin(w);
        if (u.numel > 0) {
            const void *param = u.sharded ? u.param_shard : u.param;
            if (!param)
                return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit '%s' has no parameters to save", u.name);
            MOE_TRY(w_device(w, h, param, (uint64_t)u.shard * moe_dtype_size(h->act_dtype), stage));
            if (hd->master) {
                if (!u.master)
                    return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit '%s' has no master copy", u.name);
                MOE_TRY(w_device(w, h, u.master, (uint64_t)u.shard * 4u, stage));
            }
            if (hd->opt_kind == MOE_CKPT_OPT_LAYOUT) {
                uint64_t fo[MOE_OPT_MAX_FIELDS], so;
                opt_offsets(hd, &om, prefix, u.shard, k, fo, &so);
                for (uint32_t f = 0; f < hd->fields; f++)
                    MOE_TRY(w_opt(w, run, fo[f], (uint64_t)u.shard * moe_dtype_size((moe_dtype)hd->fdt[f]), stage));
                MOE_TRY(w_opt(w, run, so, (uint64_t)hd->scalars * 4u, stage));
            }
            prefix += u.shard;
            k++;
        }
        w_end(w);
        if (w->sec_bytes[w->cur_sec] != hd->units[i].bytes)
            return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit '%s' wrote %llu bytes, expected %llu", u.name,
                                 (unsigned long long)w->sec_bytes[w->cur_sec],
                                 (unsigned long long)hd->units[i].bytes);
    }
    for (int i = 0; i < hd->n_bufs; i++) {
        w_begin(w);
        MOE_TRY(w_device(w, h, run->buffers[i].data, hd->bufs[i].bytes, stage));
        w_end(w);
    }
    if (hd->opt_kind == MOE_CKPT_OPT_OPAQUE) {
        w_begin(w);
        MOE_TRY(w_opt(w, run, 0, hd->opaque_bytes, stage));
        w_end(w);
    }
    return w_finish(w);
}

moe_status moe_ckpt_save(const moe_ckpt_run *run, const moe_ckpt_state *s, const char *path)
{
    if (!little_endian())
        return not_little_endian();
    const moe_host *h = moe_runtime_host(run->rt);
    ck_hdr hd;
    memset(&hd, 0, sizeof hd);
    hd.world = (uint32_t)h->world;
    hd.rank = (uint32_t)h->rank;
    hd.act = (uint32_t)h->act_dtype;
    hd.grad = (uint32_t)h->grad_dtype;
    hd.save_id = s->save_id;
    hd.vocab = run->vocab;
    hd.padding_idx = h->padding_idx;
    snprintf(hd.arch, sizeof hd.arch, "%s", run->arch ? run->arch : "");
    hd.st = *s;
    const char *const *args;
    hd.argc = moe_runtime_args(run->rt, &args);
    hd.argv = malloc(((size_t)hd.argc + 1) * sizeof *hd.argv);
    moe_status st = hd.argv ? MOE_OK : moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    for (int i = 0; st == MOE_OK && i < hd.argc; i++)
        hd.argv[i] = (char *)args[i];
    if (st == MOE_OK)
        st = run_opt_layout(run, &hd);
    if (st == MOE_OK && hd.opt_kind != MOE_CKPT_OPT_NONE && !run->opt_ops->save_state)
        st = moe_error_set(MOE_ERR_UNSUPPORTED, "optimizer %s reports state but cannot save it", hd.optimizer);
    if (st == MOE_OK)
        st = hdr_from_runtime(run->rt, &hd);
    if (st == MOE_OK && run->n_buffers > 0) {
        hd.bufs = calloc((size_t)run->n_buffers, sizeof *hd.bufs);
        if (!hd.bufs)
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory writing a checkpoint");
        for (int i = 0; st == MOE_OK && i < run->n_buffers; i++) {
            hd.bufs[i].name = (char *)run->buffers[i].name;
            hd.bufs[i].n = run->buffers[i].n;
        }
        hd.n_bufs = hd.bufs ? run->n_buffers : 0;
    }
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    void *stage = st == MOE_OK ? malloc(CHUNK_BYTES) : NULL;
    if (st == MOE_OK && !stage)
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory for the checkpoint staging buffer");
    ck_writer w;
    memset(&w, 0, sizeof w);
    if (st == MOE_OK)
        st = w_open(&w, tmp, n_sections_of(&hd));
    if (st == MOE_OK)
        st = save_body(run, &hd, &w, stage);
    st = w_close(&w, st);
    free(stage);
    hdr_free(&hd);
    if (st == MOE_OK && rename(tmp, path) != 0)
        st = moe_error_set(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st != MOE_OK) {
        unlink(tmp);
        return st;
    }
    moe_ckpt_sync_dir(path);
    return MOE_OK;
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* rank 0's id for this save, broadcast (every rank calls this together) */
static moe_status agree_save_id(const moe_host *h, int64_t num_updates, uint64_t *id)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    *id = splitmix((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
          splitmix(((uint64_t)getpid() << 32) ^ (uint64_t)num_updates);
    if (h->world <= 1 || !h->comm_ops)
        return MOE_OK;
    void *dev = NULL;
    MOE_TRY(h->backend->alloc(h->ctx, 8, "checkpoint save id", &dev));
    moe_status st = h->backend->copy_from_host(h->ctx, dev, id, 8);
    if (st == MOE_OK)
        st = h->comm_ops->broadcast(h->comm, NULL, dev, 2, MOE_I32, 0);
    if (st == MOE_OK)
        st = h->backend->copy_to_host(h->ctx, id, dev, 8);
    h->backend->free(h->ctx, dev);
    return st;
}

typedef struct interval_ckpt {
    int64_t updates;
    char name[256];
} interval_ckpt;

static int by_updates_desc(const void *a, const void *b)
{
    int64_t x = ((const interval_ckpt *)a)->updates, y = ((const interval_ckpt *)b)->updates;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* --keep-interval-updates N: this rank's checkpoint_<E>_<U> files beyond
 * the N with the most updates are deleted (fairseq's order) */
static void prune_interval_checkpoints(const char *dir, int rank, int64_t keep)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    interval_ckpt *list = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long ep, up;
        int r, end = 0;
        if (sscanf(e->d_name, "checkpoint_%lld_%lld-rank-%d.pt%n", &ep, &up, &r, &end) != 3 ||
            e->d_name[end] != '\0' || end == 0 || r != rank)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            interval_ckpt *l = realloc(list, cap * sizeof *l);
            if (!l)
                break;
            list = l;
        }
        list[n].updates = up;
        snprintf(list[n].name, sizeof list[n].name, "%s", e->d_name);
        n++;
    }
    closedir(d);
    if (n > 0)
        qsort(list, n, sizeof *list, by_updates_desc);
    for (size_t i = (size_t)keep; i < n; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, list[i].name);
        if (unlink(path) == 0)
            moe_log(MOE_LOG_DEBUG, "fairseq.checkpoint_utils", "removed old checkpoint %s", path);
    }
    free(list);
}

moe_status moe_ckpt_save_all(const moe_ckpt_run *run, const moe_ckpt_state *s, const moe_ckpt_save_spec *spec,
                             int *wrote)
{
    *wrote = 0;
    const moe_host *h = moe_runtime_host(run->rt);
    const char *dir = spec->dir && *spec->dir ? spec->dir : ".";
    char names[4][4400], name[64];
    int n = 0;
    if (spec->epoch_file) {
        snprintf(name, sizeof name, "checkpoint%lld.pt", (long long)s->epoch);
        moe_ckpt_rank_path(names[n++], sizeof names[0], dir, name, h->rank);
    }
    if (spec->interval_file) {
        snprintf(name, sizeof name, "checkpoint_%lld_%lld.pt", (long long)s->epoch, (long long)s->num_updates);
        moe_ckpt_rank_path(names[n++], sizeof names[0], dir, name, h->rank);
    }
    if (spec->best_file)
        moe_ckpt_rank_path(names[n++], sizeof names[0], dir, "checkpoint_best.pt", h->rank);
    if (spec->last_file)
        moe_ckpt_rank_path(names[n++], sizeof names[0], dir, "checkpoint_last.pt", h->rank);
    if (n == 0)
        return MOE_OK;
    double start = moe_mono_s();
    moe_ckpt_state st = *s;
    MOE_TRY(agree_save_id(h, s->num_updates, &st.save_id));
    MOE_TRY(moe_ckpt_mkdirs(dir));
    MOE_TRY(moe_ckpt_save(run, &st, names[0]));
    for (int i = 1; i < n; i++) {
        char tmp[9000];
        snprintf(tmp, sizeof tmp, "%s.tmp", names[i]);
        unlink(tmp);
        if (link(names[0], tmp) == 0 && rename(tmp, names[i]) == 0)
            continue;
        unlink(tmp);
        MOE_TRY(moe_ckpt_save(run, &st, names[i]));
    }
    *wrote = 1;
    char score[40], took[40];
    if (isnan(spec->score))
        snprintf(score, sizeof score, "None");
    else
        moe_format_pyfloat(score, sizeof score, spec->score);
    moe_format_pyfloat(took, sizeof took, moe_mono_s() - start);
    moe_log(MOE_LOG_INFO, "fairseq.checkpoint_utils",
            "saved checkpoint %s (epoch %lld @ %lld updates, score %s) (writing took %s seconds)", names[0],
            (long long)s->epoch, (long long)s->num_updates, score, took);
    if (spec->interval_file && spec->keep_interval >= 0)
        prune_interval_checkpoints(dir, h->rank, spec->keep_interval);
    return MOE_OK;
}

/* ----------------------------------------------------------------- load */

/* the checkpoint's model against the run's: arch, units, tensors (and, when
 * strict, the precision) */
static moe_status check_run(moe_ckpt *c, moe_runtime *rt, const char *arch, int strict)
{
    const ck_hdr *h = &c->files[0].h;
    const moe_host *hh = moe_runtime_host(rt);
    const char *path = c->files[0].path;
    if (arch && strcmp(h->arch, arch) != 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s is of --arch %s, this run is %s", path, h->arch,
                             arch);
    int nu = moe_runtime_num_units(rt), run_master = 0, run_ne = 0;
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        run_master |= u.master != NULL;
    }
    if (strict && (h->act != (uint32_t)hh->act_dtype || h->grad != (uint32_t)hh->grad_dtype))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s holds %s parameters and %s gradients, this run %s and %s (different "
                             "--fp16/--bf16/--memory-efficient-* flags)",
                             path, moe_ckpt_dtype_name((moe_dtype)h->act), moe_ckpt_dtype_name((moe_dtype)h->grad),
                             moe_ckpt_dtype_name(hh->act_dtype), moe_ckpt_dtype_name(hh->grad_dtype));
    if (strict && (int)h->master != run_master)
        return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s %s fp32 master weights, this run %s", path,
                             h->master ? "has" : "has no", run_master ? "keeps them" : "does not");
    /* tensors of each runtime unit, in order */
    int np = moe_runtime_num_params(rt);
    int *next = calloc(nu ? (size_t)nu : 1u, sizeof *next);
    if (!next)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    moe_status st = MOE_OK;
    for (int i = 0; i < nu && st == MOE_OK; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        run_ne += u.expert_index < 0;
        int mu = moe_ckpt_find_unit(c, u.name);
        if (mu < 0) {
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s has no unit '%s', which this run has: a different model shape "
                               "(--decoder-layers, --moe-freq or --moe-expert-count?)",
                               path, u.name);
            break;
        }
        const moe_ckpt_unit *m = &c->mus[mu].pub;
        if (m->numel != u.numel || m->expert_index != u.expert_index)
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s: unit '%s' has %lld parameters, in this run %lld: a different model "
                               "shape (--decoder-embed-dim, --decoder-ffn-embed-dim, --moe-expert-count, "
                               "vocabulary?)",
                               path, u.name, (long long)m->numel, (long long)u.numel);
    }
    for (int p = 0; p < np && st == MOE_OK; p++) {
        moe_param_info pi;
        moe_runtime_param(rt, p, &pi);
        moe_unit_info u;
        moe_runtime_unit(rt, pi.unit, &u);
        const moe_ckpt_unit *m = &c->mus[moe_ckpt_find_unit(c, u.name)].pub;
        int k = next[pi.unit]++;
        const moe_ckpt_tensor *t = k < m->n_tensors ? &m->tensors[k] : NULL;
        if (!t || strcmp(t->name, pi.name) != 0 || t->ndim != pi.ndim || t->shape[0] != pi.shape[0] ||
            t->shape[1] != pi.shape[1] || t->offset != pi.offset) {
            char a[64] = "absent", b[64];
            if (t)
                shape_text(a, sizeof a, t->ndim, t->shape);
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s: tensor %d of unit '%s' is '%s' (%s) there, '%s' (%s) in this run: a "
                               "different model shape",
                               path, k, u.name, t ? t->name : "", a, pi.name,
                               shape_text(b, sizeof b, pi.ndim, pi.shape));
        }
    }
    for (int i = 0; i < nu && st == MOE_OK; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        const moe_ckpt_unit *m = &c->mus[moe_ckpt_find_unit(c, u.name)].pub;
        if (next[i] != m->n_tensors)
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s: unit '%s' has %d tensors there, %d in this run: a different model",
                               path, u.name, m->n_tensors, next[i]);
    }
    free(next);
    MOE_TRY(st);
    int ck_ne = 0, ck_experts = 0, run_experts_max = -1;
    for (int i = 0; i < c->n_mus; i++) {
        const moe_ckpt_unit *m = &c->mus[i].pub;
        ck_ne += m->expert_index < 0;
        if (m->expert_index + 1 > ck_experts)
            ck_experts = m->expert_index + 1;
    }
    if (ck_ne != run_ne) {
        for (int i = 0; i < c->n_mus; i++) {
            const moe_ckpt_unit *m = &c->mus[i].pub;
            int found = 0;
            for (int j = 0; j < nu && !found && m->expert_index < 0; j++) {
                moe_unit_info u;
                moe_runtime_unit(rt, j, &u);
                found = strcmp(u.name, m->name) == 0;
            }
            if (m->expert_index < 0 && !found)
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "checkpoint %s has unit '%s', which this run lacks: a different model shape "
                                     "(--decoder-layers, --moe-freq?)",
                                     path, m->name);
        }
    }
    moe_opts *o = moe_runtime_opts(rt);
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        if (u.expert_index > run_experts_max)
            run_experts_max = u.expert_index;
    }
    if ((ck_experts > 0 || run_experts_max >= 0) && moe_opts_known(o, "moe-expert-count") &&
        moe_opts_int(o, "moe-expert-count") != ck_experts)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s has %d experts per MoE layer, this run --moe-expert-count %lld: a "
                             "different model shape",
                             path, ck_experts, (long long)moe_opts_int(o, "moe-expert-count"));
    return MOE_OK;
}

static void describe_layout(char *buf, size_t size, const ck_hdr *h)
{
    int mixed = 0;
    for (uint32_t f = 1; f < h->fields; f++)
        mixed |= h->fdt[f] != h->fdt[0];
    int n = snprintf(buf, size, "%u %s%sfield%s", h->fields,
                     h->fields ? (mixed ? "mixed" : moe_ckpt_dtype_name((moe_dtype)h->fdt[0])) : "",
                     h->fields ? " " : "", h->fields == 1 ? "" : "s");
    if (h->scalars && n > 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n, ", %u scalar%s per tensor", h->scalars, h->scalars == 1 ? "" : "s");
}

/* what of the optimizer state can be loaded: MOE_CKPT_OPT_* */
static moe_status check_optimizer(moe_ckpt *c, const moe_ckpt_run *run, int *mode)
{
    const ck_hdr *h = &c->files[0].h;
    const char *path = c->files[0].path;
    const moe_host *hh = moe_runtime_host(run->rt);
    const char *name = run->optimizer ? run->optimizer : "";
    *mode = MOE_CKPT_OPT_NONE;
    ck_hdr mine;
    memset(&mine, 0, sizeof mine);
    MOE_TRY(run_opt_layout(run, &mine));
    uint64_t have = run->opt_ops && run->opt && run->opt_ops->state_bytes ? run->opt_ops->state_bytes(run->opt) : 0;
    if (!h->optimizer[0] && (have > 0 || mine.opt_kind != MOE_CKPT_OPT_NONE))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s holds no optimizer state (it was written without it); give "
                             "--reset-optimizer to start %s afresh",
                             path, name);
    if (strcmp(h->optimizer, name) != 0)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s holds the state of optimizer %s, this run uses %s (give "
                             "--reset-optimizer to start it afresh)",
                             path, h->optimizer, name);
    if (mine.opt_kind == MOE_CKPT_OPT_LAYOUT) {
        int same = h->opt_kind == MOE_CKPT_OPT_LAYOUT && h->fields == mine.fields && h->scalars == mine.scalars;
        for (uint32_t f = 0; same && f < h->fields; f++)
            same = h->fdt[f] == mine.fdt[f] && h->fscale[f] == mine.fscale[f];
        if (!same && h->opt_kind == MOE_CKPT_OPT_LAYOUT) {
            char a[160], b[160];
            describe_layout(a, sizeof a, h);
            describe_layout(b, sizeof b, &mine);
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s holds %llu bytes of %s state per parameter (%s), this run's has %llu "
                                 "(%s) (different optimizer options such as --fp16-adam-stats or --momentum; give "
                                 "--reset-optimizer to start it afresh)",
                                 path, (unsigned long long)field_bytes(h), name, a,
                                 (unsigned long long)field_bytes(&mine), b);
        }
        if (!same)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "checkpoint %s holds the state of %s as opaque bytes, this run's %s describes its "
                                 "layout (a different build of the plugin?); give --reset-optimizer to start it "
                                 "afresh",
                                 path, name, name);
        *mode = (h->fields > 0 || h->scalars > 0) ? MOE_CKPT_OPT_LAYOUT : MOE_CKPT_OPT_NONE;
    } else if (have > 0) {
        /* opaque: only where every tensor is the one it was */
        int same = h->opt_kind == MOE_CKPT_OPT_OPAQUE && h->opaque_bytes == have && c->n_files == hh->world;
        const ck_file *f = same ? &c->files[hh->rank] : NULL;
        int nu = moe_runtime_num_units(run->rt);
        same = same && f->h.n_units == nu;
        for (int i = 0; same && i < nu; i++) {
            moe_unit_info u;
            moe_runtime_unit(run->rt, i, &u);
            const ck_unit *cu = &f->h.units[i];
            same = strcmp(cu->name, u.name) == 0 && cu->start == u.start && cu->n == u.shard;
        }
        if (!same)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "optimizer %s describes no state layout (moe_optimizer_ops.state_layout), so its "
                                 "state resumes only at the world size and sharding that saved it: checkpoint %s "
                                 "of %d ranks, this run %d; give --reset-optimizer to start it afresh",
                                 name, path, c->n_files, hh->world);
        *mode = MOE_CKPT_OPT_OPAQUE;
    } else if (h->opt_kind == MOE_CKPT_OPT_OPAQUE || (h->opt_kind == MOE_CKPT_OPT_LAYOUT && field_bytes(h) > 0)) {
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "checkpoint %s holds %s state, this run's %s has none (different optimizer options "
                             "such as --momentum; give --reset-optimizer to start it afresh)",
                             path, name, name);
    }
    if (*mode != MOE_CKPT_OPT_NONE && !run->opt_ops->load_state)
        return moe_error_set(MOE_ERR_UNSUPPORTED, "optimizer %s cannot load its state; give --reset-optimizer", name);
    return MOE_OK;
}

/* backend memory and the optimizer's state as a sink */
typedef struct dev_sink {
    const moe_host *h;
    void *param, *master;
    const moe_optimizer_ops *ops;
    void *opt;
    uint64_t field_off[MOE_OPT_MAX_FIELDS], scalar_off;
} dev_sink;

static moe_status dev_put(void *ctx, int part, uint64_t off, const void *data, uint64_t bytes)
{
    dev_sink *d = ctx;
    if (part == ARR_PARAMS)
        return d->h->backend->copy_from_host(d->h->ctx, (char *)d->param + off, data, bytes);
    if (part == ARR_MASTER)
        return d->h->backend->copy_from_host(d->h->ctx, (char *)d->master + off, data, bytes);
    if (part >= ARR_FIELD && part < ARR_SCALARS)
        return d->ops->load_state(d->opt, d->field_off[part - ARR_FIELD] + off, data, bytes);
    if (part == ARR_SCALARS)
        return d->ops->load_state(d->opt, d->scalar_off + off, data, bytes);
    return d->ops->load_state(d->opt, off, data, bytes); /* ARR_OPAQUE */
}

/* every unit's range of this rank; run == NULL: parameters and masters only,
 * converted where the precision differs */
static moe_status load_units(moe_ckpt *c, moe_runtime *rt, const moe_ckpt_run *run, int mode, int strict)
{
    const moe_host *h = moe_runtime_host(rt);
    const ck_hdr *hd = &c->files[0].h;
    MOE_TRY(h->backend->synchronize(h->ctx));
    opt_map om;
    memset(&om, 0, sizeof om);
    if (mode == MOE_CKPT_OPT_LAYOUT)
        MOE_TRY(opt_map_make(hd, rt, run, &om));
    int64_t prefix = 0;
    int k = 0;
    for (int i = 0; i < moe_runtime_num_units(rt); i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        if (u.numel == 0)
            continue;
        const ck_mu *m = &c->mus[moe_ckpt_find_unit(c, u.name)];
        dev_sink ds;
        memset(&ds, 0, sizeof ds);
        ds.h = h;
        ds.param = u.sharded ? u.param_shard : u.param;
        ds.master = u.master;
        if (!ds.param)
            return moe_error_set(MOE_ERR_INTERNAL, "checkpoint: unit '%s' has no parameters to load", u.name);
        ck_want w;
        memset(&w, 0, sizeof w);
        w.act = h->act_dtype;
        w.params_src = strict || (moe_dtype)hd->act == h->act_dtype || !hd->master ? ARR_PARAMS : ARR_MASTER;
        w.master = u.master != NULL;
        w.master_src = hd->master ? ARR_MASTER : ARR_PARAMS;
        if (mode == MOE_CKPT_OPT_LAYOUT) {
            w.opt = 1;
            ds.ops = run->opt_ops;
            ds.opt = run->opt;
            opt_offsets(hd, &om, prefix, u.shard, k, ds.field_off, &ds.scalar_off);
        }
        MOE_TRY(fill_range(c, m, u.start, u.shard, &w, dev_put, &ds));
        prefix += u.shard;
        k++;
    }
    if (mode == MOE_CKPT_OPT_OPAQUE) {
        dev_sink ds;
        memset(&ds, 0, sizeof ds);
        ds.h = h;
        ds.ops = run->opt_ops;
        ds.opt = run->opt;
        const ck_file *f = &c->files[h->rank];
        int sec = f->n_sections - 1;
        ck_part part = {ARR_OPAQUE, 0, f->sec_bytes[sec]};
        MOE_TRY(scan_section(c, h->rank, sec, &part, 1, dev_put, &ds));
    }
    return h->backend->synchronize(h->ctx);
}

/* the run's buffers from the checkpoint's (every file holds the same: file
 * 0's are read); one the checkpoint lacks keeps its value, with a warning */
static moe_status load_buffers(moe_ckpt *c, const moe_host *h, const moe_ckpt_buffer *bufs, int n_bufs)
{
    for (int i = 0; i < n_bufs; i++) {
        const moe_ckpt_buffer *b = &bufs[i];
        int k = moe_ckpt_find_buffer(c, b->name);
        if (k < 0) {
            moe_log(MOE_LOG_WARNING, "fairseq.trainer", "checkpoint %s holds no %s; it keeps its initial value",
                    c->files[0].path, b->name);
            continue;
        }
        int64_t n = c->files[0].h.bufs[k].n;
        if (n != b->n)
            return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s: expected %lld values of %s, found %lld",
                                 c->files[0].path, (long long)b->n, b->name, (long long)n);
        float *host = malloc(n > 0 ? (size_t)n * sizeof *host : 1u);
        if (!host)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory reading checkpoint %s", c->files[0].path);
        moe_status st = moe_ckpt_read_buffer(c, k, host);
        if (st == MOE_OK)
            st = h->backend->copy_from_host(h->ctx, b->data, host, (uint64_t)n * sizeof *host);
        if (st == MOE_OK)
            st = h->backend->synchronize(h->ctx); /* before the host copy is freed */
        free(host);
        MOE_TRY(st);
    }
    return MOE_OK;
}

moe_status moe_ckpt_load(const moe_ckpt_run *run, const char *path, int load_optimizer, moe_ckpt_state *s,
                         char *loaded_from, size_t size)
{
    memset(s, 0, sizeof *s);
    moe_ckpt *c;
    MOE_TRY(moe_ckpt_open(path, &c));
    int mode = MOE_CKPT_OPT_NONE;
    moe_status st = check_run(c, run->rt, run->arch ? run->arch : "", 1);
    if (st == MOE_OK && load_optimizer)
        st = check_optimizer(c, run, &mode);
    if (st == MOE_OK)
        st = load_units(c, run->rt, run, mode, 1);
    if (st == MOE_OK)
        st = load_buffers(c, moe_runtime_host(run->rt), run->buffers, run->n_buffers);
    if (st == MOE_OK) {
        *s = c->meta.state;
        if (loaded_from)
            snprintf(loaded_from, size, "%s", c->files[0].path);
    }
    moe_ckpt_close(c);
    return st;
}

moe_status moe_ckpt_load_buffers(moe_runtime *rt, const char *path, const moe_ckpt_buffer *bufs, int n)
{
    if (n == 0)
        return MOE_OK;
    moe_ckpt *c;
    MOE_TRY(moe_ckpt_open(path, &c));
    moe_status st = load_buffers(c, moe_runtime_host(rt), bufs, n);
    moe_ckpt_close(c);
    return st;
}

moe_status moe_ckpt_load_params(moe_runtime *rt, const char *path, int64_t *num_updates)
{
    moe_ckpt *c;
    MOE_TRY(moe_ckpt_open(path, &c));
    moe_status st = check_run(c, rt, moe_opts_str(moe_runtime_opts(rt), "arch"), 0);
    if (st == MOE_OK)
        st = load_units(c, rt, NULL, MOE_CKPT_OPT_NONE, 0);
    if (st == MOE_OK && num_updates)
        *num_updates = c->meta.state.num_updates;
    moe_ckpt_close(c);
    return st;
}

void moe_ckpt_free_args(int argc, char **argv)
{
    if (!argv)
        return;
    for (int i = 0; i < argc; i++)
        free(argv[i]);
    free(argv);
}

moe_status moe_ckpt_read_args(const char *path, int *argc, char ***argv)
{
    *argc = 0;
    *argv = NULL;
    moe_ckpt *c;
    MOE_TRY(moe_ckpt_open(path, &c));
    int n = c->meta.argc;
    char **v = calloc((size_t)n + 1, sizeof *v);
    moe_status st = v ? MOE_OK : moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    for (int i = 0; st == MOE_OK && i < n; i++) {
        v[i] = malloc(strlen(c->meta.argv[i]) + 1);
        if (!v[i])
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        else
            strcpy(v[i], c->meta.argv[i]);
    }
    moe_ckpt_close(c);
    if (st != MOE_OK) {
        moe_ckpt_free_args(n, v);
        return st;
    }
    *argc = n;
    *argv = v;
    return MOE_OK;
}

/* ------------------------------------------------------- writing files */

moe_status moe_ckpt_check_layout(moe_ckpt *c, const moe_ckpt_layout *l, int with_optimizer)
{
    const char *path = c->files[0].path;
    if (l->world < 1 || l->rank < 0 || l->rank >= l->world)
        return moe_error_set(MOE_ERR_INVALID_ARG, "a layout for rank %d of %d ranks makes no sense", l->rank,
                             l->world);
    unsigned char *seen = calloc(c->n_mus ? (size_t)c->n_mus : 1u, 1);
    if (!seen)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    moe_status st = MOE_OK;
    for (int i = 0; i < l->n_units && st == MOE_OK; i++) {
        const moe_ckpt_layout_unit *u = &l->units[i];
        int mu = moe_ckpt_find_unit(c, u->name);
        if (mu < 0) {
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s has no unit '%s', which the model built from its command line for "
                               "%d ranks has (a different build of the arch?)",
                               path, u->name, l->world);
            break;
        }
        const moe_ckpt_unit *m = &c->mus[mu].pub;
        if (seen[mu]++)
            st = moe_error_set(MOE_ERR_INVALID_ARG, "a layout names unit '%s' twice", u->name);
        else if (m->numel != u->numel || m->expert_index != u->expert_index)
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s: unit '%s' has %lld parameters, the model built from its command line "
                               "%lld (a different build of the arch?)",
                               path, u->name, (long long)m->numel, (long long)u->numel);
        else if (u->padded < u->numel || u->start < 0 || u->n < 0 || u->start > u->padded ||
                 u->n > u->padded - u->start || (u->numel > 0 && u->n == 0))
            st = moe_error_set(MOE_ERR_INVALID_ARG, "a layout's range %lld+%lld of unit '%s' (%lld padded) is out "
                               "of range", (long long)u->start, (long long)u->n, u->name, (long long)u->padded);
    }
    for (int i = 0; i < c->n_mus && st == MOE_OK; i++)
        if (c->mus[i].pub.expert_index < 0 && !seen[i])
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "checkpoint %s has unit '%s', which the model built from its command line lacks",
                               path, c->mus[i].pub.name);
    free(seen);
    MOE_TRY(st);
    if (with_optimizer && c->meta.opt_kind == MOE_CKPT_OPT_OPAQUE) {
        int same = c->n_files == l->world && c->files[l->rank].h.n_units == l->n_units;
        for (int i = 0; same && i < l->n_units; i++) {
            const ck_unit *cu = &c->files[l->rank].h.units[i];
            same = strcmp(cu->name, l->units[i].name) == 0 && cu->start == l->units[i].start &&
                   cu->n == l->units[i].n;
        }
        if (!same)
            return moe_error_set(MOE_ERR_UNSUPPORTED,
                                 "optimizer %s of checkpoint %s describes no state layout, so its state cannot be cut "
                                 "for another world size or sharding; give --no-optimizer to leave it out (resume "
                                 "then with --reset-optimizer)",
                                 c->meta.optimizer, path);
    }
    return MOE_OK;
}

static moe_status file_put(void *ctx, int part, uint64_t off, const void *data, uint64_t bytes)
{
    (void)part;
    (void)off;
    return w_put(ctx, data, (size_t)bytes);
}

moe_status moe_ckpt_write(moe_ckpt *c, const moe_ckpt_layout *l, int with_optimizer, uint64_t save_id,
                          const char *path)
{
    MOE_TRY(moe_ckpt_check_layout(c, l, with_optimizer));
    const ck_hdr *src = &c->files[0].h;
    ck_hdr hd;
    memset(&hd, 0, sizeof hd);
    hd.world = (uint32_t)l->world;
    hd.rank = (uint32_t)l->rank;
    hd.act = src->act;
    hd.grad = src->grad;
    hd.master = src->master;
    hd.save_id = save_id;
    hd.vocab = src->vocab;
    hd.padding_idx = src->padding_idx;
    memcpy(hd.arch, src->arch, sizeof hd.arch);
    hd.st = src->st;
    hd.st.save_id = save_id;
    for (int f = 0; f < MOE_OPT_MAX_FIELDS; f++)
        hd.fscale[f] = -1;
    if (with_optimizer) {
        memcpy(hd.optimizer, src->optimizer, sizeof hd.optimizer);
        hd.opt_kind = src->opt_kind;
        hd.fields = src->fields;
        hd.scalars = src->scalars;
        memcpy(hd.fdt, src->fdt, sizeof hd.fdt);
        memcpy(hd.fscale, src->fscale, sizeof hd.fscale);
        memcpy(hd.fname, src->fname, sizeof hd.fname);
        memcpy(hd.sname, src->sname, sizeof hd.sname);
        if (src->opt_kind == MOE_CKPT_OPT_OPAQUE)
            hd.opaque_bytes = c->files[l->rank].h.opaque_bytes;
    }
    hd.argc = src->argc;
    hd.argv = malloc(((size_t)hd.argc + 1) * sizeof *hd.argv);
    hd.units = calloc(l->n_units ? (size_t)l->n_units : 1u, sizeof *hd.units);
    int nt = 0;
    for (int i = 0; i < l->n_units; i++)
        nt += c->mus[moe_ckpt_find_unit(c, l->units[i].name)].pub.n_tensors;
    hd.tensors = calloc(nt ? (size_t)nt : 1u, sizeof *hd.tensors);
    if (!hd.argv || !hd.units || !hd.tensors) {
        hdr_free(&hd);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    for (int i = 0; i < hd.argc; i++)
        hd.argv[i] = src->argv[i];
    for (int i = 0; i < l->n_units; i++) {
        const moe_ckpt_layout_unit *u = &l->units[i];
        const moe_ckpt_unit *m = &c->mus[moe_ckpt_find_unit(c, u->name)].pub;
        ck_unit *cu = &hd.units[i];
        cu->name = (char *)m->name;
        cu->expert_index = u->expert_index;
        cu->sharded = u->sharded;
        cu->numel = u->numel;
        cu->padded = u->padded;
        cu->start = u->start;
        cu->n = u->n;
        cu->first_tensor = hd.n_tensors;
        cu->n_tensors = m->n_tensors;
        memcpy(&hd.tensors[hd.n_tensors], m->tensors, (size_t)m->n_tensors * sizeof *m->tensors);
        hd.n_tensors += m->n_tensors;
        hd.sharded |= (uint32_t)u->sharded;
    }
    hd.n_units = l->n_units;
    if (src->n_bufs > 0) { /* every file of a save holds the buffers */
        hd.bufs = malloc((size_t)src->n_bufs * sizeof *hd.bufs);
        if (!hd.bufs) {
            hdr_free(&hd);
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        }
        memcpy(hd.bufs, src->bufs, (size_t)src->n_bufs * sizeof *hd.bufs);
        hd.n_bufs = src->n_bufs;
    }
    hbuf b = {0};
    build_header(&hd, &b);
    ck_writer w;
    memset(&w, 0, sizeof w);
    moe_status st = b.oom ? moe_error_set(MOE_ERR_NOMEM, "out of host memory") : MOE_OK;
    if (st == MOE_OK)
        st = w_open(&w, path, n_sections_of(&hd));
    if (st == MOE_OK) {
        w_begin(&w);
        st = w_put(&w, b.p, b.n);
        w_end(&w);
    }
    free(b.p);
    ck_want want = {(moe_dtype)src->act, ARR_PARAMS, (int)src->master, ARR_MASTER,
                    with_optimizer && src->opt_kind == MOE_CKPT_OPT_LAYOUT};
    for (int i = 0; i < hd.n_units && st == MOE_OK; i++) {
        const ck_mu *m = &c->mus[moe_ckpt_find_unit(c, hd.units[i].name)];
        w_begin(&w);
        st = fill_range(c, m, hd.units[i].start, hd.units[i].n, &want, file_put, &w);
        w_end(&w);
        if (st == MOE_OK && w.sec_bytes[w.cur_sec] != hd.units[i].bytes)
            st = moe_error_set(MOE_ERR_INTERNAL, "checkpoint %s: unit '%s' came to %llu bytes, expected %llu", path,
                               hd.units[i].name, (unsigned long long)w.sec_bytes[w.cur_sec],
                               (unsigned long long)hd.units[i].bytes);
    }
    for (int i = 0; i < hd.n_bufs && st == MOE_OK; i++) {
        ck_part part = {0, 0, src->bufs[i].bytes};
        w_begin(&w);
        st = scan_section(c, 0, src->bufs[i].section, &part, 1, file_put, &w);
        w_end(&w);
    }
    if (st == MOE_OK && hd.opt_kind == MOE_CKPT_OPT_OPAQUE) {
        const ck_file *f = &c->files[l->rank];
        int sec = f->n_sections - 1;
        ck_part part = {ARR_OPAQUE, 0, f->sec_bytes[sec]};
        w_begin(&w);
        st = scan_section(c, l->rank, sec, &part, 1, file_put, &w);
        w_end(&w);
    }
    if (st == MOE_OK)
        st = w_finish(&w);
    st = w_close(&w, st);
    hdr_free(&hd);
    return st;
}

/* ---------------------------------------------------------------- names */

#define GATE_WG ".moe_layer.gate.wg.weight"

moe_status moe_ckpt_gate_buffers(moe_runtime *rt, const moe_arch_ops *arch, void *model, moe_ckpt_buffer **out,
                                 int *n)
{
    const moe_host *h = moe_runtime_host(rt);
    const moe_gate_ops *gate = h->gate_ops;
    *out = NULL;
    *n = 0;
    if (!gate || !gate->state || !arch->moe_gate)
        return MOE_OK;
    int np = moe_runtime_num_params(rt), j = 0;
    moe_ckpt_buffer *b = calloc(np ? (size_t)np : 1u, sizeof *b);
    if (!b)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    const size_t wl = strlen(GATE_WG);
    for (int p = 0; p < np; p++) {
        moe_param_info pi;
        moe_runtime_param(rt, p, &pi);
        size_t len = strlen(pi.name);
        if (len < wl || strcmp(pi.name + len - wl, GATE_WG) != 0)
            continue;
        void *g = arch->moe_gate(model, j++); /* the j-th gate projection is MoE layer j's */
        int64_t count = 0;
        float *data = g ? gate->state(g, &count) : NULL;
        if (!data || count <= 0)
            continue;
        char *name = malloc(len - wl + sizeof ".moe_layer.gate.expert_bias");
        if (!name) {
            moe_ckpt_free_buffers(b, *n);
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        }
        sprintf(name, "%.*s.moe_layer.gate.expert_bias", (int)(len - wl), pi.name);
        b[*n].name = name;
        b[*n].data = data;
        b[*n].n = count;
        (*n)++;
    }
    *out = b;
    return MOE_OK;
}

void moe_ckpt_free_buffers(moe_ckpt_buffer *b, int n)
{
    for (int i = 0; b && i < n; i++)
        free((char *)b[i].name);
    free(b);
}

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

void moe_ckpt_join(char *out, size_t size, const char *dir, const char *name)
{
    if (name[0] == '/' || !dir || !*dir)
        snprintf(out, size, "%s", name);
    else
        snprintf(out, size, "%s/%s", dir, name);
}

moe_status moe_ckpt_mkdirs(const char *dir)
{
    char at[4096];
    int last = 0;
    switch (moe_mkdir_p(dir, 0755, at, sizeof at, &last)) {
    case MOE_MKDIR_OK:
        return MOE_OK;
    case MOE_MKDIR_NOT_DIR:
        if (last)
            return moe_error_set(MOE_ERR_IO, "--save-dir %s is not a directory", dir);
        return moe_error_set(MOE_ERR_IO, "cannot create --save-dir %s: %s", dir, strerror(ENOTDIR));
    default:
        return moe_error_set(MOE_ERR_IO, "cannot create --save-dir %s: %s", at, strerror(errno));
    }
}
