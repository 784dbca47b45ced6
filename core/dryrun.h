/* dryrun.h: --dry-run: the plan of a run without allocating it.
 *
 * Prints fairseq's two parameter-count lines for the planned world size, the
 * bytes per GPU for parameters, gradients and optimizer state under the chosen
 * precision and ddp backend, and the model FLOPs per token.
 */
#ifndef MOE_CORE_DRYRUN_H
#define MOE_CORE_DRYRUN_H

#include <stdio.h>

#include "core/runtime.h"
#include "core/trainer.h"

typedef struct moe_plan {
    int64_t non_expert_params, expert_params;   /* as fairseq's log lines count them */
    int world;
    int sharded;                 /* --ddp-backend fully_sharded */
    double param_bytes, grad_bytes, optim_bytes; /* per GPU */
    double flops_per_token;      /* training, forward + backward */
} moe_plan;

moe_status moe_plan_compute(moe_runtime *rt, const moe_components *c, moe_plan *plan);
moe_status moe_dry_run(moe_runtime *rt, const moe_components *c, FILE *out);
/* The two "num. ... model params" log lines. */
void moe_log_param_counts(const moe_runtime *rt);
/* 908423168 -> "908,423,168" */
void moe_format_thousands(char *buf, size_t size, int64_t v);

#endif
