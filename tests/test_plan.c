/* test_plan.c: the parallel plan (core/plan.h) for world sizes and expert
 * counts: which experts each rank holds, the all-to-all and replica groups
 * (recorded by a stand-in communicator), how units are sharded, the
 * expert-gradient scale, and the layouts it refuses.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/plan.h"

#define MAX_GROUPS 16
#define MAX_RANKS 16

/* What group_create was asked for, in order; a group is handed back only to
 * its members, as the communicators do. */
struct moe_comm {
    int rank;
    int n_groups;
    int n[MAX_GROUPS];
    int ranks[MAX_GROUPS][MAX_RANKS];
    int handles[MAX_GROUPS]; /* &handles[g] is group g's moe_group */
};

static moe_status fake_group_create(moe_comm *c, const int *ranks, int n, moe_group **g)
{
    assert_true(c->n_groups < MAX_GROUPS && n <= MAX_RANKS);
    const int k = c->n_groups++;
    c->n[k] = n;
    memcpy(c->ranks[k], ranks, (size_t)n * sizeof *ranks);
    *g = NULL;
    for (int i = 0; i < n; i++)
        if (ranks[i] == c->rank)
            *g = (moe_group *)&c->handles[k];
    return MOE_OK;
}

static moe_comm_ops fake_ops(void)
{
    moe_comm_ops ops;
    memset(&ops, 0, sizeof ops);
    ops.group_create = fake_group_create;
    return ops;
}

static double divide_by_n(int n) { return (double)n; }
static const moe_normalizer_ops by_n = {divide_by_n};

static moe_parallel_plan plan_of(int world, int rank, int experts, int fully_sharded)
{
    moe_parallel_plan_spec s;
    memset(&s, 0, sizeof s);
    s.world = world;
    s.rank = rank;
    s.experts = experts;
    s.fully_sharded = fully_sharded;
    moe_parallel_plan p;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_OK);
    return p;
}

/* 8 experts on 1, 2, 4 and 8 ranks: E/W consecutive experts each, every
 * expert on exactly one rank, tokens exchanged with the whole world */
static void test_plan_experts_spread_over_ranks(void **state)
{
    (void)state;
    static const int worlds[] = {1, 2, 4, 8};
    for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
        const int W = worlds[w];
        int seen[8] = {0};
        for (int r = 0; r < W; r++) {
            moe_parallel_plan p = plan_of(W, r, 8, 0);
            assert_int_equal(p.experts, 8);
            assert_int_equal(p.local_experts, 8 / W);
            assert_int_equal(p.a2a_world, W);
            assert_int_equal(p.replicas, 1);
            for (int j = 0; j < p.local_experts; j++) {
                assert_int_equal(p.local_ids[j], r * (8 / W) + j);
                seen[p.local_ids[j]]++;
            }
            moe_comm c = {.rank = r};
            moe_comm_ops ops = fake_ops();
            assert_int_equal(moe_parallel_plan_create_groups(&p, &ops, &c), MOE_OK);
            assert_int_equal(c.n_groups, 0); /* the world is the only group */
            assert_null(p.a2a_group);
            assert_null(p.replica_group);
            moe_parallel_plan_free(&p);
        }
        for (int e = 0; e < 8; e++)
            assert_int_equal(seen[e], 1);
    }
}

/* 4 experts on 8 ranks: rank r holds a replica of expert r mod 4; the
 * all-to-all groups are the blocks {0..3} and {4..7}, the replicas of expert
 * i are ranks i and i+4, created in that order on every rank */
static void test_plan_replicas_when_fewer_experts_than_ranks(void **state)
{
    (void)state;
    for (int r = 0; r < 8; r++) {
        moe_parallel_plan p = plan_of(8, r, 4, 1);
        assert_int_equal(p.local_experts, 1);
        assert_int_equal(p.local_ids[0], r % 4);
        assert_int_equal(p.a2a_world, 4);
        assert_int_equal(p.replicas, 2);
        moe_comm c = {.rank = r};
        moe_comm_ops ops = fake_ops();
        assert_int_equal(moe_parallel_plan_create_groups(&p, &ops, &c), MOE_OK);
        assert_int_equal(c.n_groups, 2 + 4);
        for (int g = 0; g < 2; g++) {
            assert_int_equal(c.n[g], 4);
            for (int k = 0; k < 4; k++)
                assert_int_equal(c.ranks[g][k], 4 * g + k);
        }
        for (int i = 0; i < 4; i++) {
            assert_int_equal(c.n[2 + i], 2);
            assert_int_equal(c.ranks[2 + i][0], i);
            assert_int_equal(c.ranks[2 + i][1], i + 4);
        }
        assert_ptr_equal(p.a2a_group, (moe_group *)&c.handles[r / 4]);
        assert_ptr_equal(p.replica_group, (moe_group *)&c.handles[2 + r % 4]);
        moe_parallel_plan_free(&p);
    }
}

/* A model without MoE layers: no experts, no groups, nothing replicated. */
static void test_plan_without_experts(void **state)
{
    (void)state;
    moe_parallel_plan p = plan_of(4, 3, 0, 1);
    assert_int_equal(p.experts, 0);
    assert_int_equal(p.local_experts, 0);
    assert_null(p.local_ids);
    assert_int_equal(p.replicas, 1);
    moe_comm c = {.rank = 3};
    moe_comm_ops ops = fake_ops();
    assert_int_equal(moe_parallel_plan_create_groups(&p, &ops, &c), MOE_OK);
    assert_int_equal(c.n_groups, 0);
    moe_parallel_plan_free(&p);
}

/* fully_sharded over 4 ranks: a non-expert unit of 10 elements is padded to
 * 12, rank r holds [3r, 3r+3); expert units and empty units stay whole, and
 * so does everything without fully_sharded or on one rank */
static void test_plan_unit_sharding(void **state)
{
    (void)state;
    for (int r = 0; r < 4; r++) {
        moe_parallel_plan p = plan_of(4, r, 4, 1);
        assert_int_equal(p.shards, 4);
        moe_unit_layout l = moe_parallel_plan_unit(&p, -1, 10);
        assert_true(l.sharded);
        assert_int_equal(l.padded, 12);
        assert_int_equal(l.shard, 3);
        assert_int_equal(l.start, 3 * r);
        l = moe_parallel_plan_unit(&p, r, 10);
        assert_false(l.sharded);
        assert_int_equal(l.padded, 10);
        assert_int_equal(l.shard, 10);
        assert_int_equal(l.start, 0);
        l = moe_parallel_plan_unit(&p, -1, 0);
        assert_false(l.sharded);
        assert_int_equal(l.shard, 0);
        moe_parallel_plan_free(&p);

        p = plan_of(4, r, 4, 0);
        assert_int_equal(p.shards, 1);
        l = moe_parallel_plan_unit(&p, -1, 10);
        assert_false(l.sharded);
        assert_int_equal(l.padded, 10);
        assert_int_equal(l.shard, 10);
        assert_int_equal(l.start, 0);
        moe_parallel_plan_free(&p);
    }
    moe_parallel_plan p = plan_of(1, 0, 2, 1);
    assert_true(p.fully_sharded);
    assert_int_equal(p.shards, 1);
    assert_false(moe_parallel_plan_unit(&p, -1, 10).sharded);
    moe_parallel_plan_free(&p);
}

/* The normalizer sees the data-parallel world over the replicas (§2.9);
 * legacy_ddp divides by the world whatever the normalizer; without a
 * normalizer nothing trains and the scale is 1. */
static void test_plan_expert_grad_scale(void **state)
{
    (void)state;
    moe_parallel_plan_spec s;
    memset(&s, 0, sizeof s);
    s.world = 8;
    s.rank = 5;
    s.experts = 8;
    s.normalizer = &by_n;
    moe_parallel_plan p;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_OK);
    assert_true(p.expert_grad_scale == (float)(1.0 / 8.0));
    moe_parallel_plan_free(&p);
    s.experts = 4;
    s.fully_sharded = 1;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_OK);
    assert_true(p.expert_grad_scale == (float)(1.0 / 4.0));
    moe_parallel_plan_free(&p);
    s.legacy_ddp = 1;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_OK);
    assert_true(p.expert_grad_scale == (float)(1.0 / 8.0));
    moe_parallel_plan_free(&p);
    s.legacy_ddp = 0;
    s.normalizer = NULL;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_OK);
    assert_true(p.expert_grad_scale == 1.0f);
    moe_parallel_plan_free(&p);
}

static void test_plan_refuses_layouts_the_world_cannot_hold(void **state)
{
    (void)state;
    moe_parallel_plan_spec s;
    memset(&s, 0, sizeof s);
    s.world = 4;
    s.experts = 6;
    moe_parallel_plan p;
    moe_error_clear();
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "--moe-expert-count 6 on 4 ranks"));
    assert_non_null(strstr(moe_error_message(), "use e.g. 4 or 8 experts"));
    assert_null(p.local_ids);
    moe_error_clear();
    s.experts = 8;
    s.rank = 4;
    assert_int_equal(moe_parallel_plan_build(&s, &p), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "expected a rank in 0..3"));
    moe_error_clear();
    assert_int_equal(moe_parallel_plan_check(3, 12), MOE_OK);
    assert_int_equal(moe_parallel_plan_check(24, 12), MOE_OK);
    assert_int_equal(moe_parallel_plan_check(0, 12), MOE_OK);
    assert_int_equal(moe_parallel_plan_check(5, 12), MOE_ERR_INVALID_ARG);
    moe_error_clear();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_experts_spread_over_ranks),
        cmocka_unit_test(test_plan_replicas_when_fewer_experts_than_ranks),
        cmocka_unit_test(test_plan_without_experts),
        cmocka_unit_test(test_plan_unit_sharding),
        cmocka_unit_test(test_plan_expert_grad_scale),
        cmocka_unit_test(test_plan_refuses_layouts_the_world_cannot_hold),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
