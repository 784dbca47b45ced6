/* fsdp.h: the fully sharded data parallel engine behind host->unit_gather,
 * unit_prefetch and unit_release (--ddp-backend fully_sharded, ZeRO stage 3
 * as fairseq's FSDP; the contract is runtime.h's parameter store comment).
 *
 * Works on the runtime's private structs (core/runtime_private.h); only
 * runtime.c calls it. Every function is a no-op for units that are not
 * sharded.
 */
#ifndef MOE_CORE_FSDP_H
#define MOE_CORE_FSDP_H

#include "core/runtime_private.h"

/* The first (outermost) gather of a sharded unit all-gathers its whole
 * parameters, or waits for the all-gather a prefetch started. */
moe_status moe_fsdp_gather(moe_runtime *rt, int unit_id);
/* Starts the all-gather of a unit the arch gathers next. */
moe_status moe_fsdp_prefetch(moe_runtime *rt, int unit_id);
/* The outermost release frees the whole parameters and starts the
 * reduce-scatter of a gradient written meanwhile into this rank's shard. */
moe_status moe_fsdp_release(moe_runtime *rt, int unit_id);
/* Completes the reduce-scatter in flight, if any. */
moe_status moe_fsdp_finish(moe_runtime *rt);
/* The whole gradient of a gathered sharded unit, allocated and zeroed on
 * first use. */
moe_status moe_fsdp_full_grad(moe_runtime *rt, moe_unit_entry *u);
/* Completes a prefetch's all-gather; drop: free the parameters unused. */
moe_status moe_fsdp_prefetch_finish(moe_runtime *rt, moe_unit_entry *u, int drop);

#endif
