/* runtime_private.h: the runtime's own structs, shared by runtime.c (the
 * host and the parameter store) and fsdp.c (the fully sharded engine) and by
 * nothing else: other core files go through runtime.h, plugins through
 * moe_host.
 */
#ifndef MOE_CORE_RUNTIME_PRIVATE_H
#define MOE_CORE_RUNTIME_PRIVATE_H

#include "core/plan.h"
#include "core/runtime.h"

typedef struct moe_param_entry {
    char *name;
    int unit;
    int64_t offset, numel;
    moe_param_def def;
} moe_param_entry;

typedef struct moe_unit_entry {
    char *name;
    int expert_index;
    int64_t numel;
    int64_t padded;          /* numel rounded up to a multiple of the shard count */
    int64_t shard;           /* elements per shard (== padded when not sharded) */
    int sharded;
    int gathers;             /* sharded: open unit_gather calls; param/grad exist while > 0 */
    int prefetched;          /* sharded: param allocated and its all-gather started, not yet gathered */
    moe_comm_req *inflight;  /* that all-gather (NULL once complete) */
    void *rs_staging;        /* sharded, released: the reduce-scatter of grad on its way into grad_shard */
    moe_comm_req *rs_req;
    /* whole param and grad; for a sharded unit only while gathered (grad once asked for) */
    void *param, *grad;
    void *param_shard, *grad_shard; /* sharded: this rank's shard, persistent */
    void *master;
} moe_unit_entry;

struct moe_runtime {
    moe_host host; /* first: plugins get &rt->host */
    moe_opts *opts;
    moe_registry *reg;
    moe_runtime_config cfg;
    const moe_backend_ops *be;
    moe_ctx *ctx;
    const moe_comm_ops *comm_ops;
    moe_comm *comm;
    moe_unit_entry *units;
    int n_units, cap_units;
    moe_param_entry *params;
    int n_params, cap_params;
    int rs_unit;          /* the unit whose gradient reduce-scatter is in flight, or -1 */
    uint64_t step_seed;
    int allocated;
    int owns_opts;        /* created by moe_runtime_create_for_test */
    int argc;             /* the command line, re-parsed as plugins add options */
    char **argv;
    int observed;         /* ops and communicator wrapped (core/opwrap.h): report unit gathers */
    int64_t total_numel;  /* elements registered over every unit */
    moe_parallel_plan plan;
    int plan_declared;    /* the arch declared its experts (host->plan_experts) */
    const moe_normalizer_ops *normalizer;
    /* host->unit_grad_ready goes here (the trainer's --optimizer-overlap), or nowhere */
    moe_status (*grad_ready)(void *ctx, int unit_id);
    void *grad_ready_ctx;
};

/* a unit id the arch passed to fn (unit_gather, unit_grad_ready, ...): registered, parameters allocated */
moe_status moe_runtime_check_unit(const moe_runtime *rt, int unit_id, const char *fn);

#endif
