/* dryrun.c: the planner behind --dry-run (see dryrun.h).
 *
 * Byte counts per GPU are what the runtime allocates (core/runtime.h):
 * parameters and gradients in the compute dtype, plus an fp32 master copy with
 * --fp16/--bf16 (not with the memory-efficient variants), plus the optimizer's
 * own state. With --ddp-backend fully_sharded over W > 1 ranks each
 * non-expert unit is padded to W equal shards (torch.chunk) and only this
 * rank's shard of its parameters, gradient, master copy and optimizer state
 * stays between updates; the arch gathers whole units around their use: the
 * root unit, held from forward to backward, the layer being computed and the
 * next one on its way (prefetch); whole gradients exist for the root, the
 * current layer and the previous one, whose reduce-scatter into a staging
 * shard is still in flight. The plan adds the three largest sharded units
 * whole, as parameters and as gradients, and the largest shard.
 * Expert units are never sharded (§7.2).
 */
#include "core/dryrun.h"

#include <string.h>

#include "core/config.h"
#include "core/internal.h"
#include "core/log.h"

void moe_format_thousands(char *buf, size_t size, int64_t v)
{
    char digits[32];
    int n = snprintf(digits, sizeof digits, "%lld", (long long)(v < 0 ? -v : v));
    size_t o = 0;
    if (v < 0 && o + 1 < size)
        buf[o++] = '-';
    for (int i = 0; i < n && o + 1 < size; i++) {
        buf[o++] = digits[i];
        int left = n - 1 - i;
        if (left > 0 && left % 3 == 0 && o + 1 < size)
            buf[o++] = ',';
    }
    buf[o] = '\0';
}

void moe_log_param_counts(const moe_runtime *rt)
{
    int64_t ne, ex;
    moe_runtime_param_counts(rt, &ne, &ex);
    char a[40], b[40];
    moe_format_thousands(a, sizeof a, ne);
    moe_format_thousands(b, sizeof b, ex);
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "num. non-expert model params: %s (num. trained: %s)", a, a);
    moe_log(MOE_LOG_INFO, "fairseq_cli.train", "num. expert model params: %s (num. trained: %s)", b, b);
}

moe_status moe_plan_compute(moe_runtime *rt, const moe_components *c, moe_plan *plan)
{
    const moe_host *h = moe_runtime_host(rt);
    moe_opts *o = moe_runtime_opts(rt);
    memset(plan, 0, sizeof *plan);
    const moe_parallel_plan *pp = moe_runtime_plan(rt);
    plan->world = pp->world;
    plan->sharded = pp->fully_sharded;

    moe_dtype act, grad;
    int master, scaling;
    moe_config_precision(o, &act, &grad, &master, &scaling);
    double state_per_param = c->optimizer->state_bytes_per_param(h);

    int n = moe_runtime_num_units(rt);
    int64_t largest[3] = {0, 0, 0}, max_shard = 0; /* sharded units gathered whole at the same time */
    for (int i = 0; i < n; i++) {
        moe_unit_info u;
        moe_runtime_unit(rt, i, &u);
        int64_t kept = u.numel; /* elements of this unit held between updates */
        if (u.expert_index >= 0) {
            plan->expert_params += u.numel;
        } else {
            plan->non_expert_params += u.numel;
            if (u.sharded) {
                int64_t padded = u.padded;
                kept = u.shard;
                for (int k = 0; k < 3; k++) /* insert into the three largest, descending */
                    if (padded > largest[k]) {
                        int64_t t = largest[k];
                        largest[k] = padded;
                        padded = t;
                    }
                if (kept > max_shard)
                    max_shard = kept;
            }
        }
        plan->param_bytes += (double)kept * (double)moe_dtype_size(act);
        plan->grad_bytes += (double)kept * (double)moe_dtype_size(grad);
        plan->optim_bytes += (double)kept * (state_per_param + (master ? 4.0 : 0.0));
    }
    plan->param_bytes += (double)(largest[0] + largest[1] + largest[2]) * (double)moe_dtype_size(act);
    plan->grad_bytes += (double)(largest[0] + largest[1] + largest[2] + max_shard) * (double)moe_dtype_size(grad);
    moe_model_info info;
    int64_t T = moe_opts_known(o, "tokens-per-sample") ? moe_opts_int(o, "tokens-per-sample") : 0;
    c->arch->info(c->model, T, &info);
    plan->flops_per_token = info.flops_per_token;
    return MOE_OK;
}

moe_status moe_dry_run(moe_runtime *rt, const moe_components *c, FILE *out)
{
    moe_plan p;
    MOE_TRY(moe_plan_compute(rt, c, &p));
    moe_log_param_counts(rt);
    moe_opts *o = moe_runtime_opts(rt);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    const char *prec = moe_opts_flag(o, "memory-efficient-fp16")   ? "memory-efficient fp16"
                       : moe_opts_flag(o, "memory-efficient-bf16") ? "memory-efficient bf16"
                       : moe_opts_flag(o, "fp16")                  ? "fp16 with fp32 master weights"
                       : moe_opts_flag(o, "bf16")                  ? "bf16 with fp32 master weights"
                                                                   : "fp32";
    fprintf(out, "dry run: world size %d, ddp backend %s, precision %s\n", p.world, moe_opts_str(o, "ddp-backend"),
            prec);
    fprintf(out, "per-GPU bytes: parameters %.0f (%.2f GiB), gradients %.0f (%.2f GiB), optimizer state %.0f "
                 "(%.2f GiB), total %.2f GiB\n",
            p.param_bytes, p.param_bytes / gib, p.grad_bytes, p.grad_bytes / gib, p.optim_bytes, p.optim_bytes / gib,
            (p.param_bytes + p.grad_bytes + p.optim_bytes) / gib);
    fprintf(out, "model FLOPs per token (forward + backward): %.6g\n", p.flops_per_token);
    fflush(out);
    return MOE_OK;
}
