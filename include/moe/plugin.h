/* plugin.h: the plugin ABI. Everything a plugin author needs besides ops.h.
 *
 * A plugin is a shared object libmoe-<kind>-<name>.so that exports exactly one
 * symbol, moe_plugin_descriptor (MOE_PLUGIN_SYMBOL), returning a const
 * descriptor: ABI version, struct sizes, kind, name, version, description, the
 * command-line options it adds (fairseq's add_args), lifecycle functions and a
 * pointer to its kind's function table. Everything else in the .so is hidden.
 *
 * Plugins see the core only through moe_host, handed to every entry point.
 * A plugin never links the core, CUDA, NCCL or MPI unless it is the backend or
 * communicator that wraps them.
 *
 * ABI versions. MOE_ABI_MAJOR.MOE_ABI_MINOR names the layout of every struct
 * here and in ops.h (tests/test_abi.c pins each size and offset, so a layout
 * change that is not recorded fails the build). Appending a member at the end
 * of a struct bumps the minor and is listed below under that minor; any other
 * change (a member removed, moved, retyped or inserted) bumps the major.
 *
 * What the core accepts: the same major and a minor not newer than its own.
 * The descriptor, the kind's ops table and the backend's moe_ops each carry
 * the size they were built with (desc_size, ops_size, moe_backend_ops.ops_size);
 * a size smaller than the core's, as long as it covers every member of the
 * major's first minor (x.0), is copied into a zero-filled table of the core's
 * size, so members the plugin's headers lacked read as NULL/0; a larger size
 * (a plugin newer than the core) is refused, naming both versions. host_size
 * follows the same bounds: moe_host is the core's, and a plugin of an older
 * minor reads only the members it knows. Every member after x.0 is optional,
 * and its comment says what its absence means. Structs without a size (the
 * argument structs plugins hand each other, moe_option entries) are read as
 * their reader was built: a member appended to one reaches a reader only from
 * a writer of the same minor or newer.
 *
 * Members by minor (1.0 is the layout as it stood when 1.1 was declared):
 *  1.1  moe_comm_ops: all_gather_start, reduce_scatter_start, wait;
 *       moe_host: unit_prefetch.
 *  1.2  moe_host: expert_grad_scale; moe_optimizer_ops: state_bytes,
 *       save_state, load_state (these first appeared under 1.1 after 1.1 was
 *       declared); moe_task_ops: set_epoch, max_batch.
 *  1.3  (appeared under 1.2 after 1.2 was declared, and ops_size)
 *       moe_host: padding_idx; moe_optimizer_ops: state_layout (and the
 *       struct moe_opt_state_layout); moe_arch_ops: decode_setup,
 *       decode_step, decode_reset; moe_backend_ops: timer_mark,
 *       timer_elapsed_ms, timer_free, ops_size; moe_ops: embedding_at_forward
 *       through graph_destroy; moe_route_args: noise_index; the option type
 *       MOE_OPT_FLOATS; the structs moe_rowlinear_desc, moe_gate_topk_args,
 *       moe_expert_ffn_args.
 *  1.4  moe_host: plan, plan_experts (and the struct moe_parallel_plan);
 *       moe_gate_ops: log_fields, update, state; moe_route_args: topk
 *       through gate_metrics (the top-k router's fields), expert_choice; moe_ops:
 *       dispatch_wide_forward through combine_wide_backward; moe_fwd_out:
 *       gate_metrics; moe_arch_ops: moe_gate.
 *  1.5  moe_ops: expert_rows, grouped_matmul (and the struct
 *       moe_grouped_matmul_args).
 *  1.6  moe_backend_ops: side_stream; moe_host: unit_grad_ready;
 *       moe_optimizer_ops: step_range.
 */
#ifndef MOE_PLUGIN_H
#define MOE_PLUGIN_H

#include <stdarg.h>
#include <stdint.h>

#include "moe/ops.h"
#include "moe/status.h"
#include "moe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_ABI_MAJOR 1
#define MOE_ABI_MINOR 6
#define MOE_PLUGIN_SYMBOL "moe_plugin_descriptor"

#if defined(__GNUC__)
#define MOE_EXPORT __attribute__((visibility("default")))
#else
#define MOE_EXPORT
#endif

typedef enum moe_plugin_kind {
    MOE_KIND_ARCH = 0,
    MOE_KIND_TASK,
    MOE_KIND_CRITERION,
    MOE_KIND_OPTIMIZER,
    MOE_KIND_LR_SCHEDULER,
    MOE_KIND_GATE,
    MOE_KIND_NORMALIZER,   /* expert-gradient normalizer (--moe-normalize-expert-grad) */
    MOE_KIND_BACKEND,
    MOE_KIND_COMMUNICATOR,
    MOE_KIND_COUNT
} moe_plugin_kind;

/* ------------------------------------------------------------------ options */

typedef enum moe_opt_type {
    MOE_OPT_FLAG = 0,  /* present or not; no value */
    MOE_OPT_INT,
    MOE_OPT_FLOAT,
    MOE_OPT_STRING,
    MOE_OPT_CHOICE,    /* one of `choices`, "a|b|c" */
    MOE_OPT_FLOATS     /* (ABI 1.3) a list of numbers, "(0.9, 0.98)" or "0.9,0.98" (read with
                        * host->opt_floats): each finite and, when min < max, in [min, max];
                        * `choices`, when set, is the count required ("2") */
} moe_opt_type;

/* One command-line option: --<name> (dashes, as fairseq). A NULL default means
 * "None" (unset). min/max bound INT, FLOAT and FLOATS values when min < max;
 * FLOAT and FLOATS values are finite (nan and inf are refused). */
typedef struct moe_option {
    const char *name;
    moe_opt_type type;
    const char *default_value;
    const char *help;
    double min, max;
    const char *choices;
} moe_option;

/* ---------------------------------------------------------------- logging */

typedef enum moe_log_level {
    MOE_LOG_DEBUG = 0,
    MOE_LOG_INFO,
    MOE_LOG_WARNING,
    MOE_LOG_ERROR
} moe_log_level;

/* -------------------------------------------------------------- parameters */

typedef enum moe_init_kind {
    MOE_INIT_ZERO = 0,
    MOE_INIT_ONE,
    MOE_INIT_UNIFORM,  /* U(-a, a) */
    MOE_INIT_NORMAL    /* N(0, a) */
} moe_init_kind;

/* A tensor to register: a view into its unit's flat buffer. */
typedef struct moe_param_def {
    const char *name;          /* "layers.3.self_attn.q_proj.weight" */
    int ndim;
    int64_t shape[2];
    moe_init_kind init;
    float a;                   /* bound (uniform) or std (normal) */
    int64_t zero_row;          /* row set to zero after init (padding_idx), or -1 */
} moe_param_def;

/* ------------------------------------------------------- backend and comm */

typedef struct moe_mem_stats {
    uint64_t allocated, peak_allocated;   /* bytes handed out by the allocator */
    uint64_t reserved, peak_reserved;     /* bytes held from the device */
    uint64_t total;                       /* device capacity (0 if unknown) */
} moe_mem_stats;

struct moe_host;

/* Kind MOE_KIND_BACKEND: a compute device, its memory and its ops table. */
typedef struct moe_backend_ops {
    /* device_id < 0: the default device. */
    moe_status (*create)(const struct moe_host *h, int device_id, moe_ctx **ctx);
    void (*destroy)(moe_ctx *ctx);
    /* how many devices this backend can use here (visible GPUs; 1 for the
     * cpu); 0 means it cannot run on this machine */
    int (*available)(void);
    /* `what` names the allocation in the out-of-memory message. */
    moe_status (*alloc)(moe_ctx *ctx, uint64_t bytes, const char *what, void **ptr);
    void (*free)(moe_ctx *ctx, void *ptr);
    moe_status (*copy_to_host)(moe_ctx *ctx, void *host_dst, const void *src, uint64_t bytes);
    moe_status (*copy_from_host)(moe_ctx *ctx, void *dst, const void *host_src, uint64_t bytes);
    moe_status (*copy)(moe_ctx *ctx, void *dst, const void *src, uint64_t bytes);
    moe_status (*synchronize)(moe_ctx *ctx);
    void (*memory_stats)(moe_ctx *ctx, moe_mem_stats *out);
    void (*reset_peak)(moe_ctx *ctx);
    const moe_ops *ops;
    /* the native stream work is queued on (cudaStream_t for cuda, NULL for
     * cpu), so a communicator can order its collectives after the compute */
    void *(*native_stream)(moe_ctx *ctx);
    /* (ABI 1.3) device timers, for --profile: timer_mark queues a marker on
     * the compute stream after the work queued so far and returns it;
     * timer_elapsed_ms waits until both markers have passed and gives the
     * milliseconds between them; timer_free releases a marker. All three
     * NULL on a backend whose ops run synchronously on the host (cpu): the
     * profiler then measures wall time. */
    moe_status (*timer_mark)(moe_ctx *ctx, void **mark);
    moe_status (*timer_elapsed_ms)(moe_ctx *ctx, const void *from, const void *to, double *ms);
    void (*timer_free)(moe_ctx *ctx, void *mark);
    /* (ABI 1.3) sizeof(moe_ops) as the backend was built: the core copies
     * that much of *ops into a zero-filled table of its own size, so ops the
     * backend's headers lacked are NULL (unsupported: whoever needs one says
     * so). 0 (a backend of an older minor): the 1.0 ops, through sgd_step. */
    uint32_t ops_size;
    /* (ABI 1.6) a second queue for work that may run beside the compute
     * (--optimizer-overlap steps finished units there during the backward):
     * MOE_SIDE_FORK makes it wait for the compute queued so far and sends
     * the ops that follow to it; MOE_SIDE_BACK sends them to the compute
     * stream again (the side work goes on); MOE_SIDE_JOIN makes the compute
     * stream wait for everything queued on the side. Work on the side must
     * not allocate, free or use the context's scratch. NULL on a backend
     * whose ops run synchronously (cpu): the core then queues in order. */
    moe_status (*side_stream)(moe_ctx *ctx, int phase);
} moe_backend_ops;

#define MOE_SIDE_FORK 0
#define MOE_SIDE_BACK 1
#define MOE_SIDE_JOIN 2

typedef enum moe_reduce_op { MOE_REDUCE_SUM = 0, MOE_REDUCE_MAX } moe_reduce_op;

typedef struct moe_comm moe_comm;   /* a communicator instance, opaque */
typedef struct moe_group moe_group; /* a subgroup of ranks; NULL = all ranks */
typedef struct moe_comm_req moe_comm_req; /* a collective in flight */

/* Kind MOE_KIND_COMMUNICATOR. Buffers are backend memory of the active backend.
 * Collectives are issued in the same order on every rank of the group. */
typedef struct moe_comm_ops {
    moe_status (*init)(const struct moe_host *h, moe_comm **comm);
    void (*destroy)(moe_comm *comm);
    int (*rank)(const moe_comm *comm);
    int (*world)(const moe_comm *comm);
    /* A group of `n` ranks listed in `ranks`; every rank calls it with the same
     * lists in the same order (ranks not in the list get *g = NULL). */
    moe_status (*group_create)(moe_comm *comm, const int *ranks, int n, moe_group **g);
    moe_status (*all_reduce)(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt, moe_reduce_op op);
    /* recv(n) = reduce of chunk `rank` of every send(n * group size) */
    moe_status (*reduce_scatter)(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                 moe_dtype dt, moe_reduce_op op);
    /* recv(n * group size) = concatenation of every rank's send(n) */
    moe_status (*all_gather)(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt);
    /* equal splits: chunk i of send (n elements) goes to rank i; recv chunk i came from rank i */
    moe_status (*all_to_all)(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt);
    /* variable splits, counts and displacements in elements */
    moe_status (*all_to_allv)(moe_comm *comm, moe_group *g, void *recv, const int64_t *recv_counts,
                              const int64_t *recv_displs, const void *send, const int64_t *send_counts,
                              const int64_t *send_displs, moe_dtype dt);
    moe_status (*broadcast)(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt, int root);
    moe_status (*barrier)(moe_comm *comm, moe_group *g);
    /* (ABI 1.1) all_gather and reduce_scatter that overlap what the caller
     * queues next: they read `send` as the compute queued so far leaves it,
     * and `recv` holds the result only once wait(req) has returned (on a GPU:
     * once the compute stream has been made to wait for it; no host block).
     * Until then neither buffer may be touched or freed. *req may be NULL when
     * it already completed; every non-NULL request is waited for exactly once.
     * All three may be NULL (a communicator of ABI 1.0): the core then runs
     * the blocking all_gather / reduce_scatter instead; wait is needed when
     * either start op is set. */
    moe_status (*all_gather_start)(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                   moe_dtype dt, moe_comm_req **req);
    moe_status (*reduce_scatter_start)(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                       moe_dtype dt, moe_reduce_op op, moe_comm_req **req);
    moe_status (*wait)(moe_comm *comm, moe_comm_req *req);
} moe_comm_ops;

/* ------------------------------------------------------------- host services */

/* (ABI 1.4) The parallel plan: where experts live and which groups their
 * tokens and gradients travel in (FAIRSEQ_SPEC.md §2.4, §2.9), and how
 * non-expert units are sharded (§7.2). The core builds it once, from the
 * world, the ddp backend and the expert count the arch declares
 * (host->plan_experts); everything that needs the layout reads it here.
 *   E >= world: rank r holds experts r*E/world .. (r+1)*E/world - 1 and
 *     exchanges tokens with every rank; no replicas.
 *   E < world (world a multiple of E): rank r holds expert r mod E; the
 *     all-to-all groups are the contiguous blocks of E ranks, the replicas of
 *     expert i are ranks i, i+E, i+2E, ... */
typedef struct moe_parallel_plan {
    int world, rank;
    int experts;              /* E, global experts per MoE layer; 0 until the arch declares MoE layers */
    int local_experts;        /* experts this rank holds */
    const int *local_ids;     /* their global ids, ascending (local_experts of them) */
    int a2a_world;            /* ranks in this rank's all-to-all group */
    moe_group *a2a_group;     /* that group; NULL: all ranks (or no communicator) */
    int replicas;             /* ranks holding each expert (world / E when E < world, else 1) */
    moe_group *replica_group; /* the ranks holding this rank's expert; NULL when replicas == 1 */
    int fully_sharded;        /* --ddp-backend fully_sharded */
    int shards;               /* ranks a non-expert unit is split over (world when fully sharded, else 1) */
    float expert_grad_scale;  /* 1/N of --moe-normalize-expert-grad (§2.9); 1 when nothing trains */
} moe_parallel_plan;

/* Everything of the core a plugin may use. Valid for the plugin's lifetime. */
typedef struct moe_host {
    uint32_t size;  /* sizeof(moe_host) as the core was built */

    /* logging: one line, fairseq format, `component` as fairseq's logger name */
    void (*log)(const struct moe_host *h, moe_log_level level, const char *component, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 4, 5)))
#endif
        ;
    /* record a one-line error message and return `st` (for `return h->error(...)`) */
    moe_status (*error)(const struct moe_host *h, moe_status st, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 3, 4)))
#endif
        ;

    /* options: every option of the core and the loaded plugins, by name without
     * dashes ("moe-expert-count"). opt_set: 1 if given or has a default. */
    int (*opt_set)(const struct moe_host *h, const char *name);
    int64_t (*opt_int)(const struct moe_host *h, const char *name);
    double (*opt_float)(const struct moe_host *h, const char *name);
    int (*opt_flag)(const struct moe_host *h, const char *name);
    const char *(*opt_str)(const struct moe_host *h, const char *name); /* NULL if None */
    /* a list of numbers ("0.0005,0.0003", "(0.9, 0.98)"): writes up to `max`
     * values and returns how many the list has; a malformed list (or more than
     * `max`) records an error naming the option and returns -1 */
    int (*opt_floats)(const struct moe_host *h, const char *name, double *out, int max);

    /* compute: the active backend, its context and ops */
    const moe_backend_ops *backend;
    moe_ctx *ctx;
    const moe_ops *ops;
    moe_dtype act_dtype;       /* activations and compute parameters: fp32, fp16 or bf16 */
    moe_dtype grad_dtype;      /* gradients of parameters */

    /* parameters: register a unit (a flat buffer: one FSDP unit), then its
     * tensors; ids are returned. expert_index: global expert id for an expert
     * unit (its initialisation seed follows FAIRSEQ_SPEC.md §1.6), -1 otherwise.
     * Data pointers are valid after the core has allocated (arch->setup). */
    moe_status (*unit_add)(const struct moe_host *h, const char *name, int expert_index, int *unit_id);
    moe_status (*param_add)(const struct moe_host *h, int unit_id, const moe_param_def *def, int *param_id);
    void *(*param_data)(const struct moe_host *h, int param_id);
    void *(*grad_data)(const struct moe_host *h, int param_id);
    void *(*unit_data)(const struct moe_host *h, int unit_id);  /* the unit's flat param buffer */
    void *(*unit_grad)(const struct moe_host *h, int unit_id);
    /* --ddp-backend fully_sharded over several ranks: a non-expert unit's whole
     * parameters exist only between unit_gather (an all-gather of every rank's
     * shard) and the matching unit_release (which frees them); param_data,
     * grad_data, unit_data and unit_grad return NULL outside. Gathers nest (a
     * count): only the outermost pair communicates. The whole gradient is
     * allocated, zeroed, when grad_data/unit_grad first asks for it inside a
     * gather; the outermost release reduce-scatters it (mean over ranks) into
     * this rank's gradient shard and frees it. The arch brackets each layer's
     * forward, and its backward (with any recomputation), with them. Every rank
     * must gather and release in the same order. No-ops for expert units and
     * without fully_sharded. */
    moe_status (*unit_gather)(const struct moe_host *h, int unit_id);
    moe_status (*unit_release)(const struct moe_host *h, int unit_id);

    /* randomness: the run's --seed, and the per-update seed (seed + num_updates) */
    uint64_t seed;
    uint64_t (*step_seed)(const struct moe_host *h);

    /* distribution */
    int rank, world;
    const moe_comm_ops *comm_ops;
    moe_comm *comm;

    /* other components the arch drives (NULL until resolved) */
    const void *gate_ops;      /* const moe_gate_ops * */

    /* (ABI 1.1) fully_sharded: start gathering a unit the arch will gather
     * next, so the all-gather overlaps the compute queued meanwhile; the
     * unit_gather that follows waits for it instead of communicating. A hint:
     * a no-op where unit_gather is one, or when the unit is already gathered
     * or on its way. At most one unit should be on its way at a time. */
    moe_status (*unit_prefetch)(const struct moe_host *h, int unit_id);
    /* (ABI 1.2) what the arch multiplies each expert parameter's gradient
     * contribution by as it accumulates it: 1/N of --moe-normalize-expert-grad
     * (FAIRSEQ_SPEC.md §2.9), as fairseq's gradient hook does, so fp16
     * gradients hold the values fairseq's do. 1 on one rank. */
    float expert_grad_scale;
    /* (ABI 1.3) the task's padding index (fairseq's <pad> = 1 by default):
     * targets equal to it are not scored */
    int padding_idx;
    /* (ABI 1.4) the parallel plan (experts 0 until the arch declares them); absent in
     * a core older than 1.4, which an arch of 1.4 is never loaded into */
    const moe_parallel_plan *plan;
    /* (ABI 1.4) the arch declares its MoE layers' global expert count, once,
     * in build, before it registers expert units (which it takes from
     * plan->local_ids); on every rank in the same order, since the core
     * creates the plan's communication groups then. An expert count the
     * world cannot hold fails with one line. */
    moe_status (*plan_experts)(const struct moe_host *h, int experts, const moe_parallel_plan **plan);
    /* (ABI 1.6) the arch's backward has added every contribution of this
     * micro-batch to the unit's gradient (call it once per unit and backward,
     * after its last one); with --optimizer-overlap the core may then step the
     * unit's parameters while the backward goes on. An arch that never calls
     * it gets every unit stepped after its backward, as before. */
    moe_status (*unit_grad_ready)(const struct moe_host *h, int unit_id);
} moe_host;

/* --------------------------------------------------------- kind: data batch */

/* One micro-batch on the host, as a task produces it. Rows are right-padded
 * with the padding index (targets too: pad targets are not scored). A batch
 * with ntokens == 0 is a dummy (fairseq's empty batch at the end of a rank's
 * shard): the trainer runs it so every rank takes part in the same
 * collectives, with zero weight and its statistics discarded. */
typedef struct moe_batch {
    int64_t B, T;
    int32_t *src;       /* (B,T) input tokens */
    int32_t *tgt;       /* (B,T) targets */
    int64_t ntokens;    /* non-pad targets */
    int64_t nsentences;
} moe_batch;

/* Kind MOE_KIND_TASK. */
typedef struct moe_task_ops {
    moe_status (*init)(const moe_host *h, void **task);
    void (*destroy)(void *task);
    int64_t (*vocab_size)(void *task);   /* dictionary size incl. specials and padding to 8 */
    int (*padding_idx)(void *task);
    /* batches of one epoch for this rank (fairseq's len(itr)) */
    int64_t (*num_batches)(void *task, const char *split);
    /* the index-th batch of `split` ("train", "valid"); `b` owns host arrays
     * the task allocated; free with free_batch. */
    moe_status (*get_batch)(void *task, const char *split, int64_t index, moe_batch *b);
    void (*free_batch)(void *task, moe_batch *b);
    /* (ABI 1.2) the training epoch (1-based) that num_batches("train") and
     * get_batch("train") follow from now on: the trainer calls it before the
     * first batch of every epoch, and when it resumes one. A task whose
     * batches do not depend on the epoch may leave it NULL. */
    moe_status (*set_epoch)(void *task, int64_t epoch);
    /* (ABI 1.2) a bound on every batch get_batch can return on this rank,
     * any split: *max_tokens >= B*T and *max_len >= T. The arch is set up for
     * it. NULL: the first train batch (and first batch of each validation
     * subset) gives the shape. */
    moe_status (*max_batch)(void *task, int64_t *max_tokens, int64_t *max_len);
} moe_task_ops;

/* ------------------------------------------------------------- kind: arch */

/* What one forward pass leaves for the criterion (all backend memory). */
typedef struct moe_fwd_out {
    void *logits;          /* (N,V) act dtype; the criterion overwrites it with dlogits */
    int64_t N, V;
    int n_moe_layers;
    float *l_aux;          /* (n_moe_layers) fp32 */
    float *metrics;        /* (n_moe_layers, MOE_NUM_METRICS) fp32 */
    /* (ABI 1.4) (n_moe_layers, MOE_NUM_GATE_METRICS) fp32: what each MoE
     * layer's gate wrote for its log_fields (zeros for fields it lacks), or
     * NULL (an arch of an older minor: the gate's fields are not logged) */
    float *gate_metrics;
} moe_fwd_out;

typedef struct moe_model_info {
    int64_t num_layers, embed_dim, ffn_dim, heads, num_moe_layers, experts, local_experts;
    double flops_per_token;      /* training (forward + backward) model FLOPs per token */
} moe_model_info;

/* Kind MOE_KIND_ARCH. */
typedef struct moe_arch_ops {
    /* Read options, register every parameter (no allocation). vocab from the task. */
    moe_status (*build)(const moe_host *h, int64_t vocab, int padding_idx, void **model);
    void (*destroy)(void *model);
    void (*info)(void *model, int64_t tokens_per_sample, moe_model_info *out);
    /* After parameters are allocated and initialised: allocate activations for
     * micro-batches of up to B x T tokens. */
    moe_status (*setup)(void *model, int64_t B, int64_t T);
    /* tokens, targets: (B,T) backend i32. train: dropout on, training capacity.
     * micro: index of the micro-batch within the update (dropout stream). */
    moe_status (*forward)(void *model, const int32_t *tokens, int64_t B, int64_t T, int train, int micro,
                          moe_fwd_out *out);
    /* After the criterion has turned out->logits into dlogits: accumulate
     * parameter gradients. dl_aux: d loss / d l_aux of each MoE layer. */
    moe_status (*backward)(void *model, float dl_aux);

    /* (ABI 1.3) Incremental decoding (moelm-generate), in eval mode: no
     * dropout, gates configured with train = 0 (capacity from
     * --moe-eval-capacity-token-fraction). Parameters must be allocated;
     * setup() is not needed. Runs on one rank holding every expert.
     * decode_setup: a K/V cache for B rows of up to max_len positions each,
     * and scratch for steps of up to max_step tokens per row; all rows start
     * empty. Calling it again replaces both. flags: MOE_DECODE_*. All three
     * NULL: the arch does not decode (moelm-generate says so). */
    moe_status (*decode_setup)(void *model, int64_t B, int64_t max_len, int64_t max_step, unsigned flags);
    /* Feeds n_new[b] <= n tokens to row b (tokens: host (B,n) i32, row b's
     * first n_new[b] entries; n_new: host (B)), at the positions after the
     * row's cached ones, attending to them and to each other causally; the
     * row's cache grows by n_new[b]. *logits (backend fp32, valid until the
     * next call): (B,V), row b the logits after its last fed token
     * (unspecified where n_new[b] == 0), or with all_positions (B*n,V), row
     * b*n + j after fed token j. A prompt can be fed whole or in pieces, then
     * one token per step: each token's logits are those arch->forward gives
     * for it over the whole sequence, whatever the other rows hold. */
    moe_status (*decode_step)(void *model, const int32_t *tokens, const int32_t *n_new, int64_t n,
                              int all_positions, const float **logits);
    /* Every row back to empty (a new batch of prompts). */
    moe_status (*decode_reset)(void *model);
    /* (ABI 1.4) the gate instance (moe_gate_ops' `gate`) of MoE layer j,
     * 0 <= j < num_moe_layers, after build once host->gate_ops is set (the
     * arch makes its gates then if it has not yet); NULL otherwise. The core calls the gate's update once per update
     * and saves and restores its state in checkpoints through it. NULL (an
     * arch of an older minor): the core reaches no gate, so no gate update
     * runs and no gate state is saved; it warns once when the gate has an
     * update. */
    void *(*moe_gate)(void *model, int j);
} moe_arch_ops;

/* decode_setup flags */
#define MOE_DECODE_NO_GRAPH 1u /* never record steps into a backend graph (debugging, timing) */

/* ------------------------------------------------------------- kind: gate */

/* Kind MOE_KIND_GATE: turns gate logits into a routing (calls ops->route_*).
 * One gate instance per MoE layer (init once per layer). */
typedef struct moe_gate_ops {
    moe_status (*init)(const moe_host *h, int num_experts, void **gate);
    void (*destroy)(void *gate);
    /* Fill the policy fields of `a` (k, policy, capacity, flags) for S tokens. */
    moe_status (*configure)(void *gate, int64_t S, int train, moe_route_args *a);
    moe_status (*forward)(void *gate, const moe_route_args *a);
    moe_status (*backward)(void *gate, const moe_route_args *a, const float *dweight, float dl_aux,
                           float *dlogits);
    /* (ABI 1.4) the log fields the gate adds: NULL-terminated names, name i
     * for entry i of a->gate_metrics (ops.h's MOE_GATE_METRIC_* order), which
     * forward writes when the caller passes the buffer; NULL for none. They
     * log per MoE layer as the routing metrics do (averaged over layers). */
    const char *const *log_fields;
    /* (ABI 1.4) once per update on every rank, in the same order, after the
     * update's forward and backward passes (before the next forward): the
     * aux-loss-free expert-bias update from the training loads routed since
     * the last call. NULL, or a no-op, for gates without one. */
    moe_status (*update)(void *gate);
    /* (ABI 1.4) the state a checkpoint keeps for this gate (the expert bias):
     * a backend fp32 buffer of *n values the caller may read or overwrite
     * between updates, or NULL with *n = 0. NULL for gates without state. */
    float *(*state)(void *gate, int64_t *n);
} moe_gate_ops;

/* -------------------------------------------------------- kind: criterion */

/* Logging statistics, summed over micro-batches and ranks (fp64 on the host).
 * The criterion accumulates them in a device fp32 array of MOE_STAT_COUNT. */
enum {
    MOE_STAT_LOSS = 0,        /* inner_loss + w * moe_loss */
    MOE_STAT_INNER_LOSS,      /* sum of token NLL, nats */
    MOE_STAT_MOE_LOSS,        /* sample_size * combined l_aux (unweighted) */
    MOE_STAT_METRICS,         /* MOE_NUM_METRICS entries: per-micro-batch averages over layers */
    MOE_STAT_COUNT = MOE_STAT_METRICS + MOE_NUM_METRICS
};

typedef struct moe_crit_in {
    moe_fwd_out *fwd;
    const int32_t *targets;   /* (N) backend */
    int64_t sample_size;      /* ntokens */
    float grad_scale;         /* loss scale; 0: no backward (validation) */
    float *stats;             /* (MOE_STAT_COUNT) device accumulators */
    float *scratch;           /* (N) fp32 backend scratch */
} moe_crit_in;

/* Kind MOE_KIND_CRITERION. */
typedef struct moe_criterion_ops {
    moe_status (*init)(const moe_host *h, void **crit);
    void (*destroy)(void *crit);
    /* Loss, logging stats and (grad_scale != 0) dlogits in place; returns
     * dl_aux for arch->backward. */
    moe_status (*compute)(void *crit, const moe_crit_in *in, float *dl_aux);
} moe_criterion_ops;

/* -------------------------------------------------------- kind: optimizer */

/* One tensor the optimizer updates (a flat unit, a shard of one, or one expert:
 * the granularity of fp16 moment scales, FAIRSEQ_SPEC.md §5.2). */
typedef struct moe_opt_tensor {
    void *param; moe_dtype param_dtype;       /* what the optimizer updates */
    void *param_copy; moe_dtype copy_dtype;   /* compute copy to refresh, or NULL */
    const void *grad; moe_dtype grad_dtype;
    int64_t n;
} moe_opt_tensor;

/* (ABI 1.3) The layout of an optimizer's state byte string: for each tensor
 * i of init, in order, `fields` arrays of n_i elements, array f of dtype
 * field_dtype[f]; then, after every tensor's arrays, `scalars` fp32 values per
 * tensor, tensor-major (tensor 0's, then tensor 1's, ...). A stored element of
 * field f means value * scalar[field_scale[f]] of its tensor when
 * field_scale[f] >= 0 (fp16 moments with a dynamic scale), itself when -1.
 * Elements belong to the parameter element of the same index, so the state
 * of any element range can be cut out and put together again. */
#define MOE_OPT_MAX_FIELDS 4
#define MOE_OPT_MAX_SCALARS 4
typedef struct moe_opt_state_layout {
    int fields;
    moe_dtype field_dtype[MOE_OPT_MAX_FIELDS];
    int field_scale[MOE_OPT_MAX_FIELDS];
    const char *field_name[MOE_OPT_MAX_FIELDS];   /* "exp_avg" (torch's state names) */
    int scalars;
    const char *scalar_name[MOE_OPT_MAX_SCALARS];
} moe_opt_state_layout;

/* Kind MOE_KIND_OPTIMIZER. */
typedef struct moe_optimizer_ops {
    moe_status (*init)(const moe_host *h, const moe_opt_tensor *tensors, int n, void **opt);
    void (*destroy)(void *opt);
    /* grads are divided by grad_scale; step counts successful updates from 1 */
    moe_status (*step)(void *opt, double lr, double grad_scale, int64_t step);
    /* bytes of optimizer state per parameter element (for --dry-run) */
    double (*state_bytes_per_param)(const moe_host *h);
    /* (ABI 1.2) checkpoints: the optimizer's state (moments, scales, buffers)
     * as one byte string of state_bytes(opt) bytes, in an order the plugin
     * fixes (its own tensors in init order). save_state copies the bytes
     * [offset, offset + bytes) of it to host memory, load_state overwrites
     * them from host memory, so the core streams the state through a bounded
     * host buffer in chunks. Little-endian as the host's memory; the core
     * adds the header and checksum. All three may be NULL (no state to save:
     * a resumed run then starts the optimizer afresh, with a warning). */
    uint64_t (*state_bytes)(void *opt);
    moe_status (*save_state)(void *opt, uint64_t offset, void *host, uint64_t bytes);
    moe_status (*load_state)(void *opt, uint64_t offset, const void *host, uint64_t bytes);
    /* (ABI 1.3) what the bytes of save_state are, so a checkpoint can be cut
     * at other tensor boundaries (another world size, another sharding):
     * see moe_opt_state_layout. May be NULL: the state is then opaque and a
     * checkpoint resumes it only where every tensor is the one it was. */
    void (*state_layout)(void *opt, moe_opt_state_layout *out);
    /* (ABI 1.6) step only the tensors first .. first + count - 1 (init
     * order), as step does them: stepping every tensor once this way, in any
     * order and groups, is step. NULL: no --optimizer-overlap. */
    moe_status (*step_range)(void *opt, double lr, double grad_scale, int64_t step, int first, int count);
} moe_optimizer_ops;

/* ---------------------------------------------------- kind: lr_scheduler */

/* Kind MOE_KIND_LR_SCHEDULER. */
typedef struct moe_lr_scheduler_ops {
    moe_status (*init)(const moe_host *h, void **sched);
    void (*destroy)(void *sched);
    /* LR to use after num_updates successful updates (fairseq's step_update) */
    double (*lr_at)(void *sched, int64_t num_updates);
} moe_lr_scheduler_ops;

/* ---------------------------------------------------- kind: normalizer */

/* Kind MOE_KIND_NORMALIZER: expert gradients are divided by the returned value
 * (FAIRSEQ_SPEC.md §2.9); num_experts = data-parallel world / expert group size. */
typedef struct moe_normalizer_ops {
    double (*divisor)(int num_experts);
} moe_normalizer_ops;

/* ------------------------------------------------------------ descriptor */

typedef struct moe_plugin_desc {
    uint32_t abi_major, abi_minor;
    uint32_t desc_size;            /* sizeof(moe_plugin_desc) */
    uint32_t host_size;            /* sizeof(moe_host) */
    uint32_t ops_size;             /* sizeof the kind's table */
    moe_plugin_kind kind;
    const char *name;              /* the CLI value: "moe_cross_entropy" */
    const char *version;
    const char *description;
    const moe_option *options;     /* may be NULL */
    int n_options;
    /* lifecycle: called once after loading / before exit; both optional */
    moe_status (*load)(const moe_host *h);
    void (*unload)(void);
    const void *ops;               /* the kind's table, e.g. const moe_criterion_ops * */
} moe_plugin_desc;

typedef const moe_plugin_desc *(*moe_plugin_entry_fn)(void);

/* Defines the one exported entry point, e.g.
 *   MOE_PLUGIN_DEFINE(MOE_KIND_CRITERION, moe_criterion_ops, "cross_entropy", "1.0",
 *                     "token-level cross entropy", options, n_options, NULL, NULL, &ce_ops)
 * ops_size is taken from the kind's table type. */
#define MOE_PLUGIN_DEFINE(kind_, ops_type_, name_, version_, descr_, options_, n_options_, load_, unload_, ops_) \
    MOE_EXPORT const moe_plugin_desc *moe_plugin_descriptor(void);                                         \
    const moe_plugin_desc *moe_plugin_descriptor(void)                                                      \
    {                                                                                                       \
        static const moe_plugin_desc d = {                                                                  \
            MOE_ABI_MAJOR, MOE_ABI_MINOR, (uint32_t)sizeof(moe_plugin_desc), (uint32_t)sizeof(moe_host),     \
            (uint32_t)sizeof(ops_type_), (kind_), (name_), (version_), (descr_), (options_), (n_options_),  \
            (load_), (unload_), (ops_)};                                                                    \
        return &d;                                                                                          \
    }

#ifdef __cplusplus
}
#endif

#endif
