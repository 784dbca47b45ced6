/* checkpoint.h: save and resume training (fairseq's checkpoint_utils).
 *
 * Every rank writes its own file: fairseq's name with "-rank-<r>" before
 * ".pt" (checkpoint_last.pt -> checkpoint_last-rank-0.pt), whatever the world
 * size, holding what that rank holds: every unit's parameters (the shard of a
 * fully sharded unit), the fp32 master copies, the optimizer's state (the
 * plugin's bytes, moe_optimizer_ops.save_state) and the loop's counters.
 *
 * File format, version 1, little-endian:
 *   header   "MOELMCKP", u32 version, u32 header_bytes, u64 file_bytes,
 *            u32 world, u32 rank, u32 act_dtype, u32 grad_dtype, u32 master,
 *            u32 fully_sharded, char arch[64], char optimizer[64],
 *            i64 num_updates, i64 epoch, i64 iter, u32 end_of_epoch,
 *            u32 has_scaler, f64 best_valid_loss,
 *            scaler: f64 scale, i64 window, i64 iter, i64 last_overflow_iter,
 *                    i64 last_rescale_iter, i64 overflows_since_rescale,
 *            u64 optimizer_state_bytes, u32 n_units, u32 0,
 *            per unit: i32 expert_index, u32 sharded, u32 has_master,
 *                      u32 name_bytes, i64 numel, i64 padded, i64 shard, name
 *   data     per unit: shard elements of act_dtype (the parameters this rank
 *            holds), then shard fp32 master elements when has_master;
 *            then the optimizer state bytes
 *   trailer  u64 checksum of every byte before it, "MOELMEND"
 * Written to <path>.tmp, fsync'ed, rename()d over <path> (and the directory
 * fsync'ed), so a crash while saving leaves the previous file intact. Data
 * goes through the backend in bounded chunks.
 */
#ifndef MOE_CORE_CHECKPOINT_H
#define MOE_CORE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/runtime.h"
#include "core/scaler.h"

#define MOE_CKPT_VERSION 1u

/* The training loop's state a checkpoint carries besides tensors. */
typedef struct moe_ckpt_state {
    int64_t num_updates;
    int64_t epoch;         /* the epoch the checkpoint was taken in */
    int64_t iter;          /* batches of it consumed */
    int end_of_epoch;      /* taken at its end: resume at epoch + 1, iter 0 */
    double best_valid_loss;
    int has_scaler;
    moe_scaler scaler;     /* dynamic fields restored; the rest comes from the options */
} moe_ckpt_state;

/* What the run is, to write into the header and check a file against. */
typedef struct moe_ckpt_run {
    moe_runtime *rt;
    const char *arch, *optimizer;
    const moe_optimizer_ops *opt_ops;
    void *opt;
} moe_ckpt_run;

/* <dir>/<name> with "-rank-<rank>" inserted before a final ".pt" (appended
 * when there is none). An absolute name ignores dir. */
void moe_ckpt_rank_path(char *buf, size_t size, const char *dir, const char *name, int rank);

/* mkdir -p */
moe_status moe_ckpt_mkdirs(const char *dir);

/* Writes this rank's state atomically to `path`. */
moe_status moe_ckpt_save(const moe_ckpt_run *run, const moe_ckpt_state *s, const char *path);

/* Reads `path` into the runtime's parameters and masters, the optimizer's
 * state (unless load_optimizer is 0) and *s. A file of another world size,
 * arch, layout or dtype, a truncated one and one whose checksum does not
 * match are refused with one line naming the difference. */
moe_status moe_ckpt_load(const moe_ckpt_run *run, const char *path, int load_optimizer, moe_ckpt_state *s);

#endif
