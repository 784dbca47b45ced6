/* config.h: what the parsed flags mean together: contradictions caught before
 * anything is loaded or allocated, the precision regime, and the first values
 * of fairseq's per-epoch lists (--lr, --update-freq).
 *
 * Reads options through core/options.h only. Component flags it looks at
 * (--moe-expert-count, --moe-freq: the arch's) are read only when some table
 * registered them.
 */
#ifndef MOE_CORE_CONFIG_H
#define MOE_CORE_CONFIG_H

#include "core/options.h"
#include "moe/tensor.h"

/* Contradictory or incomplete flags for a run on `world_size` ranks, one
 * clear error for the first problem found (MOE_ERR_INVALID_ARG):
 *  - --fp16 / --memory-efficient-fp16 together with --bf16 / --memory-efficient-bf16;
 *  - --moe-expert-count E and world W with neither dividing the other, or
 *    E < W without --ddp-backend fully_sharded (FAIRSEQ_SPEC.md §2.4);
 *  - --moe-freq > 0 without --moe-expert-count;
 *  - neither --batch-size nor --max-tokens;
 *  - an --update-freq schedule of several values in fp16 without
 *    --fp16-scale-window (§5.3);
 *  - --lr / --update-freq that are not lists of numbers (positive integers
 *    for --update-freq);
 *  - --distributed-rank outside the world, --distributed-backend single with
 *    more than one rank. */
moe_status moe_config_check(const moe_opts *o, int world_size);

/* The precision regime:
 *   default                   fp32 everywhere, no master copy, no loss scaling
 *   --fp16                    fp16 activations and gradients, fp32 master, loss scaling
 *   --memory-efficient-fp16   fp16 activations and gradients, no master, loss scaling
 *   --bf16                    bf16 activations and gradients, fp32 master, no loss scaling
 *   --memory-efficient-bf16   bf16 activations and gradients, no master, no loss scaling
 * The memory-efficient flags imply the plain ones (as in fairseq). */
void moe_config_precision(const moe_opts *o, moe_dtype *act, moe_dtype *grad, int *master_weights,
                          int *loss_scaling);

/* First value of --update-freq (micro-batches per update; 1 if unreadable). */
int moe_config_update_freq(const moe_opts *o);

/* First value of --lr (the peak learning rate; 0.25, fairseq's default, if unreadable). */
double moe_config_lr(const moe_opts *o);

#endif
