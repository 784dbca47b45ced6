/* runtime.h: the core state behind moe_host: the parsed options, the plugin
 * registry, the backend and its context, the communicator, and the parameter
 * store (units of flat buffers, FAIRSEQ_SPEC.md §4 of ARCHITECTURE.md).
 *
 * One runtime per process. It owns everything it creates; plugins get the
 * moe_host view only.
 */
#ifndef MOE_CORE_RUNTIME_H
#define MOE_CORE_RUNTIME_H

#include "core/options.h"
#include "core/registry.h"
#include "moe/plugin.h"

typedef struct moe_runtime moe_runtime;

typedef struct moe_runtime_config {
    const char *backend;        /* "cpu", "cuda", ... */
    const char *communicator;   /* "single", "mpi", "nccl" */
    int device_id;              /* < 0: default */
    moe_dtype act_dtype;        /* parameters as the model computes with them, activations */
    moe_dtype grad_dtype;       /* gradients */
    int master_weights;         /* keep an fp32 master copy (--fp16/--bf16 without memory-efficient) */
    int fully_sharded;          /* --ddp-backend fully_sharded: shard non-expert units over the ranks */
    uint64_t seed;
    int dry_run;                /* no backend memory for parameters */
} moe_runtime_config;

/* opts and reg stay owned by the caller and must outlive the runtime. */
moe_status moe_runtime_create(moe_opts *opts, moe_registry *reg, const moe_runtime_config *cfg,
                              moe_runtime **out);
void moe_runtime_destroy(moe_runtime *rt);
const moe_host *moe_runtime_host(const moe_runtime *rt);
moe_opts *moe_runtime_opts(const moe_runtime *rt);
moe_registry *moe_runtime_registry(const moe_runtime *rt);

/* The command line (without argv[0]) that plugin options are parsed from. */
moe_status moe_runtime_set_args(moe_runtime *rt, int nargs, const char *const *args);
/* What moe_runtime_set_args stored (a checkpoint records it): *args stays
 * owned by the runtime. */
int moe_runtime_args(const moe_runtime *rt, const char *const **args);
/* Load a plugin, add its options (owner "<kind> <name>") and give them their
 * values from the command line (lenient pass), then call its load hook. */
moe_status moe_runtime_load_plugin(moe_runtime *rt, moe_plugin_kind kind, const char *name,
                                   const moe_plugin_desc **out);

/* Replaces the ops table plugins see (host->ops) and the communicator
 * (host->comm_ops, and the runtime's own gathers) with wrappers of them,
 * and reports unit gathers and releases to core/opwrap.h. Call before any
 * plugin is built: plugins may keep the pointers. */
void moe_runtime_wrap(moe_runtime *rt, const moe_ops *ops, const moe_comm_ops *comm);

/* Per-update seed handed to plugins by host->step_seed (seed + num_updates). */
void moe_runtime_set_step_seed(moe_runtime *rt, uint64_t step_seed);
/* where host->unit_grad_ready goes (NULL: nowhere) */
void moe_runtime_set_grad_ready(moe_runtime *rt, moe_status (*fn)(void *ctx, int unit_id), void *ctx);
/* The gate the arch will drive (host->gate_ops). */
void moe_runtime_set_gate(moe_runtime *rt, const moe_gate_ops *gate);
/* host->expert_grad_scale (the plan's until set). */
void moe_runtime_set_expert_grad_scale(moe_runtime *rt, float scale);
/* The parallel plan (core/plan.h), also host->plan: built at creation
 * without experts, rebuilt once when the arch declares them. */
const moe_parallel_plan *moe_runtime_plan(const moe_runtime *rt);
/* The normalizer the plan's expert-gradient scale comes from (set before the
 * arch is built; without one the scale is 1). */
void moe_runtime_set_normalizer(moe_runtime *rt, const moe_normalizer_ops *normalizer);
/* host->padding_idx (1, fairseq's <pad>, until set): the task's. */
void moe_runtime_set_padding_idx(moe_runtime *rt, int padding_idx);

/* Gradients are reduced over n ranks as fairseq's FSDP does (FAIRSEQ_SPEC.md
 * §5.4): divided by *pre before the sum and by *post after it, pre * post = n,
 * pre the smallest power of two with pre >= n / pre (8 ranks: 4 and 2), so the
 * result is the mean and an fp16 sum stays in range. */
void moe_reduce_factors(int n, double *pre, double *post);

/* The communicator's overlapping collectives (ABI 1.1) with their defaults
 * for a communicator that lacks them (ABI 1.0): the blocking all_gather or
 * reduce_scatter, *req = NULL, and a wait that has nothing to wait for. */
moe_status moe_comm_start_all_gather(const moe_comm_ops *o, moe_comm *c, moe_group *g, void *recv, const void *send,
                                     int64_t n, moe_dtype dt, moe_comm_req **req);
moe_status moe_comm_start_reduce_scatter(const moe_comm_ops *o, moe_comm *c, moe_group *g, void *recv,
                                         const void *send, int64_t n, moe_dtype dt, moe_reduce_op op,
                                         moe_comm_req **req);
moe_status moe_comm_wait(const moe_comm_ops *o, moe_comm *c, moe_comm_req *req);

/* ---- parameter store ----
 * Units are registered by the arch through host->unit_add/param_add. A unit's
 * tensors are consecutive in its flat buffer, in registration order. */
/* With --ddp-backend fully_sharded over W > 1 ranks, a non-expert unit is
 * padded to W equal shards; rank r owns elements [r*shard, (r+1)*shard) and
 * keeps only those between updates: its parameters (param_shard), its
 * gradient (grad_shard, summed over micro-batches and ranks), its fp32 master
 * and its optimizer state. The whole parameters exist only between
 * host->unit_gather and unit_release (all-gathered, then freed), and so does
 * the whole gradient, which the release reduce-scatters into grad_shard
 * (left in flight until the next release or moe_runtime_finish_reductions):
 * ZeRO stage 3, as fairseq's FSDP. Expert units are never sharded. */
typedef struct moe_unit_info {
    const char *name;
    int expert_index;        /* global expert id, -1 for non-expert units */
    int64_t numel;
    int64_t padded;          /* elements of the whole param and grad */
    int64_t shard;           /* elements this rank updates (== numel unless sharded) */
    int sharded;
    int64_t start;           /* first element of the padded unit this rank holds: rank * shard when sharded, else 0 */
    void *param;             /* act_dtype, padded; sharded: NULL unless gathered */
    void *grad;              /* grad_dtype, padded; sharded: NULL unless gathered and written */
    void *master;            /* fp32 master copy of this rank's shard, or NULL */
    void *param_shard;       /* act_dtype (shard), sharded units only */
    void *grad_shard;        /* grad_dtype (shard), sharded units only */
} moe_unit_info;

int moe_runtime_num_units(const moe_runtime *rt);
/* Also in a dry run: numel, padded, shard, sharded and start follow from the
 * registered tensors, the world and the ddp backend (the layout this rank
 * would allocate); the pointers are NULL until moe_runtime_alloc_params. */
void moe_runtime_unit(const moe_runtime *rt, int unit, moe_unit_info *out);

/* A registered tensor: a view of elements [offset, offset + numel) of its
 * unit's flat buffer (what a checkpoint's tensor table records). */
typedef struct moe_param_info {
    const char *name;
    int unit;
    int64_t offset, numel;
    int ndim;
    int64_t shape[2];
} moe_param_info;

/* Tensors in registration order (a unit's are consecutive). */
int moe_runtime_num_params(const moe_runtime *rt);
void moe_runtime_param(const moe_runtime *rt, int param, moe_param_info *out);
/* Counts over registered units (fairseq's two log lines). */
void moe_runtime_param_counts(const moe_runtime *rt, int64_t *non_expert, int64_t *expert);
/* Allocate param/grad/master buffers and initialise every tensor from its
 * moe_param_def with the counter-based RNG (stream = hash of the tensor name,
 * seed = --seed, or fairseq's per-expert seed for expert units). */
moe_status moe_runtime_alloc_params(moe_runtime *rt);
moe_status moe_runtime_zero_grads(moe_runtime *rt);
/* Complete the gradient reduce-scatter a unit_release left in flight: call
 * before reading grad_shard (the trainer, after the last backward). */
moe_status moe_runtime_finish_reductions(moe_runtime *rt);

/* For tests: parse `args` (argv-style without argv[0]) leniently, open the
 * registry on the build tree, and create a cpu runtime in fp32 (or as the
 * args say: --fp16, --bf16, --memory-efficient-fp16), on one process (or the
 * communicator --distributed-backend names, with --ddp-backend). */
moe_status moe_runtime_create_for_test(int nargs, const char *const *args, moe_runtime **out);

#endif
