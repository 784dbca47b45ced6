/* checkpoint.h: save and resume training (fairseq's checkpoint_utils), at any
 * world size, and the reading side the tools use (moelm-checkpoint, the
 * sessions of moelm-eval-lm and moelm-generate).
 *
 * Every rank writes its own file: fairseq's name with "-rank-<r>" before
 * ".pt" (checkpoint_last.pt -> checkpoint_last-rank-0.pt), whatever the world
 * size, holding what that rank holds. A consolidated checkpoint is one file
 * of world 1 under any name. Any checkpoint loads into a run of any world
 * size and sharding: every unit is matched by name (experts by the global id
 * in theirs), and the element range a rank holds is put together from the
 * pieces of the files that overlap it.
 *
 * File format, version 3, little-endian only (version 2, the same without
 * buffers, is read too):
 *   header   (section 0)
 *     "MOELMCKP", u32 version (2), u32 header_bytes, u64 file_bytes,
 *     u32 world, u32 rank, u32 act_dtype, u32 grad_dtype (moe_dtype),
 *     u32 master (fp32 master copies), u32 sharded (some unit is split over
 *     the ranks), u64 save_id (the same in every file of one save),
 *     i64 vocab, i32 padding_idx, u32 n_units, u32 n_tensors, u32 n_args,
 *     char arch[64], char optimizer[64] ("" when no optimizer state),
 *     loop state: i64 num_updates, i64 epoch, i64 iter, u32 end_of_epoch,
 *       u32 has_scaler, f64 best_valid_loss, f64 scale, i64 scale_window,
 *       i64 iter, i64 last_overflow_iter, i64 last_rescale_iter,
 *       i64 overflows_since_rescale,
 *     optimizer state: u32 kind (0 none, 1 laid out, 2 opaque), u32 fields,
 *       u32 scalars, u32 0, 4 x {u32 dtype, i32 scale, char name[24]},
 *       4 x char scalar_name[24], u64 opaque_bytes,
 *     the training command line: n_args x {u32 bytes, bytes} (moelm-train's
 *       argv without argv[0]),
 *     per unit: i32 expert_index, u32 sharded, i64 numel, i64 padded,
 *       i64 start, i64 n (this file holds elements [start, start + n) of the
 *       padded unit), u32 n_tensors, u32 name_bytes, name, then per tensor:
 *       u32 ndim, u32 name_bytes, name, i64 shape[2], i64 offset (elements
 *       into the unit),
 *     u32 n_buffers, then per buffer: u32 name_bytes, name, i64 n (named
 *       fp32 state that is not a parameter, the same in every file of a
 *       save: "decoder.layers.<i>.moe_layer.gate.expert_bias")
 *   sections 1 .. n_units, one per unit: n elements of act_dtype (the
 *     parameters), n fp32 masters (when master), then the optimizer state of
 *     the piece as its layout says (moe_opt_state_layout: each field's n
 *     elements, then the unit's `scalars` fp32 values; units with numel 0
 *     have none); then one section per buffer (n fp32 values); with opaque
 *     optimizer state, one more section holding the optimizer's bytes as
 *     save_state gives them
 *   footer   per section {u64 offset, u64 bytes, u64 checksum}, then
 *     u32 n_sections, u32 0, u64 checksum of the footer, u64 checksum of
 *     every byte before it, "MOELMEND"
 * So a tool reads one unit's piece at its offset and verifies it alone.
 * Files are written to <path>.tmp, fsync'ed, rename()d over <path> and the
 * directory fsync'ed, so a crash while saving leaves the previous file whole.
 * Format 1 (earlier moelm) is refused with a message saying so.
 *
 * Arithmetic: nothing is converted on the way through, except where a run
 * keeps fp16 moments with a dynamic scale (adam --fp16-adam-stats) and an
 * optimizer tensor is cut differently from every file's piece: the stored
 * values are then dequantized (m16 * scale), put together in fp32 and
 * requantized with the kernel's rule (scale = 1e-8 + max|m| / 65504, stored
 * m / scale rounded to fp16). A tensor whose range is a file's piece is
 * copied bit for bit, moments and scales included.
 *
 * Not here: when to save (the trainer), the model (the arch plugin).
 */
#ifndef MOE_CORE_CHECKPOINT_H
#define MOE_CORE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/runtime.h"
#include "core/scaler.h"

#define MOE_CKPT_VERSION 3u

/* The training loop's state a checkpoint carries besides tensors. */
typedef struct moe_ckpt_state {
    int64_t num_updates;
    int64_t epoch;         /* the epoch the checkpoint was taken in */
    int64_t iter;          /* batches of it consumed (per rank, at the world that wrote it) */
    int end_of_epoch;      /* taken at its end: resume at epoch + 1, iter 0 */
    double best_valid_loss;
    int has_scaler;
    moe_scaler scaler;     /* dynamic fields restored; the rest comes from the options */
    uint64_t save_id;      /* load: the checkpoint's (equal on every rank that read the same files) */
} moe_ckpt_state;

/* A named fp32 buffer of the run saved beside the parameters (a gate's
 * state): the same on every rank. */
typedef struct moe_ckpt_buffer {
    const char *name;
    float *data;           /* backend memory */
    int64_t n;
} moe_ckpt_buffer;

/* What the run is, to write into the header and check a file against. */
typedef struct moe_ckpt_run {
    moe_runtime *rt;
    const char *arch, *optimizer;
    const moe_optimizer_ops *opt_ops;
    void *opt;
    int64_t vocab;         /* the task's dictionary size (recorded for the tools) */
    int n_buffers;         /* saved, and restored by name (a checkpoint without one leaves it, with a warning) */
    const moe_ckpt_buffer *buffers;
} moe_ckpt_run;

/* <dir>/<name> with "-rank-<rank>" inserted before a final ".pt" (appended
 * when there is none). An absolute name ignores dir. */
void moe_ckpt_rank_path(char *buf, size_t size, const char *dir, const char *name, int rank);

/* <dir>/<name>, or name when it is absolute or dir is empty: the checkpoint
 * --restore-file names. */
void moe_ckpt_join(char *buf, size_t size, const char *dir, const char *name);

/* mkdir -p */
moe_status moe_ckpt_mkdirs(const char *dir);

/* Whether a checkpoint answers to `path` (as --restore-file takes it): the
 * file itself, or its per-rank files (path's rank-0 name). */
int moe_ckpt_exists(const char *path);

/* Writes this rank's state atomically to `path` (s->save_id as given). */
moe_status moe_ckpt_save(const moe_ckpt_run *run, const moe_ckpt_state *s, const char *path);

/* fairseq's names for one save; the trainer decides which are due. */
typedef struct moe_ckpt_save_spec {
    const char *dir;        /* --save-dir ("" or NULL: ".") */
    int epoch_file;         /* checkpoint<epoch>.pt */
    int interval_file;      /* checkpoint_<epoch>_<updates>.pt */
    int best_file;          /* checkpoint_best.pt */
    int last_file;          /* checkpoint_last.pt */
    int64_t keep_interval;  /* --keep-interval-updates: older interval files of this rank removed; < 0 keeps all */
    double score;           /* the validation loss logged with it, NaN for None */
} moe_ckpt_save_spec;

/* One save on every rank: a save id agreed over the ranks (a collective: all
 * ranks call it together), the first name written in full, the others hard
 * links (or written again where links fail), each replaced atomically; then
 * fairseq's "saved checkpoint" line and the pruning of interval files.
 * *wrote: whether any name was due. */
moe_status moe_ckpt_save_all(const moe_ckpt_run *run, const moe_ckpt_state *s, const moe_ckpt_save_spec *spec,
                             int *wrote);

/* Reads the checkpoint `path` names (its per-rank files of any world size,
 * or one consolidated file) into the runtime's parameters and masters (the
 * range this rank holds of every unit), the optimizer's state (unless
 * load_optimizer is 0) and *s. Another arch, model shape, dtype or
 * masters-or-not, a truncated file, one whose checksums do not match and
 * files of different saves are refused with one line naming the difference.
 * *loaded_from receives the file logged as loaded (rank 0's, or the one). */
moe_status moe_ckpt_load(const moe_ckpt_run *run, const char *path, int load_optimizer, moe_ckpt_state *s,
                         char *loaded_from, size_t size);

/* The training command line stored in a checkpoint (path as --restore-file
 * takes it, or a consolidated file): *argv is a malloc'd array of malloc'd
 * strings (free with moe_ckpt_free_args). */
moe_status moe_ckpt_read_args(const char *path, int *argc, char ***argv);
void moe_ckpt_free_args(int argc, char **argv);

/* The state of a model's gates (moe_gate_ops.state, reached through
 * moe_arch_ops.moe_gate once the arch has made its gates) as buffers named
 * "<layer>.moe_layer.gate.expert_bias", <layer> the unit prefix of MoE layer
 * j's "<layer>.moe_layer.gate.wg.weight"; none for gates without state.
 * Free with moe_ckpt_free_buffers. */
moe_status moe_ckpt_gate_buffers(moe_runtime *rt, const moe_arch_ops *arch, void *model, moe_ckpt_buffer **out,
                                 int *n);
void moe_ckpt_free_buffers(moe_ckpt_buffer *b, int n);
/* The buffers of the checkpoint `path` names into bufs, by name, as
 * moe_ckpt_load restores them (the tools' sessions, after
 * moe_ckpt_load_params). */
moe_status moe_ckpt_load_buffers(moe_runtime *rt, const char *path, const moe_ckpt_buffer *bufs, int n);

/* Loads the parameters (and fp32 masters when the runtime keeps them) of
 * every unit of rt from the checkpoint, whatever world size wrote it;
 * *num_updates receives its update count (may be NULL). Unlike moe_ckpt_load
 * the precision may differ: parameters are converted (from the fp32 masters
 * when the file has them and the runtime computes in another dtype than the
 * file's), masters made from the parameters when the file has none. */
moe_status moe_ckpt_load_params(moe_runtime *rt, const char *path, int64_t *num_updates);

/* ------------------------------------------------------------------------
 * An opened checkpoint, for the tools: every file of one save, headers read
 * and checked against each other; tensor data read on demand. */
typedef struct moe_ckpt moe_ckpt;

enum { MOE_CKPT_OPT_NONE = 0, MOE_CKPT_OPT_LAYOUT = 1, MOE_CKPT_OPT_OPAQUE = 2 };

typedef struct moe_ckpt_meta {
    uint32_t version;
    int world;                  /* ranks that wrote it (1: one rank, or consolidated) */
    moe_dtype act_dtype, grad_dtype;
    int master;                 /* fp32 master copies */
    int sharded;                /* some unit is split over the files (fully_sharded) */
    uint64_t save_id;
    int64_t vocab;
    int padding_idx;
    char arch[64], optimizer[64];
    moe_ckpt_state state;
    int opt_kind;               /* MOE_CKPT_OPT_* */
    moe_opt_state_layout opt_layout; /* MOE_CKPT_OPT_LAYOUT */
    uint64_t opt_opaque_bytes;  /* MOE_CKPT_OPT_OPAQUE: per file */
    int argc;                   /* the training command line */
    char **argv;
    char names_[2 * MOE_OPT_MAX_FIELDS][24]; /* what opt_layout's names point into */
} moe_ckpt_meta;

typedef struct moe_ckpt_tensor {
    const char *name;
    int ndim;
    int64_t shape[2];
    int64_t offset, numel;      /* elements into the unit */
} moe_ckpt_tensor;

typedef struct moe_ckpt_piece {
    int file;                   /* = the rank that wrote it */
    int64_t start, n;           /* elements [start, start + n) of the padded unit */
} moe_ckpt_piece;

typedef struct moe_ckpt_unit {
    const char *name;
    int expert_index;           /* global expert id, -1 for non-expert units */
    int64_t numel;
    int n_tensors;
    const moe_ckpt_tensor *tensors;
    int n_pieces;               /* every file's, replicas included, by start then file */
    const moe_ckpt_piece *pieces;
} moe_ckpt_unit;

/* Opens the checkpoint `path` names (as moe_ckpt_load). Reads headers and
 * footers only; a section's checksum is checked when it is first read. */
moe_status moe_ckpt_open(const char *path, moe_ckpt **out);
void moe_ckpt_close(moe_ckpt *c);
const moe_ckpt_meta *moe_ckpt_get_meta(const moe_ckpt *c);
int moe_ckpt_num_files(const moe_ckpt *c);
const char *moe_ckpt_file_path(const moe_ckpt *c, int file);
uint64_t moe_ckpt_file_bytes(const moe_ckpt *c, int file);
/* The name --restore-file would take: "checkpoint_last.pt" for
 * DIR/checkpoint_last-rank-<r>.pt, a consolidated file's own name. */
const char *moe_ckpt_name(const moe_ckpt *c);
/* The model's units, each once (experts of every file), in the order of a
 * one-rank model: a file's units in its order, others' experts after their
 * layer's. */
int moe_ckpt_num_units(const moe_ckpt *c);
const moe_ckpt_unit *moe_ckpt_unit_at(const moe_ckpt *c, int unit);
int moe_ckpt_find_unit(const moe_ckpt *c, const char *name); /* -1 when absent */
/* Reads every byte of every file: each section's checksum and each file's. */
moe_status moe_ckpt_verify(moe_ckpt *c);

/* The checkpoint's buffers (file 0's; every file holds the same). */
int moe_ckpt_num_buffers(const moe_ckpt *c);
void moe_ckpt_buffer_at(const moe_ckpt *c, int i, const char **name, int64_t *n);
int moe_ckpt_find_buffer(const moe_ckpt *c, const char *name); /* -1 when absent */
/* Buffer i's n fp32 values into dst, its checksum checked. */
moe_status moe_ckpt_read_buffer(moe_ckpt *c, int i, float *dst);

/* Elements [first, first + n) of a unit's parameters (master = 0) or fp32
 * masters (master = 1), converted to `dtype` (round to nearest even). */
moe_status moe_ckpt_read(moe_ckpt *c, int unit, int master, int64_t first, int64_t n, moe_dtype dtype, void *dst);

/* One file to write from an opened checkpoint: which range of which unit it
 * holds, in the unit order of the run that will read it. */
typedef struct moe_ckpt_layout_unit {
    const char *name;
    int expert_index;
    int64_t numel, padded, start, n;
    int sharded;
} moe_ckpt_layout_unit;

typedef struct moe_ckpt_layout {
    int world, rank;
    int n_units;
    const moe_ckpt_layout_unit *units;
} moe_ckpt_layout;

/* Whether `l` can be written from c: every unit there with the same size,
 * ranges inside it, the optimizer state cut-able (laid out, or opaque and
 * cut as rank l->rank's file). One line naming the first problem. */
moe_status moe_ckpt_check_layout(moe_ckpt *c, const moe_ckpt_layout *l, int with_optimizer);
/* Writes one file of layout `l` (the loop state, command line and save id
 * `save_id` of a new save, tensors from c) to exactly `path`, fsync'ed; the
 * caller renames it into place. */
moe_status moe_ckpt_write(moe_ckpt *c, const moe_ckpt_layout *l, int with_optimizer, uint64_t save_id,
                          const char *path);
/* fsync of the directory holding path (after renames). */
void moe_ckpt_sync_dir(const char *path);

const char *moe_ckpt_dtype_name(moe_dtype d); /* "fp32", "fp16", "bf16" */

#endif
