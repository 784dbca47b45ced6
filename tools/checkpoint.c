/* checkpoint.c: moelm-checkpoint, what a checkpoint holds and what else it
 * can become.
 *
 *   moelm-checkpoint info CKPT [--json] [--verify]
 *   moelm-checkpoint consolidate CKPT --out FILE [--no-optimizer]
 *   moelm-checkpoint reshard CKPT --world-size M --out DIR [--ddp-backend B] [--no-optimizer]
 *   moelm-checkpoint export CKPT --format safetensors --out FILE [--dtype F32|F16|BF16]
 *
 * CKPT is what --restore-file takes (DIR/checkpoint_last.pt: its per-rank
 * files of any world size) or one consolidated file. The format, the reading
 * and the cutting of tensors are core/checkpoint.c's; this file decides the
 * layouts to write and formats what it prints.
 *
 * The layout of a file for rank r of M (which experts it holds, which shard
 * of each unit) is not computed here: the model is built from the training
 * command line stored in the checkpoint for M ranks in dry-run mode (no
 * memory), exactly as moelm-train would build it on rank r, and its units are
 * read back from the runtime. So the rules live where training uses them
 * (the arch plugin, the runtime's sharding). The same build gives export's
 * config.json the arch's options as the run resolved them. info needs no
 * plugin; consolidate, reshard and export load the arch (--user-dir for one
 * of your own).
 *
 * What is written keeps the save id of what was read, so files cut back to
 * a layout they came from are the same bytes.
 *
 * Outputs are written under temporary names (<name>.tmp) and renamed when
 * everything is complete; the input is read in full and its checksums checked
 * before the first byte is written, so a corrupt or mismatched checkpoint
 * leaves nothing behind. Errors are one line, exit 2 for command-line
 * mistakes and 1 otherwise.
 */
#define _XOPEN_SOURCE 700 /* realpath */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "core/checkpoint.h"
#include "core/components.h"
#include "core/config.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/options.h"

#define PROG "moelm-checkpoint"
#define NOLIMIT 0, 0

static const moe_option tool_options[] = {
    {"help", MOE_OPT_FLAG, NULL, "show this help message and exit", NOLIMIT, NULL},
    {"command", MOE_OPT_STRING, NULL, "info, consolidate, reshard or export", NOLIMIT, NULL},
    {"checkpoint", MOE_OPT_STRING, NULL,
     "the checkpoint, as --restore-file takes it (DIR/checkpoint_last.pt for its per-rank files) or one file",
     NOLIMIT, NULL},
    {"json", MOE_OPT_FLAG, NULL, "info: print one JSON object", NOLIMIT, NULL},
    {"verify", MOE_OPT_FLAG, NULL, "info: read every byte and check every checksum", NOLIMIT, NULL},
    {"out", MOE_OPT_STRING, NULL, "consolidate, export: the file to write; reshard: the directory", NOLIMIT, NULL},
    {"no-optimizer", MOE_OPT_FLAG, NULL,
     "consolidate, reshard: leave the optimizer state out (resume then with --reset-optimizer)", NOLIMIT, NULL},
    {"world-size", MOE_OPT_INT, NULL, "reshard: the number of ranks the files are for", 1, 1 << 30, NULL},
    {"ddp-backend", MOE_OPT_CHOICE, NULL,
     "reshard: the --ddp-backend of the run that will resume (default: the stored command line's)", NOLIMIT,
     "c10d|fully_sharded|legacy_ddp|no_c10d|pytorch_ddp|slow_mo"},
    {"format", MOE_OPT_CHOICE, "safetensors", "export: the output format", NOLIMIT, "safetensors"},
    {"dtype", MOE_OPT_CHOICE, NULL,
     "export: convert every tensor to this dtype (F32 takes the fp32 master weights when the checkpoint has them); "
     "default: the checkpoint's parameter dtype",
     NOLIMIT, "F32|F16|BF16"},
    {"user-dir", MOE_OPT_STRING, NULL, "where to look for plugins first (an arch of your own)", NOLIMIT, NULL},
};
#define N_OPTIONS ((int)(sizeof tool_options / sizeof tool_options[0]))

/* a command-line mistake (exit 2) */
static moe_status usage(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
static moe_status usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moe_status st = moe_error_setv(MOE_ERR_INVALID_ARG, fmt, ap);
    va_end(ap);
    return st;
}

/* ------------------------------------------------------------------ plans */

/* The units of rank `rank` of `world`, from the model the stored command
 * line builds there (dry run); with `config`, the arch's options as
 * resolved, for config.json. */
typedef struct plan {
    moe_ckpt_layout l;
    moe_ckpt_layout_unit *units;
    json_t *config;
} plan;

static void plan_free(plan *p)
{
    for (int i = 0; i < p->l.n_units; i++)
        free((char *)p->units[i].name);
    free(p->units);
    json_decref(p->config);
    memset(p, 0, sizeof *p);
}

static char *dup_str(const char *s)
{
    char *d = malloc(strlen(s) + 1);
    if (d)
        strcpy(d, s);
    return d;
}

/* fairseq's namespace name of a flag: dashes become underscores */
static void dest_name(char *buf, size_t size, const char *flag)
{
    snprintf(buf, size, "%s", flag);
    for (char *p = buf; *p; p++)
        if (*p == '-')
            *p = '_';
}

static json_t *option_value(moe_opts *o, const moe_option *op)
{
    if (op->type == MOE_OPT_FLAG)
        return json_boolean(moe_opts_flag(o, op->name));
    if (!moe_opts_has_value(o, op->name))
        return json_null();
    switch (op->type) {
    case MOE_OPT_INT: return json_integer((json_int_t)moe_opts_int(o, op->name));
    case MOE_OPT_FLOAT: return json_real(moe_opts_float(o, op->name));
    default: return json_string(moe_opts_str(o, op->name));
    }
}

static json_t *arch_config(moe_opts *o, const moe_plugin_desc *arch, const moe_components *c, const moe_ckpt *ck)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(ck);
    json_t *j = json_object();
    json_object_set_new(j, "arch", json_string(arch->name));
    moe_model_info info;
    c->arch->info(c->model, 0, &info);
    /* the values the arch resolved where the command line left its default None */
    struct {
        const char *flag;
        int64_t v;
    } resolved[] = {{"decoder-layers", info.num_layers},
                    {"decoder-embed-dim", info.embed_dim},
                    {"decoder-ffn-embed-dim", info.ffn_dim},
                    {"decoder-attention-heads", info.heads}};
    for (int i = 0; i < arch->n_options; i++) {
        const moe_option *op = &arch->options[i];
        char key[128];
        dest_name(key, sizeof key, op->name);
        json_t *v = option_value(o, op);
        for (size_t k = 0; k < sizeof resolved / sizeof resolved[0]; k++)
            if (json_is_null(v) && strcmp(op->name, resolved[k].flag) == 0) {
                json_decref(v);
                v = json_integer((json_int_t)resolved[k].v);
            }
        json_object_set_new(j, key, v);
    }
    json_object_set_new(j, "num_moe_layers", json_integer((json_int_t)info.num_moe_layers));
    json_object_set_new(j, "vocab_size", json_integer((json_int_t)m->vocab));
    json_object_set_new(j, "padding_idx", json_integer(m->padding_idx));
    return j;
}

static moe_status plan_rank(moe_ckpt *ck, moe_registry *reg, const char *user_dir, int world, int rank,
                            const char *ddp, int want_config, plan *out)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(ck);
    memset(out, 0, sizeof *out);
    int n = 0;
    char **argv = calloc((size_t)m->argc + 12, sizeof *argv);
    if (!argv)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    char ws[32], rk[32];
    snprintf(ws, sizeof ws, "%d", world);
    snprintf(rk, sizeof rk, "%d", rank);
    argv[n++] = (char *)"moelm-train";
    for (int i = 0; i < m->argc; i++)
        argv[n++] = m->argv[i];
    argv[n++] = (char *)"--distributed-world-size";
    argv[n++] = ws;
    argv[n++] = (char *)"--distributed-rank";
    argv[n++] = rk;
    if (ddp) {
        argv[n++] = (char *)"--ddp-backend";
        argv[n++] = (char *)ddp;
    }
    if (user_dir) {
        argv[n++] = (char *)"--user-dir";
        argv[n++] = (char *)user_dir;
    }
    moe_opts *o = NULL;
    moe_runtime *rt = NULL;
    moe_loaded_components lc;
    moe_components c;
    memset(&lc, 0, sizeof lc);
    memset(&c, 0, sizeof c);
    moe_selection sel;
    memset(&sel, 0, sizeof sel);
    sel.backend = "cpu";
    moe_launch launch;
    moe_status st;
    MOE_TRY_GOTO(st, moe_opts_create(&o), done);
    MOE_TRY_GOTO(st, moe_opts_parse(o, n, argv, 0), done);
    MOE_TRY_GOTO(st, moe_components_launch(o, reg, sel.backend, 1, &launch), done);
    MOE_TRY_GOTO(st, moe_components_select(o, &launch, 0, &sel), done);
    MOE_TRY_GOTO(st, moe_components_load(o, reg, &sel, 0, &lc), done);
    MOE_TRY_GOTO(st, moe_opts_parse(o, n, argv, 0), done);
    MOE_TRY_GOTO(st, moe_config_check(o, world), done);
    MOE_TRY_GOTO(st, moe_components_runtime(o, reg, &sel, &launch, 1, n - 1, argv + 1, &rt), done);
    MOE_TRY_GOTO(st, moe_components_build(rt, &sel, &lc, 0, m->vocab, m->padding_idx, &c), done);
    int nu = moe_runtime_num_units(rt);
    out->units = calloc(nu ? (size_t)nu : 1u, sizeof *out->units);
    if (!out->units) {
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        goto done;
    }
    out->l.world = world;
    out->l.rank = rank;
    out->l.units = out->units;
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        moe_ckpt_layout_unit *lu = &out->units[out->l.n_units];
        lu->name = dup_str(u.name);
        if (!lu->name) {
            st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
            goto done;
        }
        out->l.n_units++;
        lu->expert_index = u.expert_index;
        lu->numel = u.numel;
        lu->padded = u.padded;
        lu->start = u.start;
        lu->n = u.shard;
        lu->sharded = u.sharded;
    }
    if (want_config)
        out->config = arch_config(o, lc.d[MOE_COMP_ARCH], &c, ck);
done:
    moe_components_teardown(&c, &lc);
    moe_runtime_destroy(rt);
    moe_opts_destroy(o);
    free(argv);
    if (st != MOE_OK)
        plan_free(out);
    return st;
}

/* ------------------------------------------------------------------- info */

static const char *layout_dtype(moe_dtype d)
{
    return d == MOE_F16 ? "F16" : d == MOE_BF16 ? "BF16" : "F32";
}

static void shell_quote(FILE *f, const char *s)
{
    if (*s && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=./:,+@%") == strlen(s)) {
        fputs(s, f);
        return;
    }
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'')
            fputs("'\\''", f);
        else
            fputc(*s, f);
    }
    fputc('\'', f);
}

static void counts(const moe_ckpt *c, int64_t *ne, int64_t *ex)
{
    *ne = *ex = 0;
    for (int i = 0; i < moe_ckpt_num_units(c); i++) {
        const moe_ckpt_unit *u = moe_ckpt_unit_at(c, i);
        *(u->expert_index >= 0 ? ex : ne) += u->numel;
    }
}

static json_t *info_json(const moe_ckpt *c, const char *path)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(c);
    json_t *j = json_object();
    json_object_set_new(j, "checkpoint", json_string(path));
    json_object_set_new(j, "name", json_string(moe_ckpt_name(c)));
    json_object_set_new(j, "format_version", json_integer(m->version));
    json_t *files = json_array();
    for (int i = 0; i < moe_ckpt_num_files(c); i++) {
        json_t *f = json_object();
        json_object_set_new(f, "path", json_string(moe_ckpt_file_path(c, i)));
        json_object_set_new(f, "rank", json_integer(i));
        json_object_set_new(f, "bytes", json_integer((json_int_t)moe_ckpt_file_bytes(c, i)));
        json_array_append_new(files, f);
    }
    json_object_set_new(j, "files", files);
    json_object_set_new(j, "world_size", json_integer(m->world));
    json_object_set_new(j, "fully_sharded", json_boolean(m->sharded));
    char id[20];
    snprintf(id, sizeof id, "%016llx", (unsigned long long)m->save_id);
    json_object_set_new(j, "save_id", json_string(id));
    json_object_set_new(j, "num_updates", json_integer((json_int_t)m->state.num_updates));
    json_object_set_new(j, "epoch", json_integer((json_int_t)m->state.epoch));
    json_object_set_new(j, "iterations_in_epoch", json_integer((json_int_t)m->state.iter));
    json_object_set_new(j, "end_of_epoch", json_boolean(m->state.end_of_epoch));
    json_object_set_new(j, "best_loss",
                        isfinite(m->state.best_valid_loss) ? json_real(m->state.best_valid_loss) : json_null());
    json_object_set_new(j, "loss_scale", m->state.has_scaler ? json_real(m->state.scaler.scale) : json_null());
    json_object_set_new(j, "arch", json_string(m->arch));
    json_object_set_new(j, "vocab_size", json_integer((json_int_t)m->vocab));
    json_object_set_new(j, "padding_idx", json_integer(m->padding_idx));
    json_object_set_new(j, "dtype", json_string(layout_dtype(m->act_dtype)));
    json_object_set_new(j, "grad_dtype", json_string(layout_dtype(m->grad_dtype)));
    json_object_set_new(j, "master_weights", json_boolean(m->master));
    json_t *opt = json_object();
    json_object_set_new(opt, "name", m->optimizer[0] ? json_string(m->optimizer) : json_null());
    json_object_set_new(opt, "state", json_string(m->opt_kind == MOE_CKPT_OPT_LAYOUT   ? "layout"
                                                  : m->opt_kind == MOE_CKPT_OPT_OPAQUE ? "opaque"
                                                                                       : "none"));
    json_t *fields = json_array(), *scalars = json_array();
    for (int f = 0; f < m->opt_layout.fields; f++) {
        json_t *x = json_object();
        int s = m->opt_layout.field_scale[f];
        json_object_set_new(x, "name", json_string(m->opt_layout.field_name[f]));
        json_object_set_new(x, "dtype", json_string(layout_dtype(m->opt_layout.field_dtype[f])));
        json_object_set_new(x, "scale", s >= 0 ? json_string(m->opt_layout.scalar_name[s]) : json_null());
        json_array_append_new(fields, x);
    }
    for (int s = 0; s < m->opt_layout.scalars; s++)
        json_array_append_new(scalars, json_string(m->opt_layout.scalar_name[s]));
    json_object_set_new(opt, "fields", fields);
    json_object_set_new(opt, "scalars_per_tensor", scalars);
    if (m->opt_kind == MOE_CKPT_OPT_OPAQUE)
        json_object_set_new(opt, "bytes_per_file", json_integer((json_int_t)m->opt_opaque_bytes));
    json_object_set_new(j, "optimizer", opt);
    json_t *args = json_array();
    for (int i = 0; i < m->argc; i++)
        json_array_append_new(args, json_string(m->argv[i]));
    json_object_set_new(j, "args", args);
    json_t *units = json_array();
    for (int i = 0; i < moe_ckpt_num_units(c); i++) {
        const moe_ckpt_unit *u = moe_ckpt_unit_at(c, i);
        json_t *x = json_object();
        json_object_set_new(x, "name", json_string(u->name));
        json_object_set_new(x, "expert", u->expert_index >= 0 ? json_integer(u->expert_index) : json_null());
        json_object_set_new(x, "numel", json_integer((json_int_t)u->numel));
        json_t *pieces = json_array();
        for (int k = 0; k < u->n_pieces; k++) {
            json_t *p = json_object();
            json_object_set_new(p, "rank", json_integer(u->pieces[k].file));
            json_object_set_new(p, "start", json_integer((json_int_t)u->pieces[k].start));
            json_object_set_new(p, "numel", json_integer((json_int_t)u->pieces[k].n));
            json_array_append_new(pieces, p);
        }
        json_object_set_new(x, "pieces", pieces);
        json_t *tensors = json_array();
        for (int k = 0; k < u->n_tensors; k++) {
            const moe_ckpt_tensor *t = &u->tensors[k];
            json_t *y = json_object(), *shape = json_array();
            json_object_set_new(y, "name", json_string(t->name));
            for (int d = 0; d < t->ndim; d++)
                json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
            json_object_set_new(y, "shape", shape);
            json_object_set_new(y, "dtype", json_string(layout_dtype(m->act_dtype)));
            json_object_set_new(y, "offset", json_integer((json_int_t)t->offset));
            json_array_append_new(tensors, y);
        }
        json_object_set_new(x, "tensors", tensors);
        json_array_append_new(units, x);
    }
    json_object_set_new(j, "units", units);
    json_t *bufs = json_array();
    for (int i = 0; i < moe_ckpt_num_buffers(c); i++) {
        const char *name;
        int64_t n;
        moe_ckpt_buffer_at(c, i, &name, &n);
        json_t *x = json_object(), *shape = json_array();
        json_object_set_new(x, "name", json_string(name));
        json_array_append_new(shape, json_integer((json_int_t)n));
        json_object_set_new(x, "shape", shape);
        json_object_set_new(x, "dtype", json_string("F32"));
        json_array_append_new(bufs, x);
    }
    json_object_set_new(j, "buffers", bufs);
    int64_t ne, ex;
    counts(c, &ne, &ex);
    json_object_set_new(j, "num_non_expert_params", json_integer((json_int_t)ne));
    json_object_set_new(j, "num_expert_params", json_integer((json_int_t)ex));
    json_object_set_new(j, "num_params", json_integer((json_int_t)(ne + ex)));
    return j;
}

/* the buffers (gate state): name, size, and the range of the values */
static moe_status info_buffers(moe_ckpt *c)
{
    if (moe_ckpt_num_buffers(c) > 0)
        printf("buffers: %d\n", moe_ckpt_num_buffers(c));
    for (int i = 0; i < moe_ckpt_num_buffers(c); i++) {
        const char *name;
        int64_t n;
        moe_ckpt_buffer_at(c, i, &name, &n);
        float *v = malloc(n > 0 ? (size_t)n * sizeof *v : 1u);
        if (!v)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        moe_status st = moe_ckpt_read_buffer(c, i, v);
        float lo = n > 0 ? v[0] : 0.0f, hi = lo;
        for (int64_t k = 1; k < n; k++) {
            lo = v[k] < lo ? v[k] : lo;
            hi = v[k] > hi ? v[k] : hi;
        }
        free(v);
        MOE_TRY(st);
        printf("  %s [%lld] fp32, min %.6g, max %.6g\n", name, (long long)n, (double)lo, (double)hi);
    }
    return MOE_OK;
}

static void info_text(const moe_ckpt *c, const char *path)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(c);
    printf("checkpoint: %s (format %u, %d file%s)\n", path, m->version, moe_ckpt_num_files(c),
           moe_ckpt_num_files(c) == 1 ? "" : "s");
    for (int i = 0; i < moe_ckpt_num_files(c); i++)
        printf("  rank %d: %s (%llu bytes)\n", i, moe_ckpt_file_path(c, i),
               (unsigned long long)moe_ckpt_file_bytes(c, i));
    printf("world size: %d, %s\n", m->world, m->sharded ? "fully sharded" : "not sharded");
    printf("updates: %lld, epoch %lld (%lld batches in%s), best loss ", (long long)m->state.num_updates,
           (long long)m->state.epoch, (long long)m->state.iter, m->state.end_of_epoch ? ", at its end" : "");
    if (isfinite(m->state.best_valid_loss))
        printf("%.6g\n", m->state.best_valid_loss);
    else
        printf("None\n");
    printf("arch: %s, vocabulary %lld (padding index %d)\n", m->arch, (long long)m->vocab, m->padding_idx);
    printf("precision: parameters %s, gradients %s, fp32 master weights: %s", moe_ckpt_dtype_name(m->act_dtype),
           moe_ckpt_dtype_name(m->grad_dtype), m->master ? "yes" : "no");
    if (m->state.has_scaler)
        printf(", loss scale %g", m->state.scaler.scale);
    printf("\n");
    if (!m->optimizer[0]) {
        printf("optimizer: none saved\n");
    } else if (m->opt_kind == MOE_CKPT_OPT_OPAQUE) {
        printf("optimizer: %s, state opaque (%llu bytes a file; resumable at this world size and sharding only)\n",
               m->optimizer, (unsigned long long)m->opt_opaque_bytes);
    } else {
        printf("optimizer: %s, state per element:", m->optimizer);
        if (m->opt_layout.fields == 0)
            printf(" none");
        for (int f = 0; f < m->opt_layout.fields; f++) {
            int s = m->opt_layout.field_scale[f];
            printf("%s %s %s", f ? "," : "", m->opt_layout.field_name[f],
                   moe_ckpt_dtype_name(m->opt_layout.field_dtype[f]));
            if (s >= 0)
                printf(" (x %s)", m->opt_layout.scalar_name[s]);
        }
        if (m->opt_layout.scalars > 0) {
            printf("; per tensor:");
            for (int s = 0; s < m->opt_layout.scalars; s++)
                printf("%s %s", s ? "," : "", m->opt_layout.scalar_name[s]);
        }
        printf("\n");
    }
    printf("command line:");
    for (int i = 0; i < m->argc; i++) {
        fputc(' ', stdout);
        shell_quote(stdout, m->argv[i]);
    }
    printf("\n");
    int64_t ne, ex;
    counts(c, &ne, &ex);
    printf("units: %d\n", moe_ckpt_num_units(c));
    for (int i = 0; i < moe_ckpt_num_units(c); i++) {
        const moe_ckpt_unit *u = moe_ckpt_unit_at(c, i);
        printf("  %s: %lld parameters%s, pieces", u->name, (long long)u->numel, u->expert_index >= 0 ? " (expert)" : "");
        for (int k = 0; k < u->n_pieces; k++)
            printf("%s rank %d [%lld, %lld)", k ? "," : "", u->pieces[k].file, (long long)u->pieces[k].start,
                   (long long)(u->pieces[k].start + u->pieces[k].n));
        printf("\n");
        for (int k = 0; k < u->n_tensors; k++) {
            const moe_ckpt_tensor *t = &u->tensors[k];
            if (t->ndim == 2)
                printf("    %s [%lld, %lld] %s\n", t->name, (long long)t->shape[0], (long long)t->shape[1],
                       moe_ckpt_dtype_name(m->act_dtype));
            else
                printf("    %s [%lld] %s\n", t->name, (long long)t->shape[0], moe_ckpt_dtype_name(m->act_dtype));
        }
    }
    printf("parameters: %lld (non-expert %lld, expert %lld)\n", (long long)(ne + ex), (long long)ne, (long long)ex);
}

/* ----------------------------------------------------------------- output */

/* files written under <name>.tmp, renamed into place at the end */
typedef struct outputs {
    char **final, **tmp;
    int n;
} outputs;

static moe_status outputs_add(outputs *o, const char *path)
{
    char **f = realloc(o->final, (size_t)(o->n + 1) * sizeof *f);
    if (!f)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    o->final = f;
    char **t = realloc(o->tmp, (size_t)(o->n + 1) * sizeof *t);
    if (!t)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    o->tmp = t;
    o->final[o->n] = dup_str(path);
    o->tmp[o->n] = malloc(strlen(path) + 5);
    if (!o->final[o->n] || !o->tmp[o->n])
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    sprintf(o->tmp[o->n], "%s.tmp", path);
    o->n++;
    return MOE_OK;
}

/* success: every temporary renamed; failure: every temporary removed */
static moe_status outputs_finish(outputs *o, moe_status st)
{
    for (int i = 0; i < o->n && st == MOE_OK; i++)
        if (rename(o->tmp[i], o->final[i]) != 0)
            st = moe_error_set(MOE_ERR_IO, "cannot rename %s to %s: %s", o->tmp[i], o->final[i], strerror(errno));
    if (st == MOE_OK && o->n > 0)
        moe_ckpt_sync_dir(o->final[0]);
    for (int i = 0; i < o->n; i++) {
        if (st != MOE_OK)
            unlink(o->tmp[i]);
        free(o->final[i]);
        free(o->tmp[i]);
    }
    free(o->final);
    free(o->tmp);
    memset(o, 0, sizeof *o);
    return st;
}

/* the directory part of a path ("." for a bare name) */
static void dir_of(char *buf, size_t size, const char *path)
{
    snprintf(buf, size, "%s", path);
    char *s = strrchr(buf, '/');
    if (s == buf)
        buf[1] = '\0';
    else if (s)
        *s = '\0';
    else
        snprintf(buf, size, ".");
}

static moe_status check_out_dir(const char *dir)
{
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return moe_error_set(MOE_ERR_IO, "cannot write into %s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return moe_error_set(MOE_ERR_IO, "cannot write into %s: not a directory", dir);
    return MOE_OK;
}

/* ------------------------------------------------------------ subcommands */

static moe_status cmd_consolidate(moe_ckpt *c, moe_opts *o, moe_registry *reg)
{
    const char *out = moe_opts_str(o, "out");
    char dir[4096];
    dir_of(dir, sizeof dir, out);
    MOE_TRY(check_out_dir(dir));
    int with_opt = !moe_opts_flag(o, "no-optimizer");
    MOE_TRY(moe_ckpt_verify(c));
    plan p;
    MOE_TRY(plan_rank(c, reg, moe_opts_str(o, "user-dir"), 1, 0, NULL, 0, &p));
    moe_status st = moe_ckpt_check_layout(c, &p.l, with_opt);
    outputs os = {0};
    if (st == MOE_OK)
        st = outputs_add(&os, out);
    if (st == MOE_OK)
        st = moe_ckpt_write(c, &p.l, with_opt, moe_ckpt_get_meta(c)->save_id, os.tmp[0]);
    plan_free(&p);
    st = outputs_finish(&os, st);
    if (st == MOE_OK)
        printf("consolidated %s (%d file%s) into %s\n", moe_opts_str(o, "checkpoint"), moe_ckpt_num_files(c),
               moe_ckpt_num_files(c) == 1 ? "" : "s", out);
    return st;
}

static moe_status cmd_reshard(moe_ckpt *c, moe_opts *o, moe_registry *reg)
{
    const char *dir = moe_opts_str(o, "out");
    int world = (int)moe_opts_int(o, "world-size");
    const char *ddp = moe_opts_str(o, "ddp-backend");
    int with_opt = !moe_opts_flag(o, "no-optimizer");
    MOE_TRY(moe_ckpt_mkdirs(dir));
    MOE_TRY(check_out_dir(dir));
    /* the output must not replace the files it is read from */
    char src_dir[4096], a[PATH_MAX], b[PATH_MAX];
    dir_of(src_dir, sizeof src_dir, moe_ckpt_file_path(c, 0));
    if (realpath(src_dir, a) && realpath(dir, b) && strcmp(a, b) == 0)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--out %s is the checkpoint's own directory: its files would be replaced while read; "
                             "give another directory",
                             dir);
    MOE_TRY(moe_ckpt_verify(c));
    plan *plans = calloc((size_t)world, sizeof *plans);
    if (!plans)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    moe_status st = MOE_OK;
    int made = 0;
    for (int r = 0; r < world && st == MOE_OK; r++) {
        st = plan_rank(c, reg, moe_opts_str(o, "user-dir"), world, r, ddp, 0, &plans[r]);
        made += st == MOE_OK;
        if (st == MOE_OK)
            st = moe_ckpt_check_layout(c, &plans[r].l, with_opt);
    }
    outputs os = {0};
    uint64_t id = moe_ckpt_get_meta(c)->save_id;
    for (int r = 0; r < world && st == MOE_OK; r++) {
        char path[4400];
        moe_ckpt_rank_path(path, sizeof path, dir, moe_ckpt_name(c), r);
        st = outputs_add(&os, path);
        if (st == MOE_OK)
            st = moe_ckpt_write(c, &plans[r].l, with_opt, id, os.tmp[os.n - 1]);
    }
    for (int r = 0; r < made; r++)
        plan_free(&plans[r]);
    free(plans);
    st = outputs_finish(&os, st);
    if (st == MOE_OK) {
        char first[4400];
        moe_ckpt_rank_path(first, sizeof first, dir, moe_ckpt_name(c), 0);
        printf("resharded %s (%d file%s) into %d file%s: %s, ...\n", moe_opts_str(o, "checkpoint"),
               moe_ckpt_num_files(c), moe_ckpt_num_files(c) == 1 ? "" : "s", world, world == 1 ? "" : "s", first);
    }
    return st;
}

static moe_dtype export_dtype(const char *s, moe_dtype dflt)
{
    if (!s)
        return dflt;
    return strcmp(s, "F16") == 0 ? MOE_F16 : strcmp(s, "BF16") == 0 ? MOE_BF16 : MOE_F32;
}

/* safetensors: u64 little-endian header length N, N bytes of JSON (padded
 * with spaces to a multiple of 8), the tensors' bytes back to back */
static moe_status write_safetensors(moe_ckpt *c, moe_dtype dt, int from_master, const char *path)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(c);
    json_t *hdr = json_object(), *meta = json_object();
    char buf[64];
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(meta, "arch", json_string(m->arch));
    snprintf(buf, sizeof buf, "%lld", (long long)m->state.num_updates);
    json_object_set_new(meta, "num_updates", json_string(buf));
    json_object_set_new(hdr, "__metadata__", meta);
    uint64_t off = 0, es = moe_dtype_size(dt);
    for (int i = 0; i < moe_ckpt_num_units(c); i++) {
        const moe_ckpt_unit *u = moe_ckpt_unit_at(c, i);
        for (int k = 0; k < u->n_tensors; k++) {
            const moe_ckpt_tensor *t = &u->tensors[k];
            json_t *x = json_object(), *shape = json_array(), *offs = json_array();
            json_object_set_new(x, "dtype", json_string(layout_dtype(dt)));
            for (int d = 0; d < t->ndim; d++)
                json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
            json_object_set_new(x, "shape", shape);
            json_array_append_new(offs, json_integer((json_int_t)off));
            off += (uint64_t)t->numel * es;
            json_array_append_new(offs, json_integer((json_int_t)off));
            json_object_set_new(x, "data_offsets", offs);
            if (json_object_get(hdr, t->name)) {
                json_decref(x);
                json_decref(hdr);
                return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s names tensor '%s' twice",
                                     moe_ckpt_file_path(c, 0), t->name);
            }
            json_object_set_new(hdr, t->name, x);
        }
    }
    for (int i = 0; i < moe_ckpt_num_buffers(c); i++) { /* gate state, fp32 whatever the export dtype */
        const char *name;
        int64_t bn;
        moe_ckpt_buffer_at(c, i, &name, &bn);
        json_t *x = json_object(), *shape = json_array(), *offs = json_array();
        json_object_set_new(x, "dtype", json_string("F32"));
        json_array_append_new(shape, json_integer((json_int_t)bn));
        json_object_set_new(x, "shape", shape);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += (uint64_t)bn * 4u;
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_object_set_new(x, "data_offsets", offs);
        if (json_object_get(hdr, name)) {
            json_decref(x);
            json_decref(hdr);
            return moe_error_set(MOE_ERR_INVALID_ARG, "checkpoint %s names tensor '%s' twice",
                                 moe_ckpt_file_path(c, 0), name);
        }
        json_object_set_new(hdr, name, x);
    }
    char *text = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(hdr);
    if (!text)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    size_t tl = strlen(text);
    uint64_t n = (tl + 7) / 8 * 8;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(text);
        return moe_error_set(MOE_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    }
    moe_status st = MOE_OK;
    int ok = fwrite(&n, 8, 1, f) == 1 && fwrite(text, 1, tl, f) == tl;
    for (uint64_t i = tl; ok && i < n; i++)
        ok = fputc(' ', f) != EOF;
    free(text);
    const int64_t chunk = (int64_t)4 << 20;
    void *data = malloc((size_t)chunk * 4u);
    if (!data)
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    for (int i = 0; i < moe_ckpt_num_units(c) && st == MOE_OK && ok; i++) {
        const moe_ckpt_unit *u = moe_ckpt_unit_at(c, i);
        for (int k = 0; k < u->n_tensors && st == MOE_OK && ok; k++) {
            const moe_ckpt_tensor *t = &u->tensors[k];
            for (int64_t x = 0; x < t->numel && st == MOE_OK && ok; x += chunk) {
                int64_t len = t->numel - x < chunk ? t->numel - x : chunk;
                st = moe_ckpt_read(c, i, from_master, t->offset + x, len, dt, data);
                if (st == MOE_OK)
                    ok = fwrite(data, es, (size_t)len, f) == (size_t)len;
            }
        }
    }
    for (int i = 0; i < moe_ckpt_num_buffers(c) && st == MOE_OK && ok; i++) {
        const char *name;
        int64_t bn;
        moe_ckpt_buffer_at(c, i, &name, &bn);
        float *v = bn <= chunk ? data : NULL; /* gate state: E values, far below a chunk */
        if (!v)
            st = moe_error_set(MOE_ERR_UNSUPPORTED, "buffer '%s' of %lld values is too large to export", name,
                               (long long)bn);
        if (st == MOE_OK)
            st = moe_ckpt_read_buffer(c, i, v);
        if (st == MOE_OK)
            ok = fwrite(v, 4, (size_t)bn, f) == (size_t)bn;
    }
    free(data);
    if (st == MOE_OK && (!ok || fflush(f) != 0 || fsync(fileno(f)) != 0))
        st = moe_error_set(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    if (fclose(f) != 0 && st == MOE_OK)
        st = moe_error_set(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return st;
}

static moe_status cmd_export(moe_ckpt *c, moe_opts *o, moe_registry *reg)
{
    const moe_ckpt_meta *m = moe_ckpt_get_meta(c);
    const char *out = moe_opts_str(o, "out");
    char dir[4096], cfg_path[4200];
    dir_of(dir, sizeof dir, out);
    MOE_TRY(check_out_dir(dir));
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    moe_dtype dt = export_dtype(moe_opts_str(o, "dtype"), m->act_dtype);
    int from_master = dt == MOE_F32 && m->master && m->act_dtype != MOE_F32;
    MOE_TRY(moe_ckpt_verify(c));
    /* config.json: the arch's options as the run resolved them */
    plan p;
    json_t *cfg;
    if (plan_rank(c, reg, moe_opts_str(o, "user-dir"), 1, 0, NULL, 1, &p) == MOE_OK) {
        cfg = json_incref(p.config);
        plan_free(&p);
    } else {
        fprintf(stderr, PROG ": warning: cannot build the model from the stored command line (%s); config.json "
                        "holds the arch's name and sizes only\n", moe_error_message());
        moe_error_clear();
        cfg = json_object();
        json_object_set_new(cfg, "arch", json_string(m->arch));
        json_object_set_new(cfg, "vocab_size", json_integer((json_int_t)m->vocab));
        json_object_set_new(cfg, "padding_idx", json_integer(m->padding_idx));
    }
    int64_t ne, ex;
    counts(c, &ne, &ex);
    json_object_set_new(cfg, "num_params", json_integer((json_int_t)(ne + ex)));
    json_object_set_new(cfg, "num_updates", json_integer((json_int_t)m->state.num_updates));
    json_object_set_new(cfg, "dtype", json_string(layout_dtype(dt)));
    outputs os = {0};
    moe_status st = outputs_add(&os, out);
    if (st == MOE_OK)
        st = outputs_add(&os, cfg_path);
    if (st == MOE_OK)
        st = write_safetensors(c, dt, from_master, os.tmp[0]);
    if (st == MOE_OK && json_dump_file(cfg, os.tmp[1], JSON_INDENT(2) | JSON_PRESERVE_ORDER) != 0)
        st = moe_error_set(MOE_ERR_IO, "cannot write %s", os.tmp[1]);
    json_decref(cfg);
    st = outputs_finish(&os, st);
    if (st == MOE_OK)
        printf("exported %s (%lld parameters, %s) to %s and %s\n", moe_opts_str(o, "checkpoint"), (long long)(ne + ex),
               layout_dtype(dt), out, cfg_path);
    return st;
}

static moe_status cmd_info(moe_ckpt *c, moe_opts *o, const char *path)
{
    if (moe_opts_flag(o, "verify"))
        MOE_TRY(moe_ckpt_verify(c));
    if (moe_opts_flag(o, "json")) {
        json_t *j = info_json(c, path);
        json_object_set_new(j, "verified", json_boolean(moe_opts_flag(o, "verify")));
        json_dumpf(j, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        fputc('\n', stdout);
        json_decref(j);
    } else {
        info_text(c, path);
        MOE_TRY(info_buffers(c));
        if (moe_opts_flag(o, "verify"))
            printf("every checksum matches\n");
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------- main */

static moe_status check_flags(moe_opts *o, const char **cmd)
{
    *cmd = moe_opts_str(o, "command");
    if (!*cmd)
        return usage("the following arguments are required: command (info, consolidate, reshard or export)");
    if (strcmp(*cmd, "info") != 0 && strcmp(*cmd, "consolidate") != 0 && strcmp(*cmd, "reshard") != 0 &&
        strcmp(*cmd, "export") != 0)
        return usage("unknown command '%s': expected info, consolidate, reshard or export", *cmd);
    if (!moe_opts_str(o, "checkpoint"))
        return usage("the following arguments are required: CKPT (the checkpoint)");
    int info = strcmp(*cmd, "info") == 0, reshard = strcmp(*cmd, "reshard") == 0;
    if (!info && !moe_opts_str(o, "out"))
        return usage("%s needs --out", *cmd);
    if (reshard && !moe_opts_given(o, "world-size"))
        return usage("reshard needs --world-size (the number of ranks the files are for)");
    if (!reshard && (moe_opts_given(o, "world-size") || moe_opts_given(o, "ddp-backend")))
        return usage("--world-size and --ddp-backend belong to reshard, not %s", *cmd);
    if (!info && (moe_opts_flag(o, "json") || moe_opts_flag(o, "verify")))
        return usage("--json and --verify belong to info, not %s", *cmd);
    if (strcmp(*cmd, "export") != 0 && moe_opts_given(o, "dtype"))
        return usage("--dtype belongs to export, not %s", *cmd);
    if (strcmp(*cmd, "export") == 0 && moe_opts_flag(o, "no-optimizer"))
        return usage("--no-optimizer belongs to consolidate and reshard, not %s", *cmd);
    return MOE_OK;
}

static int run(int argc, char **argv)
{
    moe_opts *o = NULL;
    moe_registry *reg = NULL;
    moe_ckpt *c = NULL;
    int usage_error = 1;
    const char *cmd = NULL;
    moe_status st = moe_opts_create_tool(
        PROG, "[-h] {info,consolidate,reshard,export} CKPT [--json] [--out PATH] [--world-size M] [options]",
        "Shows what a moelm checkpoint holds, consolidates the per-rank files of any world size into one file, "
        "reshards them for another world size or ddp backend, or exports the model as safetensors with fairseq's "
        "tensor names (and config.json beside it). CKPT is what --restore-file takes (DIR/checkpoint_last.pt for "
        "its per-rank files) or one consolidated file.",
        &o);
    if (st == MOE_OK)
        st = moe_opts_add_table(o, "moelm-checkpoint", tool_options, N_OPTIONS);
    if (st == MOE_OK)
        st = moe_opts_add_positional(o, "command");
    if (st == MOE_OK)
        st = moe_opts_add_positional(o, "checkpoint");
    if (st == MOE_OK)
        st = moe_opts_parse(o, argc, argv, 1);
    if (st == MOE_OK && moe_opts_flag(o, "help")) {
        moe_opts_print_help(o, stdout);
        moe_opts_destroy(o);
        return 0;
    }
    if (st == MOE_OK)
        st = check_flags(o, &cmd);
    if (st == MOE_OK) {
        usage_error = 0;
        st = moe_ckpt_open(moe_opts_str(o, "checkpoint"), &c);
    }
    if (st == MOE_OK && strcmp(cmd, "info") != 0)
        st = moe_registry_create(moe_opts_str(o, "user-dir"), &reg);
    if (st == MOE_OK) {
        if (strcmp(cmd, "info") == 0)
            st = cmd_info(c, o, moe_opts_str(o, "checkpoint"));
        else if (strcmp(cmd, "consolidate") == 0)
            st = cmd_consolidate(c, o, reg);
        else if (strcmp(cmd, "reshard") == 0)
            st = cmd_reshard(c, o, reg);
        else
            st = cmd_export(c, o, reg);
    }
    fflush(stdout);
    int rc = st == MOE_OK ? 0 : moe_error_report(PROG, st, usage_error);
    moe_ckpt_close(c);
    moe_registry_destroy(reg);
    moe_opts_destroy(o);
    return rc;
}

int main(int argc, char **argv)
{
    /* the build of a model from a stored command line may warn (stderr); stdout is the tool's */
    moe_log_configure(stderr, 0, 1, MOE_LOG_WARNING, MOE_LOG_FORMAT_SIMPLE);
    return run(argc, argv);
}
