/* tensorboard.h: TensorBoard event files, written natively (no TensorFlow,
 * no protobuf library): --tensorboard-logdir DIR gets fairseq's layout, one
 * subfolder per progress-bar tag (train, train_inner, valid, or the subset's
 * name), each with one events.out.tfevents.<time>.<host>.<pid>.<n> file.
 *
 * A file is a sequence of TFRecords (u64 length, masked CRC-32C of the
 * length, the bytes, masked CRC-32C of the bytes; little-endian) each holding
 * one tensorflow.Event protobuf: first {wall_time, file_version
 * "brain.Event:2"}, then {wall_time, step, summary {value {tag,
 * simple_value}}} for a scalar and {..., value {tag, histo
 * HistogramProto}} for a histogram. The messages are encoded by hand here
 * (field numbers in tensorboard.c).
 *
 * Not here: which numbers to log (the trainer); a reader (the tests have
 * one, and TensorBoard's own). Errors writing are reported once by the
 * caller, who then stops writing: TensorBoard is a view of the run, never a
 * reason to stop it.
 */
#ifndef MOE_CORE_TENSORBOARD_H
#define MOE_CORE_TENSORBOARD_H

#include <stdint.h>

#include "core/log.h"
#include "moe/plugin.h"

typedef struct moe_tb moe_tb;

/* Creates `logdir` (mkdir -p); the tag folders and files appear at first use. */
moe_status moe_tb_open(const char *logdir, moe_tb **out);
void moe_tb_close(moe_tb *tb);

moe_status moe_tb_scalar(moe_tb *tb, const char *tag, const char *name, int64_t step, double value);
/* A histogram given by its buckets: bucket i holds counts[i] values in
 * (limits[i-1], limits[i]] (the first from lo); num, sum and sum_squares
 * are the totals TensorBoard shows. */
moe_status moe_tb_histogram(moe_tb *tb, const char *tag, const char *name, int64_t step, double lo, double hi,
                            const double *limits, const double *counts, int n, double num, double sum,
                            double sum_squares);
/* The numeric values of a stats line as fairseq's TensorBoard wrapper logs
 * them: every key but num_updates, `prefix` ("train_", "valid_") removed,
 * values that are not numbers skipped. */
moe_status moe_tb_stats(moe_tb *tb, const char *tag, const char *prefix, int64_t step, const moe_stat_kv *kv, int n);
/* Pushes what was written to the files (they stay open). */
moe_status moe_tb_flush(moe_tb *tb);

/* CRC-32C (Castagnoli) of n bytes, and TFRecord's mask of it. */
uint32_t moe_crc32c(const void *data, size_t n);
uint32_t moe_tb_masked_crc(uint32_t crc);

#endif
