/* plan.h: the parallel plan (moe_parallel_plan, include/moe/plugin.h): which
 * experts each rank holds, the all-to-all and expert replica groups, how
 * non-expert units are sharded, and the expert-gradient scale. The one place
 * these follow from the world size, the ddp backend and the expert count;
 * the runtime builds the plan once (when the arch declares its experts) and
 * every other reader (the arch through host->plan, the trainer, the dry run,
 * the checkpoint tools through the units the arch registers) reads it.
 *
 * Not here: the rules that are choices of a run rather than of a layout
 * (E < world needing --ddp-backend fully_sharded: core/config.c).
 */
#ifndef MOE_CORE_PLAN_H
#define MOE_CORE_PLAN_H

#include "moe/plugin.h"

typedef struct moe_parallel_plan_spec {
    int world, rank;
    int experts;                          /* 0: no MoE layer */
    int fully_sharded;                    /* --ddp-backend fully_sharded */
    int legacy_ddp;                       /* --ddp-backend legacy_ddp: expert gradients / world (§2.9) */
    const moe_normalizer_ops *normalizer; /* NULL: scale 1 (nothing trains) */
} moe_parallel_plan_spec;

/* E experts on W ranks: E a multiple or a divisor of W (FAIRSEQ_SPEC.md
 * §2.4); otherwise one line naming both and the nearest counts that fit
 * (MOE_ERR_INVALID_ARG). experts <= 0 passes. */
moe_status moe_parallel_plan_check(int64_t experts, int64_t world);

/* The plan of `spec` (arithmetic only: no groups yet). *p is overwritten;
 * free it with moe_parallel_plan_free. */
moe_status moe_parallel_plan_build(const moe_parallel_plan_spec *spec, moe_parallel_plan *p);

/* Creates the plan's all-to-all and replica groups (a collective: every rank
 * calls it in the same order; every rank creates every group). Nothing to do
 * on one rank. */
moe_status moe_parallel_plan_create_groups(moe_parallel_plan *p, const moe_comm_ops *ops, moe_comm *comm);

void moe_parallel_plan_free(moe_parallel_plan *p);

/* How a unit of `numel` elements is held: a non-expert unit over
 * p->shards > 1 ranks is padded to shards equal pieces (torch.chunk) and rank
 * r holds piece r, elements [start, start + shard) of the padded unit;
 * everything else is held whole (padded = shard = numel, start 0). */
typedef struct moe_unit_layout {
    int sharded;
    int64_t padded, shard, start;
} moe_unit_layout;

moe_unit_layout moe_parallel_plan_unit(const moe_parallel_plan *p, int expert_index, int64_t numel);

#endif
