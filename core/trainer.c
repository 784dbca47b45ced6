/* trainer.c: the update loop of FAIRSEQ_SPEC.md §10 and the log lines of §8.
 *
 * Gradient convention, fairseq's (§5.4), so fp16 gradients hold the same
 * values and overflow alike: gradients are accumulated as sums over the tokens
 * of every micro-batch (times the loss scale); non-expert gradients are then
 * averaged over the ranks (pre- and post-divided around the sum, as FSDP), and
 * expert gradients averaged over their replicas (E < world; the groups are
 * the parallel plan's, core/plan.h), each expert contribution having been
 * multiplied by the normalizer's 1/N in the arch (host->expert_grad_scale,
 * the plan's, fairseq's gradient hook, §2.9). Everything else
 * (1/loss_scale, world/sample_size, clipping) is one lazy multiply factor
 * handed to the optimizer as grad_scale, as fairseq's multiply_factor.
 *
 * Host synchronisation: one copy of the statistics and the two squared norms
 * per update (the overflow decision needs them), none inside micro-batches.
 * --moe-dropless is checked on that copy too: any capacity overflow in the
 * summed routing metrics stops training, and only then are the update's
 * micro-batches routed again, observed on the host, to name the expert.
 */
#include "core/trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/meters.h"
#include "core/opwrap.h"
#include "core/profile.h"
#include "core/runctl.h"
#include "core/scaler.h"
#include "core/strbuf.h"
#include "core/tensorboard.h"

static const char *const metric_keys[MOE_NUM_METRICS] = {
    "overflow_expert1",       "overflow_expert2",      "entropy_gating",         "expert1_balance_top",
    "expert1_balance_bottom", "unused_expert1_count",  "expert2_balance_top",    "expert2_balance_bottom",
    "unused_expert2_count",   "all_to_all_cpu_time_ms", "all_to_all_cuda_time_ms"};

/* host copy of the per-update reductions: stats, the three squared norms,
 * then the gate's log fields (per micro-batch averages over the MoE layers,
 * summed as the criterion sums the routing metrics) */
enum {
    RED_NORM_DENSE = MOE_STAT_COUNT,
    RED_NORM_EXPERT,
    RED_NORM_SHARDED,
    RED_GATE,
    RED_COUNT = RED_GATE + MOE_NUM_GATE_METRICS
};

/* what is summed over the ranks in fp64: the statistics, then this rank's
 * token, sentence and (non-dummy) batch counts, whether a signal asked
 * this rank to stop (so the ranks agree on the update to stop after), and
 * the gate's log fields */
enum {
    SUM_NTOKENS = MOE_STAT_COUNT,
    SUM_NSENTENCES,
    SUM_BATCHES,
    SUM_STOP,
    SUM_GATE,
    SUM_COUNT = SUM_GATE + MOE_NUM_GATE_METRICS
};

typedef struct trainer {
    moe_runtime *rt;
    const moe_host *h;
    const moe_components *c;
    moe_opts *o;
    int64_t Nmax, Tmax;       /* the largest batch the task can produce: B*T tokens, T */
    int update_freq;
    int64_t max_update, max_epoch, max_valid_steps;
    int log_interval, validate_interval_updates, disable_validation;
    double clip_norm;
    int log_moe;              /* the criterion logs MoE metrics and inner_loss */
    int n_moe;                /* the model's MoE layers */
    const moe_gate_ops *gate; /* their gate plugin (NULL without MoE layers) */
    int gate_fields;          /* the gate's log fields (at most MOE_NUM_GATE_METRICS) */
    int dropless;             /* --moe-dropless: a capacity overflow is an error */
    moe_ckpt_buffer *gate_bufs; /* the gates' state, checkpointed */
    int n_gate_bufs;
    int loss_scaling;
    moe_scaler scaler;
    int32_t *tokens, *targets;/* device (B,T) */
    float *red;               /* device RED_COUNT */
    float *red_dummy;         /* device RED_COUNT: where a dummy batch's statistics go (discarded) */
    char **valid_subsets;     /* --valid-subset, split at commas */
    int n_valid;
    double *red64;            /* device SUM_COUNT: the statistics on their way across ranks */
    float *scratch;           /* device (B*T) fp32 */
    void *opt, *sched, *crit;
    moe_meters *inner, *epoch_m;
    double t0;                /* trainer construction time */
    int64_t num_updates;
    int64_t iter;             /* batches consumed in this epoch */
    int64_t batches_per_epoch;/* of the current epoch, on this rank */
    int epoch;
    double lr;
    double best_valid_loss;
    double valid_loss_now;    /* the validation loss of this update, NAN when it did not validate */
    int64_t saved_updates;    /* num_updates of the last checkpoint written or loaded (0 at a fresh start) */
    int64_t validated_at;     /* num_updates of the last validation, -1 before the first */
    double wall_pending;      /* train_wall of overflowed steps, counted with the next logged update */
    int stop_ranks;           /* ranks a stop signal reached, as of the last reduction */
    int preempted;            /* stopping for a signal: save checkpoint_last only */
    double patience_best;     /* --patience: the best validation loss so far (NaN before one) */
    int patience_runs;        /* validations since it last improved */
    /* --tensorboard-logdir */
    int tb_on;                /* asked for (every rank: the expert load is summed over them) */
    moe_tb *tb;               /* rank 0's writer, NULL elsewhere or after a write failed */
    int log_load;             /* --log-expert-load */
    int load_collect;         /* this update's forwards count their routing (logged, or in a logged interval) */
    int in_forward;           /* inside a training forward (not a recomputation, not validation) */
    int load_experts;         /* E of the routing seen */
    int load_n;               /* MoE layers seen, in order */
    const char **load_layer;  /* their unit names */
    double *load;             /* (load_n, E): tokens routed to each expert (every choice) */
    double *load_dropped;     /* (load_n, E): of those, dropped for capacity */
    int32_t *load_host;       /* host copy of one routing's expert and slot arrays */
    int64_t load_host_cap;
    /* --optimizer-overlap */
    int overlap;              /* asked for (and allowed) */
    int overlap_live;         /* inside a training backward: host->unit_grad_ready steps the unit */
    int overlap_side;         /* a step went to the backend's side stream this update */
    double overlap_scale;     /* the step's grad_scale: this micro-batch's tokens (1 with none) */
    int *unit_tensor;         /* per unit: its optimizer tensor (init order), or -1 */
    unsigned char *stepped;   /* per unit: stepped during this update's backward */
} trainer;

static moe_status dev_alloc(trainer *t, uint64_t bytes, const char *what, void **p)
{
    return t->h->backend->alloc(t->h->ctx, bytes, what, p);
}

/* --valid-subset "valid,valid1": the subsets validated, in order (the first
 * one's loss is the one best_loss and checkpoint_best follow) */
static moe_status split_subsets(trainer *t, const char *list)
{
    const char *p = list && *list ? list : "valid";
    int n = 1;
    for (const char *q = p; *q; q++)
        n += *q == ',';
    t->valid_subsets = calloc((size_t)n, sizeof *t->valid_subsets);
    if (!t->valid_subsets)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    while (*p) {
        size_t len = strcspn(p, ",");
        if (len == 0)
            return moe_error_set(MOE_ERR_INVALID_ARG, "--valid-subset '%s': expected comma-separated split names, "
                                                      "found an empty one",
                                 list);
        char *name = malloc(len + 1);
        if (!name)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        memcpy(name, p, len);
        name[len] = '\0';
        t->valid_subsets[t->n_valid++] = name;
        p += len;
        if (*p == ',')
            p++;
    }
    return MOE_OK;
}

/* the largest batch of any split this run reads: the task's bound, or the
 * shapes of the first batches for a task that gives none */
static moe_status batch_bound(trainer *t)
{
    const moe_task_ops *task = t->c->task;
    void *ts = t->c->task_state;
    if (task->set_epoch)
        MOE_TRY(task->set_epoch(ts, 1));
    if (task->max_batch) {
        MOE_TRY(task->max_batch(ts, &t->Nmax, &t->Tmax));
    } else {
        int n = t->disable_validation ? 1 : 1 + t->n_valid;
        for (int i = 0; i < n; i++) {
            moe_batch b;
            MOE_TRY(task->get_batch(ts, i == 0 ? "train" : t->valid_subsets[i - 1], 0, &b));
            if (b.B * b.T > t->Nmax)
                t->Nmax = b.B * b.T;
            if (b.T > t->Tmax)
                t->Tmax = b.T;
            task->free_batch(ts, &b);
        }
    }
    if (t->Nmax < 1 || t->Tmax < 1 || t->Tmax > t->Nmax)
        return moe_error_set(MOE_ERR_INTERNAL, "task: batches of at most %lld tokens and %lld per row make no sense",
                             (long long)t->Nmax, (long long)t->Tmax);
    return MOE_OK;
}

/* the epoch's batches: the task follows the epoch (shuffled order, data
 * shard), and the number of batches may change with it */
static moe_status begin_epoch(trainer *t)
{
    if (t->c->task->set_epoch)
        MOE_TRY(t->c->task->set_epoch(t->c->task_state, t->epoch));
    t->batches_per_epoch = t->c->task->num_batches(t->c->task_state, "train");
    if (t->batches_per_epoch < 0)
        return MOE_ERR_INVALID_ARG; /* the task set the message */
    if (t->batches_per_epoch == 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "the train split has no batches in epoch %d", t->epoch);
    return MOE_OK;
}

static void observe_route(void *ctx, const char *layer, const moe_route_args *a);

/* --optimizer-overlap: host->unit_grad_ready during a training backward
 * steps that unit's optimizer tensor with this update's lr and grad_scale,
 * on the backend's side stream; the units not stepped then are stepped after
 * the backward as usual. The same arithmetic on the same values as one step
 * after the backward, so only where it is exact: one process (no gradient
 * reduction after the backward), one micro-batch an update, no clipping and
 * no loss scaling (nothing that needs the whole gradient first). */
static moe_status overlap_grad_ready(void *ctx, int unit)
{
    trainer *t = ctx;
    if (!t->overlap_live || t->unit_tensor[unit] < 0 || t->stepped[unit])
        return MOE_OK;
    const moe_backend_ops *be = t->h->backend;
    if (be->side_stream)
        MOE_TRY(be->side_stream(t->h->ctx, MOE_SIDE_FORK));
    moe_status st = t->c->optimizer->step_range(t->opt, t->lr, t->overlap_scale, t->num_updates + 1,
                                                t->unit_tensor[unit], 1);
    if (be->side_stream) {
        moe_status back = be->side_stream(t->h->ctx, MOE_SIDE_BACK);
        t->overlap_side = 1;
        if (st == MOE_OK)
            st = back;
    }
    t->stepped[unit] = 1;
    return st;
}

static moe_status overlap_setup(trainer *t)
{
    const moe_host *h = t->h;
    if (!moe_opts_flag(t->o, "optimizer-overlap"))
        return MOE_OK;
    const char *why = h->world > 1                              ? "one process"
                      : t->update_freq != 1                     ? "--update-freq 1"
                      : t->clip_norm > 0                        ? "--clip-norm 0"
                      : t->loss_scaling                         ? "no loss scaling (--bf16 or fp32)"
                      : t->dropless                             ? "no --moe-dropless"
                      : !t->c->optimizer->step_range            ? "an optimizer with step_range (ABI 1.6)"
                                                                : NULL;
    const char *ddp = moe_opts_str(t->o, "ddp-backend");
    if (!why && ddp && strcmp(ddp, "fully_sharded") == 0)
        why = "a ddp backend other than fully_sharded";
    /* fp16 moments rescale through the backend's scratch, which the compute stream uses too */
    if (!why && moe_opts_known(t->o, "fp16-adam-stats") && moe_opts_flag(t->o, "fp16-adam-stats"))
        why = "fp32 Adam moments (no --fp16-adam-stats)";
    if (why)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--optimizer-overlap: expected %s (stepping a unit before the rest of the backward is "
                             "exact only then); drop the flag or the setting",
                             why);
    const int n = moe_runtime_num_units(t->rt);
    t->stepped = calloc((size_t)(n > 0 ? n : 1), 1);
    if (!t->stepped)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    t->overlap = 1;
    moe_runtime_set_grad_ready(t->rt, overlap_grad_ready, t);
    return MOE_OK;
}

/* the optimizer step of an update: every unit, or with --optimizer-overlap
 * those its backward did not step */
static moe_status optimizer_step(trainer *t, double grad_scale)
{
    if (!t->overlap)
        return t->c->optimizer->step(t->opt, t->lr, grad_scale, t->num_updates + 1);
    const int n = moe_runtime_num_units(t->rt);
    for (int i = 0; i < n; i++) {
        if (t->unit_tensor[i] >= 0 && !t->stepped[i])
            MOE_TRY(t->c->optimizer->step_range(t->opt, t->lr, grad_scale, t->num_updates + 1, t->unit_tensor[i], 1));
        t->stepped[i] = 0;
    }
    return MOE_OK;
}

static moe_status setup(trainer *t)
{
    const moe_host *h = t->h;
    moe_opts *o = t->o;
    t->update_freq = moe_config_update_freq(o);
    t->max_update = moe_opts_int(o, "max-update");
    t->max_epoch = moe_opts_int(o, "max-epoch");
    t->log_interval = (int)moe_opts_int(o, "log-interval");
    t->validate_interval_updates = (int)moe_opts_int(o, "validate-interval-updates");
    t->disable_validation = moe_opts_flag(o, "disable-validation");
    t->max_valid_steps = moe_opts_known(o, "max-valid-steps") && moe_opts_has_value(o, "max-valid-steps")
                             ? moe_opts_int(o, "max-valid-steps")
                             : 0;
    t->clip_norm = moe_opts_float(o, "clip-norm");
    t->epoch = 1;
    t->best_valid_loss = INFINITY;
    if (t->max_update <= 0 && t->max_epoch <= 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "nothing bounds training: give --max-update or --max-epoch");

    MOE_TRY(split_subsets(t, moe_opts_str(o, "valid-subset")));
    MOE_TRY(batch_bound(t));
    char max_tok[32] = "None", bsz[32] = "None";
    if (moe_opts_has_value(o, "max-tokens"))
        snprintf(max_tok, sizeof max_tok, "%lld", (long long)moe_opts_int(o, "max-tokens"));
    if (moe_opts_has_value(o, "batch-size"))
        snprintf(bsz, sizeof bsz, "%lld", (long long)moe_opts_int(o, "batch-size"));
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "max tokens per GPU = %s and batch size per GPU = %s", max_tok, bsz);

    int64_t N = t->Nmax;
    MOE_TRY(t->c->arch->setup(t->c->model, (t->Nmax + t->Tmax - 1) / t->Tmax, t->Tmax));
    MOE_TRY(dev_alloc(t, (uint64_t)N * 4u, "input tokens", (void **)&t->tokens));
    MOE_TRY(dev_alloc(t, (uint64_t)N * 4u, "target tokens", (void **)&t->targets));
    MOE_TRY(dev_alloc(t, (uint64_t)N * 4u, "per-token losses", (void **)&t->scratch));
    MOE_TRY(dev_alloc(t, RED_COUNT * 4u, "training statistics", (void **)&t->red));
    MOE_TRY(dev_alloc(t, RED_COUNT * 4u, "statistics of dummy batches", (void **)&t->red_dummy));
    MOE_TRY(dev_alloc(t, SUM_COUNT * 8u, "training statistics (fp64)", (void **)&t->red64));

    /* optimizer over every unit: the fp32 master when there is one, the params otherwise */
    int n = moe_runtime_num_units(t->rt);
    moe_opt_tensor *ts = calloc((size_t)n, sizeof *ts);
    t->unit_tensor = malloc((size_t)(n > 0 ? n : 1) * sizeof *t->unit_tensor);
    if (!ts || !t->unit_tensor) {
        free(ts);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    }
    int k = 0;
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(t->rt, i, &u);
        t->unit_tensor[i] = u.numel == 0 ? -1 : k;
        if (u.numel == 0)
            continue;
        moe_opt_tensor *x = &ts[k++];
        /* a sharded unit: this rank updates its shard only */
        void *param = u.sharded ? u.param_shard : u.param;
        x->n = u.shard;
        x->grad = u.sharded ? u.grad_shard : u.grad;
        x->grad_dtype = h->grad_dtype;
        if (u.master) {
            x->param = u.master;
            x->param_dtype = MOE_F32;
            x->param_copy = param;
            x->copy_dtype = h->act_dtype;
        } else {
            x->param = param;
            x->param_dtype = h->act_dtype;
        }
    }
    moe_status st = t->c->optimizer->init(h, ts, k, &t->opt);
    free(ts);
    MOE_TRY(st);
    MOE_TRY(t->c->lr_scheduler->init(h, &t->sched));
    MOE_TRY(t->c->criterion->init(h, &t->crit));
    t->lr = t->c->lr_scheduler->lr_at(t->sched, 0);

    moe_dtype act, grad;
    int master;
    moe_config_precision(o, &act, &grad, &master, &t->loss_scaling);
    if (t->loss_scaling) {
        int window = moe_opts_has_value(o, "fp16-scale-window")
                         ? (int)moe_opts_int(o, "fp16-scale-window")
                         : moe_scaler_default_window(h->world, t->update_freq);
        double threshold = moe_opts_has_value(o, "threshold-loss-scale") ? moe_opts_float(o, "threshold-loss-scale")
                                                                          : 0.0;
        moe_scaler_init(&t->scaler, moe_opts_float(o, "fp16-init-scale"), window,
                        moe_opts_float(o, "fp16-scale-tolerance"), threshold, moe_opts_float(o, "min-loss-scale"));
    }


    moe_model_info info;
    memset(&info, 0, sizeof info);
    t->c->arch->info(t->c->model, t->Tmax, &info);
    t->n_moe = (int)info.num_moe_layers;
    t->gate = t->n_moe > 0 ? h->gate_ops : NULL;
    t->dropless = t->n_moe > 0 && moe_opts_known(o, "moe-dropless") && moe_opts_flag(o, "moe-dropless");
    if (t->dropless && !t->log_moe)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "expected --criterion moe_cross_entropy with --moe-dropless (its capacity check reads "
                             "the routing metrics that criterion sums), found --criterion %s",
                             t->c->criterion_name ? t->c->criterion_name : "(none)");
    MOE_TRY(overlap_setup(t));
    for (t->gate_fields = 0; t->gate && t->gate->log_fields && t->gate_fields < MOE_NUM_GATE_METRICS &&
                             t->gate->log_fields[t->gate_fields];
         t->gate_fields++)
        ;
    MOE_TRY(moe_ckpt_gate_buffers(t->rt, t->c->arch, t->c->model, &t->gate_bufs, &t->n_gate_bufs));
    if (t->gate && t->gate->update && !t->c->arch->moe_gate)
        moe_log(MOE_LOG_WARNING, "fairseq.trainer",
                "the arch gives no access to its gates (moe_arch_ops.moe_gate, ABI 1.4): the gate's update does "
                "not run and its state is not checkpointed");

    const char *tb_dir = moe_opts_str(o, "tensorboard-logdir");
    t->tb_on = tb_dir && *tb_dir;
    t->log_load = moe_opts_flag(o, "log-expert-load");
    if (t->tb_on || t->log_load) {
        moe_opwrap_set_route_observer(observe_route, t);
        if (t->tb_on && h->rank == 0)
            MOE_TRY(moe_tb_open(tb_dir, &t->tb));
    }
    moe_profile_attach(h);

    t->inner = moe_meters_create(moe_mono_s());
    t->epoch_m = moe_meters_create(moe_mono_s());
    if (!t->inner || !t->epoch_m)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    return MOE_OK;
}

static void teardown(trainer *t)
{
    const moe_host *h = t->h;
    if (t->opt)
        t->c->optimizer->destroy(t->opt);
    if (t->sched)
        t->c->lr_scheduler->destroy(t->sched);
    if (t->crit)
        t->c->criterion->destroy(t->crit);
    void *bufs[] = {t->tokens, t->targets, t->scratch, t->red, t->red_dummy, t->red64};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            h->backend->free(h->ctx, bufs[i]);
    moe_meters_destroy(t->inner);
    moe_meters_destroy(t->epoch_m);
    moe_opwrap_set_route_observer(NULL, NULL);
    moe_tb_close(t->tb);
    moe_ckpt_free_buffers(t->gate_bufs, t->n_gate_bufs);
    free(t->load_layer);
    free(t->load);
    free(t->load_dropped);
    free(t->load_host);
    free(t->unit_tensor);
    free(t->stepped);
    for (int i = 0; i < t->n_valid; i++)
        free(t->valid_subsets[i]);
    free(t->valid_subsets);
}

/* forward + criterion (+ backward) of one batch; stats accumulate in t->red */
static moe_status run_batch(trainer *t, const char *split, int64_t index, int train, int micro, float grad_scale,
                            moe_batch *b)
{
    const moe_host *h = t->h;
    MOE_TRY(t->c->task->get_batch(t->c->task_state, split, index, b));
    int64_t N = b->B * b->T;
    moe_status st = h->backend->copy_from_host(h->ctx, t->tokens, b->src, (uint64_t)N * 4u);
    if (st == MOE_OK)
        st = h->backend->copy_from_host(h->ctx, t->targets, b->tgt, (uint64_t)N * 4u);
    if (st != MOE_OK) {
        t->c->task->free_batch(t->c->task_state, b);
        return st;
    }
    moe_fwd_out out;
    int span = train ? moe_profile_begin(MOE_PROF_FORWARD, "forward") : -1;
    t->in_forward = train;
    moe_status fst = t->c->arch->forward(t->c->model, t->tokens, b->B, b->T, train, micro, &out);
    t->in_forward = 0;
    MOE_TRY(fst);
    moe_crit_in in = {0};
    in.fwd = &out;
    in.targets = t->targets;
    in.sample_size = b->ntokens;
    in.grad_scale = grad_scale;
    in.stats = b->ntokens > 0 ? t->red : t->red_dummy;
    if (t->gate_fields > 0 && out.gate_metrics && out.n_moe_layers > 0) /* averaged over the layers */
        for (int f = 0; f < t->gate_fields; f++)
            MOE_TRY(h->ops->sum_f32(h->ctx, in.stats + RED_GATE + f, out.gate_metrics + f, out.n_moe_layers,
                                    MOE_NUM_GATE_METRICS, 1.0f / (float)out.n_moe_layers));
    in.scratch = t->scratch;
    float dl_aux = 0.0f;
    int loss = train ? moe_profile_begin(MOE_PROF_FORWARD, "loss") : -1;
    MOE_TRY(t->c->criterion->compute(t->crit, &in, &dl_aux));
    moe_profile_end(loss);
    moe_profile_end(span);
    if (train) {
        span = moe_profile_begin(MOE_PROF_BACKWARD, "backward");
        t->overlap_live = t->overlap;
        t->overlap_scale = b->ntokens > 0 ? (double)b->ntokens : 1.0; /* 1/multiply of train_step_inner */
        moe_status bst = t->c->arch->backward(t->c->model, dl_aux);
        t->overlap_live = 0;
        MOE_TRY(bst);
        moe_profile_end(span);
    }
    return MOE_OK;
}

/* The per-update reductions to the host: statistics summed over ranks in
 * fp64 (fairseq's _fast_stat_sync_sum, §5.4), norms as the device left them. */
static moe_status fetch_reductions(trainer *t, double *red, double *counts)
{
    const moe_host *h = t->h;
    float redf[RED_COUNT];
    MOE_TRY(h->backend->copy_to_host(h->ctx, redf, t->red, sizeof redf));
    double sum[SUM_COUNT];
    for (int k = 0; k < RED_COUNT; k++)
        red[k] = redf[k];
    for (int k = 0; k < MOE_STAT_COUNT; k++)
        sum[k] = red[k];
    for (int k = 0; k < 3; k++)
        sum[SUM_NTOKENS + k] = counts[k];
    sum[SUM_STOP] = moe_runctl_stop_signal() != 0 ? 1.0 : 0.0;
    for (int k = 0; k < MOE_NUM_GATE_METRICS; k++)
        sum[SUM_GATE + k] = red[RED_GATE + k];
    MOE_TRY(h->backend->copy_from_host(h->ctx, t->red64, sum, sizeof sum));
    MOE_TRY(h->comm_ops->all_reduce(h->comm, NULL, t->red64, SUM_COUNT, MOE_F64, MOE_REDUCE_SUM));
    MOE_TRY(h->backend->copy_to_host(h->ctx, sum, t->red64, sizeof sum));
    for (int k = 0; k < MOE_STAT_COUNT; k++)
        red[k] = sum[k];
    for (int k = 0; k < 3; k++)
        counts[k] = sum[SUM_NTOKENS + k];
    t->stop_ranks = (int)sum[SUM_STOP];
    for (int k = 0; k < MOE_NUM_GATE_METRICS; k++)
        red[RED_GATE + k] = sum[SUM_GATE + k];
    return MOE_OK;
}

/* sum over the group's ranks, pre- and post-divided: the mean (fairseq's FSDP) */
static moe_status all_reduce_mean(trainer *t, moe_group *g, int n, void *grad, int64_t numel)
{
    const moe_host *h = t->h;
    double pre, post;
    moe_reduce_factors(n, &pre, &post);
    if (pre != 1.0)
        MOE_TRY(h->ops->axpby(h->ctx, grad, grad, h->grad_dtype, numel, 0.0f, (float)(1.0 / pre)));
    MOE_TRY(h->comm_ops->all_reduce(h->comm, g, grad, numel, h->grad_dtype, MOE_REDUCE_SUM));
    if (post != 1.0)
        MOE_TRY(h->ops->axpby(h->ctx, grad, grad, h->grad_dtype, numel, 0.0f, (float)(1.0 / post)));
    return MOE_OK;
}

/* average non-expert gradients over all ranks, and expert gradients over the
 * replicas of each expert when E < world; sharded units were reduce-scattered
 * into their shards as the arch released them */
static moe_status reduce_gradients(trainer *t)
{
    const moe_host *h = t->h;
    const moe_parallel_plan *plan = moe_runtime_plan(t->rt);
    MOE_TRY(moe_runtime_finish_reductions(t->rt));
    if (h->world <= 1)
        return MOE_OK;
    int n = moe_runtime_num_units(t->rt);
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(t->rt, i, &u);
        if (u.numel == 0 || u.sharded)
            continue;
        if (u.expert_index < 0)
            MOE_TRY(all_reduce_mean(t, NULL, h->world, u.grad, u.numel));
        else if (plan->replicas > 1)
            MOE_TRY(all_reduce_mean(t, plan->replica_group, plan->replicas, u.grad, u.numel));
    }
    return MOE_OK;
}

static moe_status grad_norms(trainer *t)
{
    const moe_host *h = t->h;
    const moe_ops *ops = h->ops;
    MOE_TRY(ops->fill(h->ctx, t->red + RED_NORM_DENSE, MOE_F32, 3, 0.0f));
    int n = moe_runtime_num_units(t->rt);
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(t->rt, i, &u);
        if (u.numel == 0)
            continue;
        if (u.expert_index >= 0) {
            MOE_TRY(ops->sumsq(h->ctx, t->red + RED_NORM_EXPERT, u.grad, h->grad_dtype, u.numel));
        } else if (u.sharded) {
            MOE_TRY(ops->sumsq(h->ctx, t->red + RED_NORM_SHARDED, u.grad_shard, h->grad_dtype, u.shard));
        } else {
            MOE_TRY(ops->sumsq(h->ctx, t->red + RED_NORM_DENSE, u.grad, h->grad_dtype, u.numel));
        }
    }
    return MOE_OK;
}

static double mem_total_bytes(const moe_mem_stats *m)
{
    if (m->total)
        return (double)m->total;
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (double)pages * (double)size : 0.0;
}

/* the criterion's fields (§3.3): loss and, for MoE criteria, the gate loss,
 * the routing metrics and inner_loss; then ppl; the gate's own log fields
 * (z_loss) come after every other field but the wall clock */
static void log_losses(const trainer *t, moe_meters *m, const double *red, double ntokens, double batch_count)
{
    const double ln2 = log(2.0);
    double ss = ntokens; /* sample_size == ntokens for these criteria */
    moe_meters_scalar(m, "loss", red[MOE_STAT_LOSS] / ss / ln2, ss, 10, 3);
    if (t->log_moe) {
        moe_meters_scalar(m, "moe_gate_loss", red[MOE_STAT_MOE_LOSS] / ss, ss, 10, 8);
        for (int k = 0; k < MOE_NUM_METRICS; k++)
            moe_meters_scalar(m, metric_keys[k], red[MOE_STAT_METRICS + k] / batch_count, batch_count, 10, 3);
        moe_meters_scalar(m, "inner_loss", red[MOE_STAT_INNER_LOSS] / ss / ln2, ss, 10, 3);
        moe_meters_ppl(m, "ppl", "inner_loss", 20);
        for (int k = 0; k < t->gate_fields; k++)
            moe_meters_scalar(m, t->gate->log_fields[k], red[RED_GATE + k] / batch_count, batch_count, 1600, 8);
    } else {
        moe_meters_ppl(m, "ppl", "loss", 20);
    }
}

/* record one successful update in both aggregators (§8.2) */
static void log_update(trainer *t, moe_meters *m, const double *red, double ntokens, double nsentences,
                       double batch_count, double gnorm, int clipped, double wall_seconds, double now)
{
    log_losses(t, m, red, ntokens, batch_count);
    moe_meters_speed(m, "wps", ntokens, now, 90, 1);
    moe_meters_speed(m, "ups", 1.0, now, 100, 2);
    moe_meters_scalar(m, "wpb", ntokens, 1, 180, 1);
    moe_meters_scalar(m, "bsz", nsentences, 1, 190, 1);
    moe_meters_scalar(m, "num_updates", (double)t->num_updates, 0, 200, -1);
    moe_meters_scalar(m, "lr", t->lr, 0, 300, -1);
    moe_meters_scalar(m, "gnorm", gnorm, 1, 400, 3);
    if (t->clip_norm > 0)
        moe_meters_scalar(m, "clip", clipped ? 100.0 : 0.0, 1, 500, 1);
    if (t->loss_scaling)
        moe_meters_scalar(m, "loss_scale", t->scaler.scale, 0, 700, 4);
    moe_meters_stopwatch(m, "train_wall", wall_seconds, 800, 0);
    moe_mem_stats ms;
    t->h->backend->memory_stats(t->h->ctx, &ms);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    double alloc = (double)ms.peak_allocated / gib;
    moe_meters_scalar(m, "cuda_gb_allocated", alloc, 0, 1500, 1);
    moe_meters_scalar(m, "cuda_gb_reserved", (double)ms.peak_reserved / gib, 0, 1500, 1);
    moe_meters_scalar(m, "cuda_gb_free", mem_total_bytes(&ms) / gib - alloc, 0, 1500, 1);
}

/* TensorBoard is a view of the run: a failed write is said once, then the
 * run goes on without it */
static void tb_failed(trainer *t)
{
    moe_log(MOE_LOG_WARNING, "moelm.tensorboard", "%s; no more TensorBoard events are written",
            moe_error_message());
    moe_error_clear();
    moe_tb_close(t->tb);
    t->tb = NULL;
}

static void tb_stats(trainer *t, const char *tag, const char *prefix, const moe_stat_kv *kv, int n)
{
    if (t->tb && (moe_tb_stats(t->tb, tag, prefix, t->num_updates, kv, n) != MOE_OK || moe_tb_flush(t->tb) != MOE_OK))
        tb_failed(t);
}

/* A routing's expert and slot arrays in t->load_host (expert, then slot):
 * returns the choices per array (every choice of every token), or -1 when
 * they could not be copied. */
static int64_t route_to_host(trainer *t, const moe_route_args *a)
{
    const int64_t n = (int64_t)(a->width > 0 ? a->width : 2) * a->S;
    if (2 * n > t->load_host_cap) {
        int32_t *p = realloc(t->load_host, (size_t)(2 * n) * sizeof *p);
        if (!p)
            return -1;
        t->load_host = p;
        t->load_host_cap = 2 * n;
    }
    const moe_host *h = t->h;
    if (h->backend->copy_to_host(h->ctx, t->load_host, a->expert, (uint64_t)n * 4u) != MOE_OK ||
        h->backend->copy_to_host(h->ctx, t->load_host + n, a->slot, (uint64_t)n * 4u) != MOE_OK) {
        moe_error_clear();
        return -1;
    }
    return n;
}

/* route_forward's observer (core/opwrap.h): during the forwards of a logged
 * update, the tokens each expert of each MoE layer was given */
static void observe_route(void *ctx, const char *layer, const moe_route_args *a)
{
    trainer *t = ctx;
    if (!t->load_collect || !t->in_forward || a->S <= 0 || a->E <= 0)
        return;
    if (t->load_experts == 0)
        t->load_experts = a->E;
    if (a->E != t->load_experts)
        return;
    int li = 0;
    while (li < t->load_n && t->load_layer[li] != layer)
        li++;
    if (li == t->load_n) {
        const int E = t->load_experts;
        const char **names = realloc(t->load_layer, (size_t)(li + 1) * sizeof *names);
        if (names)
            t->load_layer = names;
        double *l = names ? realloc(t->load, (size_t)(li + 1) * (size_t)E * sizeof *l) : NULL;
        if (l)
            t->load = l;
        double *dr = l ? realloc(t->load_dropped, (size_t)(li + 1) * (size_t)E * sizeof *dr) : NULL;
        if (dr)
            t->load_dropped = dr;
        if (!dr)
            return;
        t->load_layer[li] = layer;
        memset(t->load + (size_t)li * (size_t)E, 0, (size_t)E * sizeof *t->load);
        memset(t->load_dropped + (size_t)li * (size_t)E, 0, (size_t)E * sizeof *t->load_dropped);
        t->load_n++;
    }
    const int64_t n = route_to_host(t, a);
    if (n < 0)
        return;
    double *l = t->load + (size_t)li * (size_t)t->load_experts;
    double *dr = t->load_dropped + (size_t)li * (size_t)t->load_experts;
    for (int64_t i = 0; i < n; i++) {
        int32_t e = t->load_host[i];
        if (e < 0 || e >= t->load_experts)
            continue;
        l[e] += 1.0;
        if (t->load_host[n + i] < 0)
            dr[e] += 1.0;
    }
}

/* One histogram over the expert ids: bucket e = [e - 0.5, e + 0.5] holds the
 * tokens of expert e, so TensorBoard draws the load per expert. */
static moe_status tb_expert_histogram(trainer *t, const char *name, const double *counts)
{
    const int E = t->load_experts;
    double *limits = malloc((size_t)E * sizeof *limits);
    if (!limits)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    double num = 0, sum = 0, sq = 0;
    for (int e = 0; e < E; e++) {
        limits[e] = e + 0.5;
        num += counts[e];
        sum += counts[e] * e;
        sq += counts[e] * e * e;
    }
    moe_status st = moe_tb_histogram(t->tb, "train_inner", name, t->num_updates, -0.5, E - 0.5, limits, counts, E,
                                     num, sum, sq);
    free(limits);
    return st;
}

/* The logged update's expert load (the interval's with --log-expert-load),
 * summed over the ranks (every rank takes part), written by rank 0: per MoE
 * layer, a histogram of the tokens each expert was routed
 * (expert_load/<layer>) and of those dropped for capacity
 * (expert_dropped/<layer>); with --log-expert-load also one log line,
 * "expert_load | <layer>: n0 n1 ... | <layer>: ...", layers in the order
 * they route. */
static moe_status log_expert_load(trainer *t)
{
    const moe_host *h = t->h;
    t->load_collect = 0;
    if (t->load_n == 0 || t->load_experts == 0)
        return MOE_OK;
    const int E = t->load_experts;
    int64_t n = 2 * (int64_t)t->load_n * E;
    if (h->world > 1) {
        double *all = malloc((size_t)n * sizeof *all);
        void *dev = NULL;
        if (!all)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        memcpy(all, t->load, (size_t)(n / 2) * sizeof *all);
        memcpy(all + n / 2, t->load_dropped, (size_t)(n / 2) * sizeof *all);
        moe_status st = h->backend->alloc(h->ctx, (uint64_t)n * 8u, "expert load (TensorBoard)", &dev);
        if (st == MOE_OK)
            st = h->backend->copy_from_host(h->ctx, dev, all, (uint64_t)n * 8u);
        if (st == MOE_OK)
            st = h->comm_ops->all_reduce(h->comm, NULL, dev, n, MOE_F64, MOE_REDUCE_SUM);
        if (st == MOE_OK)
            st = h->backend->copy_to_host(h->ctx, all, dev, (uint64_t)n * 8u);
        if (dev)
            h->backend->free(h->ctx, dev);
        if (st == MOE_OK) {
            memcpy(t->load, all, (size_t)(n / 2) * sizeof *all);
            memcpy(t->load_dropped, all + n / 2, (size_t)(n / 2) * sizeof *all);
        }
        free(all);
        MOE_TRY(st);
    }
    if (t->log_load && h->rank == 0) {
        moe_strbuf line = {0};
        moe_sb_puts(&line, "expert_load");
        for (int li = 0; li < t->load_n; li++) {
            moe_sb_printf(&line, " | %s:", t->load_layer[li] ? t->load_layer[li] : "moe_layer");
            for (int e = 0; e < E; e++)
                moe_sb_printf(&line, " %.0f", t->load[(size_t)li * (size_t)E + (size_t)e]);
        }
        if (line.failed) {
            free(line.p);
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        }
        moe_log(MOE_LOG_INFO, "moelm.expert_load", "%s", line.p);
        free(line.p);
    }
    moe_status st = MOE_OK;
    for (int li = 0; li < t->load_n && t->tb && st == MOE_OK; li++) {
        char name[200];
        snprintf(name, sizeof name, "expert_load/%s", t->load_layer[li] ? t->load_layer[li] : "moe_layer");
        st = tb_expert_histogram(t, name, t->load + (size_t)li * (size_t)E);
        snprintf(name, sizeof name, "expert_dropped/%s", t->load_layer[li] ? t->load_layer[li] : "moe_layer");
        if (st == MOE_OK)
            st = tb_expert_histogram(t, name, t->load_dropped + (size_t)li * (size_t)E);
    }
    if (st == MOE_OK && t->tb)
        st = moe_tb_flush(t->tb);
    if (st != MOE_OK)
        tb_failed(t);
    memset(t->load, 0, (size_t)(n / 2) * sizeof *t->load);
    memset(t->load_dropped, 0, (size_t)(n / 2) * sizeof *t->load_dropped);
    return MOE_OK;
}

static void emit(trainer *t, moe_meters *m, const char *tag, const char *prefix, int with_update, double now)
{
    moe_stat_kv kv[64];
    int n = moe_meters_format(m, prefix, now, kv, 63);
    /* fairseq appends the wall clock last */
    snprintf(kv[n].key, sizeof kv[n].key, "%swall", prefix);
    moe_format_stat(kv[n].value, sizeof kv[n].value, now - t->t0, 0);
    n++;
    char update[48];
    snprintf(update, sizeof update, "%lld/%lld", (long long)t->iter, (long long)t->batches_per_epoch);
    moe_log_stats(tag, t->epoch, with_update ? update : NULL, kv, n);
    tb_stats(t, tag, prefix, kv, n);
}

/* One validation subset (fairseq's validate): every batch of it on this
 * rank (--max-valid-steps N: the first N), statistics summed over the ranks
 * per batch; logged as "valid on '<subset>' subset", keys <subset>_*. The
 * first subset's loss is the run's validation loss. */
/* --moe-dropless: the largest load over the bound that the routings seen
 * so far gave one expert, with where it was */
typedef struct dropless_probe {
    trainer *t;
    int64_t load, bound, tokens;
    int expert;
    const char *layer;
} dropless_probe;

static void probe_route(void *ctx, const char *layer, const moe_route_args *a)
{
    dropless_probe *p = ctx;
    trainer *t = p->t;
    if (a->E <= 0 || a->S <= 0)
        return;
    int64_t *load = calloc((size_t)a->E, sizeof *load);
    const int64_t n = load ? route_to_host(t, a) : -1;
    if (n > 0) {
        for (int64_t i = 0; i < n; i++)
            if (t->load_host[i] >= 0 && t->load_host[i] < a->E)
                load[t->load_host[i]]++;
        for (int e = 0; e < a->E; e++)
            if (load[e] > a->capacity && load[e] > p->load) {
                p->load = load[e];
                p->bound = a->capacity;
                p->tokens = a->S;
                p->expert = e;
                p->layer = layer;
            }
    }
    free(load);
}

/* The error for a capacity overflow under --moe-dropless, found in the
 * summed metrics of batches first .. first + n - 1 of `split`: their
 * forwards run again (same seed, same micro-batch streams, so the same
 * routing) with the routing observed on the host, which names the expert.
 * Training stops here, so the extra forwards and copies cost nothing that
 * matters; every rank takes part, as the forwards exchange tokens. */
static moe_status dropless_overflow(trainer *t, const char *split, int64_t first, int64_t n, int train,
                                    const double *red)
{
    const moe_host *h = t->h;
    dropless_probe p = {t, 0, 0, 0, -1, NULL};
    moe_opwrap_set_route_observer(probe_route, &p);
    for (int64_t i = 0; i < n; i++) {
        moe_batch b;
        if (t->c->task->get_batch(t->c->task_state, split, first + i, &b) != MOE_OK)
            break;
        moe_fwd_out out;
        moe_status st = h->backend->copy_from_host(h->ctx, t->tokens, b.src, (uint64_t)(b.B * b.T) * 4u);
        if (st == MOE_OK)
            st = t->c->arch->forward(t->c->model, t->tokens, b.B, b.T, train, train ? (int)i : 0, &out);
        t->c->task->free_batch(t->c->task_state, &b);
        if (st != MOE_OK)
            break;
    }
    moe_error_clear();
    moe_opwrap_set_route_observer(t->tb_on || t->log_load ? observe_route : NULL, t);
    const double f = moe_opts_float(t->o, "moe-dropless-capacity-factor");
    char where[96];
    if (train)
        snprintf(where, sizeof where, "at update %lld", (long long)t->num_updates + 1);
    else
        snprintf(where, sizeof where, "in validation on '%s'", split);
    if (p.expert >= 0)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--moe-dropless: expected at most %lld tokens per expert in a micro-batch of %lld "
                             "(the bound with --moe-dropless-capacity-factor %g), found %lld routed to expert %d "
                             "of %s %s (routing collapse); raise --moe-dropless-capacity-factor",
                             (long long)p.bound, (long long)p.tokens, f, (long long)p.load, p.expert,
                             p.layer ? p.layer : "a MoE layer", where);
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "--moe-dropless: expected no expert over the bound (--moe-dropless-capacity-factor %g), "
                         "found tokens over capacity %s on another rank (overflow_expert1 %.3f, overflow_expert2 "
                         "%.3f, summed over the ranks) (routing collapse); raise --moe-dropless-capacity-factor",
                         f, where, red[MOE_STAT_METRICS + MOE_METRIC_OVERFLOW_EXPERT1],
                         red[MOE_STAT_METRICS + MOE_METRIC_OVERFLOW_EXPERT2]);
}

/* whether the summed routing metrics show a token dropped for capacity */
static int dropless_overflowed(const trainer *t, const double *red)
{
    return t->dropless && (red[MOE_STAT_METRICS + MOE_METRIC_OVERFLOW_EXPERT1] > 0.0 ||
                           red[MOE_STAT_METRICS + MOE_METRIC_OVERFLOW_EXPERT2] > 0.0);
}

static moe_status validate_subset(trainer *t, const char *subset, int first)
{
    const moe_host *h = t->h;
    int64_t nb = t->c->task->num_batches(t->c->task_state, subset);
    if (nb < 0)
        return MOE_ERR_INVALID_ARG; /* the task set the message */
    if (t->max_valid_steps > 0 && nb > t->max_valid_steps)
        nb = t->max_valid_steps;
    double start = moe_mono_s();
    moe_meters *m = moe_meters_create(start);
    if (!m)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    double red[RED_COUNT];
    moe_status st = MOE_OK;
    double total_tokens = 0;
    for (int64_t i = 0; i < nb && st == MOE_OK; i++) {
        st = h->ops->fill(h->ctx, t->red, MOE_F32, RED_COUNT, 0.0f);
        moe_batch b;
        if (st == MOE_OK)
            st = run_batch(t, subset, i, 0, 0, 0.0f, &b);
        if (st != MOE_OK)
            break;
        double counts[3] = {(double)b.ntokens, (double)b.nsentences, b.ntokens > 0 ? 1.0 : 0.0};
        t->c->task->free_batch(t->c->task_state, &b);
        st = fetch_reductions(t, red, counts);
        if (st == MOE_OK && dropless_overflowed(t, red))
            st = dropless_overflow(t, subset, i, 1, 0, red);
        if (st != MOE_OK || counts[0] <= 0)
            continue; /* every rank had a dummy batch */
        total_tokens += counts[0];
        log_losses(t, m, red, counts[0], counts[2]);
        moe_meters_speed(m, "wps", counts[0], moe_mono_s(), 90, 1);
        moe_meters_scalar(m, "wpb", counts[0], 1, 180, 1);
        moe_meters_scalar(m, "bsz", counts[1], 1, 190, 1);
    }
    if (st == MOE_OK && total_tokens > 0) {
        double loss = moe_meters_value(m, "loss", moe_mono_s());
        if (first) {
            if (loss < t->best_valid_loss)
                t->best_valid_loss = loss;
            t->valid_loss_now = loss;
        }
        moe_meters_scalar(m, "num_updates", (double)t->num_updates, 0, 200, -1);
        moe_meters_scalar(m, "best_loss", first ? t->best_valid_loss : loss, 0, 300, 3);
        char prefix[160];
        snprintf(prefix, sizeof prefix, "%s_", subset);
        moe_stat_kv kv[64];
        int n = moe_meters_format(m, prefix, moe_mono_s(), kv, 64);
        moe_log_stats(subset, t->epoch, NULL, kv, n);
        tb_stats(t, subset, prefix, kv, n);
    } else if (st == MOE_OK && first) {
        moe_log(MOE_LOG_WARNING, "fairseq_cli.train", "validation subset '%s' has no tokens to score", subset);
    }
    moe_meters_destroy(m);
    return st;
}

static moe_status validate(trainer *t)
{
    /* what the model draws in evaluation (top-2 'sampling' noise) follows
     * --seed + num_updates, as moelm-eval-lm on this update's checkpoint */
    moe_runtime_set_step_seed(t->rt, t->h->seed + (uint64_t)t->num_updates);
    int span = moe_profile_begin(MOE_PROF_OTHER, "validation");
    for (int i = 0; i < t->n_valid; i++)
        MOE_TRY(validate_subset(t, t->valid_subsets[i], i == 0));
    moe_profile_end(span);
    return MOE_OK;
}

/* ------------------------------------------------------------ checkpoints */

static moe_ckpt_run ckpt_run(const trainer *t)
{
    moe_ckpt_run run = {t->rt,
                        moe_opts_str(t->o, "arch"),
                        moe_opts_str(t->o, "optimizer"),
                        t->c->optimizer,
                        t->opt,
                        t->c->task->vocab_size(t->c->task_state),
                        t->n_gate_bufs,
                        t->gate_bufs};
    return run;
}

/* fairseq's save_checkpoint: which names are due is decided here (the
 * names, links and pruning are the checkpoint module's) */
static moe_status save_checkpoints(trainer *t, int end_of_epoch)
{
    moe_opts *o = t->o;
    if (moe_opts_flag(o, "no-save"))
        return MOE_OK;
    int64_t siu = moe_opts_int(o, "save-interval-updates");
    moe_ckpt_save_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.dir = moe_opts_str(o, "save-dir");
    spec.epoch_file = end_of_epoch && !moe_opts_flag(o, "no-epoch-checkpoints") &&
                      t->epoch % moe_opts_int(o, "save-interval") == 0;
    spec.interval_file = !end_of_epoch && siu > 0 && t->num_updates % siu == 0;
    /* fairseq's checkpoint_best: this save's validation loss is the best so far */
    spec.best_file = !isnan(t->valid_loss_now) && t->valid_loss_now <= t->best_valid_loss;
    spec.last_file = !moe_opts_flag(o, "no-last-checkpoints");
    if (t->preempted) /* what a resumed run reads, and nothing else: the clock is running */
        spec.epoch_file = spec.interval_file = spec.best_file = 0;
    /* a rank whose launcher is gone must not write: the job is over */
    MOE_TRY(moe_runctl_check_launcher());
    spec.keep_interval = moe_opts_int(o, "keep-interval-updates");
    spec.score = t->valid_loss_now;
    moe_ckpt_state s;
    memset(&s, 0, sizeof s);
    s.num_updates = t->num_updates;
    s.epoch = t->epoch;
    s.iter = t->iter;
    s.end_of_epoch = end_of_epoch;
    s.best_valid_loss = t->best_valid_loss;
    s.has_scaler = t->loss_scaling;
    if (t->loss_scaling)
        s.scaler = t->scaler;
    moe_ckpt_run run = ckpt_run(t);
    int wrote;
    MOE_TRY(moe_ckpt_save_all(&run, &s, &spec, &wrote));
    if (wrote)
        t->saved_updates = t->num_updates;
    return MOE_OK;
}

/* fairseq's load_checkpoint: --restore-file (in --save-dir when relative),
 * its per-rank files of any world size or one consolidated file; every rank
 * must find it or none, and all must read the same save */
static moe_status load_checkpoint(trainer *t)
{
    const moe_host *h = t->h;
    moe_opts *o = t->o;
    const char *dir = moe_opts_str(o, "save-dir");
    const char *restore = moe_opts_str(o, "restore-file");
    if (!restore || !*restore)
        return MOE_OK;
    char path[4400], shown[4400];
    moe_ckpt_join(path, sizeof path, dir && *dir ? dir : ".", restore);
    int found = moe_ckpt_exists(path);
    if (h->world > 1) {
        float v = (float)found;
        MOE_TRY(h->backend->copy_from_host(h->ctx, t->red, &v, sizeof v));
        MOE_TRY(h->comm_ops->all_reduce(h->comm, NULL, t->red, 1, MOE_F32, MOE_REDUCE_SUM));
        MOE_TRY(h->backend->copy_to_host(h->ctx, &v, t->red, sizeof v));
        if ((int)v != 0 && (int)v != h->world)
            return moe_error_set(MOE_ERR_IO, "checkpoint found on %d of %d ranks; rank %d %s %s", (int)v, h->world,
                                 h->rank, found ? "has" : "misses", path);
    }
    if (!found) {
        moe_ckpt_rank_path(shown, sizeof shown, NULL, path, h->rank);
        moe_log(MOE_LOG_INFO, "fairseq.trainer", "No existing checkpoint found %s", shown);
        return MOE_OK;
    }
    int reset_optimizer = moe_opts_flag(o, "reset-optimizer");
    moe_ckpt_run run = ckpt_run(t);
    moe_ckpt_state s;
    MOE_TRY(moe_ckpt_load(&run, path, !reset_optimizer, &s, shown, sizeof shown));
    if (h->world > 1) {
        /* the same save everywhere: its id's max equals minus the max of its negation */
        double ids[2] = {(double)(s.save_id >> 12), -(double)(s.save_id >> 12)};
        MOE_TRY(h->backend->copy_from_host(h->ctx, t->red64, ids, sizeof ids));
        MOE_TRY(h->comm_ops->all_reduce(h->comm, NULL, t->red64, 2, MOE_F64, MOE_REDUCE_MAX));
        MOE_TRY(h->backend->copy_to_host(h->ctx, ids, t->red64, sizeof ids));
        if (ids[0] != -ids[1])
            return moe_error_set(MOE_ERR_IO, "the ranks read different checkpoints at %s (each its own --save-dir?); "
                                             "give every rank the same files", path);
    }
    t->num_updates = s.num_updates;
    if (moe_opts_flag(o, "reset-dataloader")) {
        t->epoch = 1;
        t->iter = 0;
    } else if (s.end_of_epoch) {
        t->epoch = (int)s.epoch + 1;
        t->iter = 0;
    } else {
        t->epoch = (int)s.epoch;
        t->iter = s.iter;
    }
    t->best_valid_loss = s.best_valid_loss;
    if (t->loss_scaling && s.has_scaler && !reset_optimizer) {
        /* fairseq keeps the loss scale with the optimizer state */
        t->scaler.scale = s.scaler.scale;
        t->scaler.iter = s.scaler.iter;
        t->scaler.last_overflow_iter = s.scaler.last_overflow_iter;
        t->scaler.last_rescale_iter = s.scaler.last_rescale_iter;
        t->scaler.overflows_since_rescale = s.scaler.overflows_since_rescale;
    }
    if (!reset_optimizer && !t->c->optimizer->load_state)
        moe_log(MOE_LOG_WARNING, "fairseq.trainer", "optimizer %s cannot restore its state; it starts afresh",
                run.optimizer);
    /* the schedule is a function of num_updates: nothing else to restore
     * (--reset-lr-scheduler changes nothing) */
    t->lr = t->c->lr_scheduler->lr_at(t->sched, t->num_updates);
    t->saved_updates = t->num_updates;
    moe_log(MOE_LOG_INFO, "fairseq.trainer", "loaded checkpoint %s (epoch %lld @ %lld updates)", shown,
            (long long)s.epoch, (long long)t->num_updates);
    return MOE_OK;
}

static moe_status end_of_epoch(trainer *t)
{
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "end of epoch %d (average epoch stats below)", t->epoch);
    emit(t, t->epoch_m, "train", "train_", 0, moe_mono_s());
    moe_meters_reset(t->epoch_m, moe_mono_s());
    return MOE_OK;
}

/* Each MoE layer's gate update (the expert bias of aux-loss-free
 * balancing), in layer order on every rank: the gates sum their loads over
 * the ranks. After a successful step only: an overflowed step's loads count
 * towards the next update. */
static moe_status update_gates(trainer *t)
{
    if (!t->gate || !t->gate->update || !t->c->arch->moe_gate)
        return MOE_OK;
    for (int j = 0; j < t->n_moe; j++) {
        void *g = t->c->arch->moe_gate(t->c->model, j);
        if (g)
            MOE_TRY(t->gate->update(g));
    }
    return MOE_OK;
}

/* One update: --update-freq micro-batches (fewer at the end of an epoch, as
 * fairseq's GroupedIterator), gradient reduction, norms, the overflow check,
 * clipping, the optimizer and scheduler steps. *updated is 0 when the step
 * overflowed and was skipped. */
static moe_status train_step_inner(trainer *t, int *updated)
{
    const moe_host *h = t->h;
    const moe_ops *ops = h->ops;
    double step_start = moe_mono_s();
    *updated = 0;
    moe_runtime_set_step_seed(t->rt, h->seed + (uint64_t)t->num_updates);
    MOE_TRY(moe_runtime_zero_grads(t->rt));
    MOE_TRY(ops->fill(h->ctx, t->red, MOE_F32, RED_COUNT, 0.0f));
    float scale = t->loss_scaling ? (float)t->scaler.scale : 1.0f;
    double counts[3] = {0, 0, 0}; /* ntokens, nsentences, non-dummy batches */
    const int64_t first = t->iter;
    for (int micro = 0; micro < t->update_freq && t->iter < t->batches_per_epoch; micro++) {
        moe_batch b;
        MOE_TRY(run_batch(t, "train", t->iter, 1, micro, scale, &b));
        counts[0] += (double)b.ntokens;
        counts[1] += (double)b.nsentences;
        counts[2] += b.ntokens > 0 ? 1.0 : 0.0;
        t->c->task->free_batch(t->c->task_state, &b);
        t->iter++;
    }
    if (t->overlap_side) { /* the steps queued beside the backward are done before anything reads on */
        MOE_TRY(h->backend->side_stream(h->ctx, MOE_SIDE_JOIN));
        t->overlap_side = 0;
    }
    int span = moe_profile_begin(MOE_PROF_COMM, "gradient reduction");
    MOE_TRY(reduce_gradients(t));
    moe_profile_end(span);
    span = moe_profile_begin(MOE_PROF_OTHER, "norms and statistics");
    MOE_TRY(grad_norms(t));
    /* the expert part sums over every rank, replicas included, as fairseq's
     * clip_grad_norm_ does (§5.5) */
    if (h->world > 1) /* expert and sharded parts */
        MOE_TRY(h->comm_ops->all_reduce(h->comm, NULL, t->red + RED_NORM_EXPERT, 2, MOE_F32, MOE_REDUCE_SUM));
    double red[RED_COUNT];
    MOE_TRY(fetch_reductions(t, red, counts));
    moe_profile_end(span);
    if (dropless_overflowed(t, red))
        return dropless_overflow(t, "train", first, t->iter - first, 1, red);
    double ntokens = counts[0], nsentences = counts[1], batch_count = counts[2];

    /* ntokens: all ranks'; fairseq divides by 1 when a step has none */
    double multiply = (double)h->world / ((double)scale * (ntokens > 0 ? ntokens : 1.0));
    double gnorm = multiply * sqrt(red[RED_NORM_DENSE] + red[RED_NORM_EXPERT] + red[RED_NORM_SHARDED]);
    if (!isfinite(gnorm)) {
        if (!t->loss_scaling)
            return moe_error_set(MOE_ERR_OVERFLOW, "gradients are NaN/Inf at update %lld%s; lower the "
                                                   "learning rate or enable --clip-norm",
                                 (long long)t->num_updates + 1,
                                 t->overlap ? " (with --optimizer-overlap most units were already stepped)" : "");
        char note[160];
        moe_status st = moe_scaler_check_overflow(&t->scaler, gnorm, note, sizeof note);
        if (st == MOE_ERR_OVERFLOW) {
            moe_log(MOE_LOG_INFO, "fairseq.trainer", "NOTE: %s", note);
            t->wall_pending += moe_mono_s() - step_start;
            return MOE_OK;
        }
        return st; /* minimum loss scale reached: message already set */
    }
    int clipped = 0;
    if (t->clip_norm > 0 && gnorm > t->clip_norm) {
        multiply *= t->clip_norm / gnorm;
        clipped = 1;
    }
    span = moe_profile_begin(MOE_PROF_OPTIMIZER, "optimizer");
    MOE_TRY(optimizer_step(t, 1.0 / multiply));
    moe_profile_end(span);
    MOE_TRY(update_gates(t));
    if (t->loss_scaling)
        moe_scaler_update(&t->scaler);
    t->num_updates++;
    t->lr = t->c->lr_scheduler->lr_at(t->sched, t->num_updates);
    *updated = 1;

    double now = moe_mono_s();
    double wall = now - step_start + t->wall_pending;
    t->wall_pending = 0.0;
    if (ntokens > 0) {
        log_update(t, t->inner, red, ntokens, nsentences, batch_count, gnorm, clipped, wall, now);
        log_update(t, t->epoch_m, red, ntokens, nsentences, batch_count, gnorm, clipped, wall, now);
    }
    h->backend->reset_peak(h->ctx);
    char progress[96];
    snprintf(progress, sizeof progress, "epoch %03d: %lld / %lld updates, loss %.3f", t->epoch,
             (long long)t->num_updates, (long long)t->max_update,
             ntokens > 0 ? red[MOE_STAT_LOSS] / ntokens / log(2.0) : 0.0);
    moe_progress_update(progress);
    if (t->log_interval > 0 && t->num_updates % t->log_interval == 0) {
        emit(t, t->inner, "train_inner", "", 1, now);
        moe_meters_reset(t->inner, moe_mono_s());
        if (t->tb_on || t->log_load)
            MOE_TRY(log_expert_load(t));
    }
    return MOE_OK;
}

/* One update inside the profile's bracket (core/profile.h), with the
 * routing counted when it is an update TensorBoard will show. */
static moe_status train_step(trainer *t, int *updated)
{
    int64_t u = t->num_updates + 1;
    t->load_collect = t->log_load || (t->tb_on && t->log_interval > 0 && u % t->log_interval == 0);
    moe_profile_step_begin(u);
    int span = moe_profile_begin(MOE_PROF_STEP, "update");
    moe_status st = train_step_inner(t, updated);
    moe_profile_end(span);
    t->load_collect = 0;
    MOE_TRY(st);
    return moe_profile_step_end(t->num_updates);
}

/* fairseq's validate_and_save, after every step: validate at the end of every
 * --validate-interval'th epoch, every --validate-interval-updates updates, at
 * mid-epoch saves and when training stops; then save. Returns whether
 * training stops. (fairseq also re-runs the interval checks after a step that
 * overflowed, validating the same update twice; here they follow successful
 * updates only.) */
/* A signal asked to stop (on any rank: every rank sees the same count after
 * the same update's reduction): checkpoint_last on every rank, one line,
 * and training ends normally. */
static moe_status stop_for_signal(trainer *t, int end_of_epoch)
{
    t->preempted = 1;
    int sig = moe_runctl_stop_signal();
    char who[96];
    if (t->h->world <= 1)
        snprintf(who, sizeof who, "%s", moe_runctl_signal_name(sig));
    else if (sig)
        snprintf(who, sizeof who, "%s (signalled on %d of %d ranks, this one included)", moe_runctl_signal_name(sig),
                 t->stop_ranks, t->h->world);
    else
        snprintf(who, sizeof who, "a signal to %d of the %d ranks", t->stop_ranks, t->h->world);
    int no_save = moe_opts_flag(t->o, "no-save") || moe_opts_flag(t->o, "no-last-checkpoints");
    if (!no_save && t->saved_updates != t->num_updates)
        MOE_TRY(save_checkpoints(t, end_of_epoch));
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "stopping after update %lld (epoch %d) as asked by %s: %s",
            (long long)t->num_updates, t->epoch, who,
            no_save ? "no checkpoint written (--no-save or --no-last-checkpoints)"
                    : "checkpoint_last saved on every rank; resume with the same command");
    return MOE_OK;
}

/* fairseq's should_stop_early: --patience N stops once the validation loss
 * has not improved N validations in a row */
static int should_stop_early(trainer *t)
{
    int64_t patience = moe_opts_int(t->o, "patience");
    if (patience <= 0 || isnan(t->valid_loss_now))
        return 0;
    if (isnan(t->patience_best) || t->valid_loss_now < t->patience_best) {
        t->patience_best = t->valid_loss_now;
        t->patience_runs = 0;
        return 0;
    }
    if (++t->patience_runs < patience)
        return 0;
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "early stop since valid performance hasn't improved for last %lld runs",
            (long long)patience);
    return 1;
}

static moe_status validate_and_save(trainer *t, int end_of_epoch, int updated, int *should_stop)
{
    moe_opts *o = t->o;
    int64_t u = t->num_updates;
    int64_t siu = moe_opts_int(o, "save-interval-updates"), viu = t->validate_interval_updates;
    if (t->stop_ranks > 0) {
        *should_stop = 1;
        return stop_for_signal(t, end_of_epoch);
    }
    *should_stop = t->max_update > 0 && u >= t->max_update;
    double stop_hours = moe_opts_float(o, "stop-time-hours"), hours = (moe_mono_s() - t->t0) / 3600.0;
    if (stop_hours > 0 && hours > stop_hours) {
        moe_log(MOE_LOG_INFO, "fairseq_cli.train",
                "Stopping training due to cumulative_training_time: %g > stop_time_hours: %g hour(s)", hours,
                stop_hours);
        *should_stop = 1;
    }
    double stop_min_lr = moe_opts_float(o, "stop-min-lr");
    if (stop_min_lr >= 0 && t->lr <= stop_min_lr) {
        moe_log(MOE_LOG_INFO, "fairseq_cli.train",
                "stopping training because current learning rate (%g) is smaller than or equal to minimum learning "
                "rate (--stop-min-lr=%g)",
                t->lr, stop_min_lr);
        *should_stop = 1;
    }
    int do_save = (end_of_epoch && t->epoch % moe_opts_int(o, "save-interval") == 0) || *should_stop ||
                  (updated && siu > 0 && u > 0 && u % siu == 0);
    int do_validate = ((!end_of_epoch && do_save) ||
                       (end_of_epoch && t->epoch % moe_opts_int(o, "validate-interval") == 0) || *should_stop ||
                       (updated && viu > 0 && u > 0 && u % viu == 0)) &&
                      !t->disable_validation;
    t->valid_loss_now = NAN;
    if (do_validate && t->validated_at != u) {
        MOE_TRY(validate(t));
        t->validated_at = u;
    }
    *should_stop |= should_stop_early(t);
    if ((do_save || *should_stop) && t->saved_updates != u)
        MOE_TRY(save_checkpoints(t, end_of_epoch));
    return MOE_OK;
}

static moe_status train_loop(trainer *t)
{
    int should_stop = 0;
    MOE_TRY(begin_epoch(t));
    if (t->iter >= t->batches_per_epoch) { /* resumed at the end of an epoch */
        t->epoch++;
        t->iter = 0;
        MOE_TRY(begin_epoch(t));
    }
    while (!should_stop && (t->max_epoch <= 0 || t->epoch <= t->max_epoch)) {
        if (t->max_update > 0 && t->num_updates >= t->max_update)
            break;
        int any = 0;
        while (t->iter < t->batches_per_epoch) {
            int updated;
            MOE_TRY(moe_runctl_check_launcher());
            MOE_TRY(train_step(t, &updated));
            any = 1;
            MOE_TRY(validate_and_save(t, t->iter >= t->batches_per_epoch, updated, &should_stop));
            if (should_stop)
                break;
        }
        moe_progress_clear();
        if (any)
            MOE_TRY(end_of_epoch(t));
        if (should_stop)
            break;
        t->epoch++;
        t->iter = 0;
        if (t->max_epoch > 0 && t->epoch > t->max_epoch)
            break;
        MOE_TRY(begin_epoch(t));
    }
    moe_progress_clear();
    return MOE_OK;
}

moe_status moe_train(moe_runtime *rt, const moe_components *c)
{
    trainer t;
    memset(&t, 0, sizeof t);
    t.rt = rt;
    t.h = moe_runtime_host(rt);
    t.c = c;
    t.o = moe_runtime_opts(rt);
    t.t0 = moe_mono_s();
    t.log_moe = c->criterion_name && strncmp(c->criterion_name, "moe_", 4) == 0;
    t.saved_updates = 0; /* nothing to save before the first update */
    t.valid_loss_now = NAN;
    t.validated_at = -1;
    t.patience_best = NAN;
    moe_status st = setup(&t);
    if (st == MOE_OK)
        st = load_checkpoint(&t);
    if (st == MOE_OK)
        st = train_loop(&t);
    if (st == MOE_OK)
        st = moe_profile_finish();
    if (st == MOE_OK)
        moe_log(MOE_LOG_INFO, "fairseq_cli.train", "done training in %.1f seconds", moe_mono_s() - t.t0);
    teardown(&t);
    return st;
}
