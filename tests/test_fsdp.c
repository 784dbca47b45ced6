/* test_fsdp.c: --ddp-backend fully_sharded in the parameter store
 * (core/runtime.c), on 2 MPI ranks of the cpu backend.
 *
 * What is checked, on every rank: between updates a sharded unit holds only
 * this rank's shard of parameters and gradient (the allocator's byte count
 * says so, and the whole buffers are NULL); unit_gather all-gathers exactly
 * the parameters a one-process runtime initialises (padding zero); nested
 * gathers communicate once; the whole gradient appears zeroed when first
 * asked for, and the outermost release reduce-scatters it (averaged over the
 * ranks, fairseq's FSDP) into the shard, adding to what is there, left in flight until the
 * next release (or finish_reductions, or the unit's next gradient), then
 * everything it gathered is freed; a gather that wrote no gradient leaves
 * the shard alone; a prefetch starts the all-gather that the next gather
 * completes, and one left unused is dropped when the next update zeroes the
 * gradients; expert units are never sharded; misuse is refused with a message.
 *
 * Run by CTest without MPI around it, the binary starts itself under
 * `mpirun -np 2` (or skips, saying so, when there is no mpirun).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/runtime.h"
#include "moe/plugin.h"

#define RANKS 2

typedef struct store {
    moe_runtime *rt;
    const moe_host *h;
    int dense, expert;        /* unit ids */
    int w, b, e;              /* param ids: dense 5x5 weight + 3 bias (28 elements), expert 2x4 */
} store;

static void check_ok(moe_status st, const char *what)
{
    if (st != MOE_OK)
        fprintf(stderr, "%s failed: %s\n", what, moe_error_message());
    assert_int_equal(st, MOE_OK);
}

/* 28 + 3 = 31 dense elements: odd, so 2 shards need one element of padding */
static void make_store(store *s, int sharded)
{
    const char *args_sharded[] = {"--distributed-backend", "mpi", "--ddp-backend", "fully_sharded", "--seed", "7"};
    const char *args_single[] = {"--seed", "7"};
    if (sharded)
        check_ok(moe_runtime_create_for_test(6, args_sharded, &s->rt), "runtime (mpi, fully_sharded)");
    else
        check_ok(moe_runtime_create_for_test(2, args_single, &s->rt), "runtime (single)");
    s->h = moe_runtime_host(s->rt);
    const moe_host *h = s->h;
    check_ok(h->unit_add(h, "dense", -1, &s->dense), "unit_add dense");
    moe_param_def w = {"dense.weight", 2, {5, 5}, MOE_INIT_UNIFORM, 0.5f, -1};
    moe_param_def b = {"dense.bias", 1, {6, 0}, MOE_INIT_NORMAL, 0.1f, -1};
    check_ok(h->param_add(h, s->dense, &w, &s->w), "param_add weight");
    check_ok(h->param_add(h, s->dense, &b, &s->b), "param_add bias");
    check_ok(h->unit_add(h, "expert.0", 0, &s->expert), "unit_add expert");
    moe_param_def e = {"expert.0.fc1.weight", 2, {2, 4}, MOE_INIT_UNIFORM, 0.3f, -1};
    check_ok(h->param_add(h, s->expert, &e, &s->e), "param_add expert");
    check_ok(moe_runtime_alloc_params(s->rt), "alloc_params");
}

static uint64_t allocated(const store *s)
{
    moe_mem_stats m;
    s->h->backend->memory_stats(s->h->ctx, &m);
    return m.allocated;
}

static void test_fsdp_gather_release(void **state)
{
    (void)state;
    store s, ref;
    make_store(&s, 1);
    const moe_host *h = s.h;
    assert_int_equal(h->world, RANKS);
    const int rank = h->rank;

    moe_unit_info u;
    moe_runtime_unit(s.rt, s.dense, &u);
    assert_true(u.sharded);
    assert_int_equal(u.numel, 31);
    assert_int_equal(u.padded, 32);
    assert_int_equal(u.shard, 16);
    assert_null(u.param);
    assert_null(u.grad);
    assert_non_null(u.param_shard);
    assert_non_null(u.grad_shard);
    assert_null(h->param_data(h, s.w)); /* outside a gather: refused (and logged) */
    assert_null(h->grad_data(h, s.b));
    moe_unit_info ue;
    moe_runtime_unit(s.rt, s.expert, &ue);
    assert_false(ue.sharded);
    assert_non_null(ue.param);
    assert_non_null(h->param_data(h, s.e));

    /* the one-process runtime initialises the same values */
    make_store(&ref, 0);
    float want[32] = {0}, got[32];
    check_ok(ref.h->backend->copy_to_host(ref.h->ctx, want, ref.h->unit_data(ref.h, ref.dense), 31 * 4), "copy");
    float shard[16];
    check_ok(h->backend->copy_to_host(h->ctx, shard, u.param_shard, sizeof shard), "copy shard");
    assert_memory_equal(shard, want + rank * 16, sizeof shard);

    const uint64_t base = allocated(&s);
    check_ok(h->unit_gather(h, s.dense), "gather");
    assert_int_equal(allocated(&s) - base, 32 * 4);
    check_ok(h->unit_gather(h, s.dense), "nested gather");
    assert_int_equal(allocated(&s) - base, 32 * 4);
    void *whole = h->unit_data(h, s.dense);
    assert_non_null(whole);
    assert_ptr_equal(h->param_data(h, s.w), whole);
    check_ok(h->backend->copy_to_host(h->ctx, got, whole, sizeof got), "copy gathered");
    assert_memory_equal(got, want, sizeof got); /* padding element 31 is 0 in both */

    /* expert units: whole and untouched by gather/release */
    check_ok(h->unit_gather(h, s.expert), "gather expert");
    check_ok(h->unit_release(h, s.expert), "release expert");
    assert_non_null(h->param_data(h, s.e));

    /* the whole gradient, zeroed; rank r writes (r+1) * (i+1) */
    float *g = h->grad_data(h, s.w);
    assert_non_null(g);
    assert_int_equal(allocated(&s) - base, 32 * 4 * 2);
    float gh[32];
    check_ok(h->backend->copy_to_host(h->ctx, gh, g, sizeof gh), "copy grad");
    for (int i = 0; i < 32; i++)
        assert_true(gh[i] == 0.0f);
    for (int i = 0; i < 32; i++)
        gh[i] = (float)((rank + 1) * (i + 1));
    check_ok(h->backend->copy_from_host(h->ctx, g, gh, sizeof gh), "write grad");
    assert_ptr_equal(h->grad_data(h, s.b), (float *)g + 25);

    check_ok(h->unit_release(h, s.dense), "inner release");
    assert_non_null(h->unit_data(h, s.dense)); /* still gathered */
    check_ok(h->unit_release(h, s.dense), "outer release");
    assert_null(h->unit_data(h, s.dense));
    assert_null(h->param_data(h, s.w));
    /* the reduce-scatter is in flight: the whole gradient and the staging
     * shard live on, the shard is not yet touched */
    assert_int_equal(allocated(&s) - base, (32 + 16) * 4);
    float gs[16];
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy grad shard");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 0.0f);

    /* the next release completes it; a gather that writes no gradient adds nothing */
    check_ok(h->unit_gather(h, s.dense), "gather 2");
    check_ok(h->unit_release(h, s.dense), "release 2");
    assert_int_equal(allocated(&s), base);
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy grad shard 2");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 1.5f * (float)(rank * 16 + i + 1)); /* (1 + 2) * (i + 1) / 2: the mean over ranks */

    /* one that does adds, once the trainer finishes the reductions */
    check_ok(h->unit_gather(h, s.dense), "gather 3");
    float *g3 = h->unit_grad(h, s.dense);
    assert_non_null(g3);
    check_ok(h->backend->copy_from_host(h->ctx, g3, gh, sizeof gh), "write grad 3");
    check_ok(h->unit_release(h, s.dense), "release 3");
    check_ok(moe_runtime_finish_reductions(s.rt), "finish reductions");
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy grad shard 3");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 3.0f * (float)(rank * 16 + i + 1));
    assert_int_equal(allocated(&s), base);

    /* a gradient asked for again while the last one is on its way waits for it */
    check_ok(h->unit_gather(h, s.dense), "gather 4");
    check_ok(h->backend->copy_from_host(h->ctx, h->unit_grad(h, s.dense), gh, sizeof gh), "write grad 4");
    check_ok(h->unit_release(h, s.dense), "release 4");
    check_ok(h->unit_gather(h, s.dense), "gather 5");
    float *g5 = h->unit_grad(h, s.dense);
    assert_non_null(g5);
    check_ok(h->backend->copy_to_host(h->ctx, gh, g5, sizeof gh), "copy grad 5");
    for (int i = 0; i < 32; i++)
        assert_true(gh[i] == 0.0f); /* a fresh whole gradient */
    check_ok(h->unit_release(h, s.dense), "release 5");
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy grad shard 5");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 4.5f * (float)(rank * 16 + i + 1));
    check_ok(moe_runtime_finish_reductions(s.rt), "finish reductions 5"); /* the zero gradient of gather 5 */
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy grad shard 5b");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 4.5f * (float)(rank * 16 + i + 1));
    assert_int_equal(allocated(&s), base);

    /* a prefetch starts the gather; the gather that follows waits for it */
    check_ok(h->unit_prefetch(h, s.dense), "prefetch");
    assert_int_equal(allocated(&s) - base, 32 * 4);
    check_ok(h->unit_prefetch(h, s.dense), "prefetch again");
    assert_int_equal(allocated(&s) - base, 32 * 4);
    check_ok(h->unit_gather(h, s.dense), "gather after prefetch");
    assert_int_equal(allocated(&s) - base, 32 * 4);
    check_ok(h->backend->copy_to_host(h->ctx, got, h->unit_data(h, s.dense), sizeof got), "copy prefetched");
    assert_memory_equal(got, want, sizeof got);
    check_ok(h->unit_prefetch(h, s.dense), "prefetch while gathered");
    check_ok(h->unit_release(h, s.dense), "release after prefetch");
    assert_int_equal(allocated(&s), base);
    check_ok(h->unit_prefetch(h, s.expert), "prefetch expert");
    assert_int_equal(allocated(&s), base);
    /* a prefetch no gather used is dropped at the next update */
    check_ok(h->unit_prefetch(h, s.dense), "unused prefetch");
    assert_int_equal(allocated(&s) - base, 32 * 4);

    /* zeroing between updates clears the shard (and drops that prefetch) */
    check_ok(moe_runtime_zero_grads(s.rt), "zero grads");
    check_ok(h->backend->copy_to_host(h->ctx, gs, u.grad_shard, sizeof gs), "copy zeroed shard");
    for (int i = 0; i < 16; i++)
        assert_true(gs[i] == 0.0f);
    assert_int_equal(allocated(&s), base);
    assert_null(h->unit_data(h, s.dense));

    /* misuse */
    moe_error_clear();
    assert_int_equal(h->unit_release(h, s.dense), MOE_ERR_INTERNAL);
    assert_non_null(strstr(moe_error_message(), "without a matching unit_gather"));
    moe_error_clear();
    assert_int_equal(h->unit_gather(h, 99), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "no unit with id 99"));

    moe_runtime_destroy(ref.rt);
    moe_runtime_destroy(s.rt);
}

/* fairscale's pre/post division: the mean, with the largest partial sum small */
static void test_fsdp_reduce_factors(void **state)
{
    (void)state;
    static const int n[] = {1, 2, 4, 8, 16, 64, 512, 6, 12};
    static const double pre[] = {1, 2, 2, 4, 4, 8, 32, 4, 4};
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++) {
        double a, b;
        moe_reduce_factors(n[i], &a, &b);
        if (a != pre[i] || a * b != n[i])
            fail_msg("%d ranks: pre %g post %g, expected pre %g, post %g", n[i], a, b, pre[i], n[i] / pre[i]);
    }
}

int main(int argc, char **argv)
{
    if (!getenv("OMPI_COMM_WORLD_SIZE") && !getenv("PMI_SIZE")) {
        /* not inside MPI: run this binary on RANKS ranks */
        if (system("command -v mpirun >/dev/null 2>&1") != 0) {
            printf("SKIP: mpirun not found\n");
            return 77;
        }
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
        char cmd[4096];
        snprintf(cmd, sizeof cmd, "mpirun --oversubscribe -np %d %s", RANKS, argv[0]);
        int rc = system(cmd);
        return rc == 0 ? 0 : 1;
    }
    (void)argc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fsdp_gather_release),
        cmocka_unit_test(test_fsdp_reduce_factors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
