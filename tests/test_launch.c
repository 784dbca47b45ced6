/* test_launch.c: launch detection from the environment, with the variables a
 * launcher would set written by hand (FAIRSEQ_SPEC.md §7.4). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/launch.h"
#include "core/internal.h"

static const char *const all_vars[] = {
    "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_NTASKS",
    "SLURM_NODEID",        "SLURM_PROCID",       "SLURM_LOCALID", "RANK",                 "WORLD_SIZE",
    "MASTER_ADDR",         "MASTER_PORT",        "LOCAL_RANK",    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE",    "PMI_RANK",      "PMIX_SIZE",            "PMIX_RANK"};

static moe_opts *opts_from(const char *const *args, int n)
{
    for (size_t i = 0; i < sizeof all_vars / sizeof all_vars[0]; i++)
        unsetenv(all_vars[i]);
    moe_opts *o;
    assert_int_equal(moe_opts_create(&o), MOE_OK);
    char *argv[16] = {(char *)"moelm-train"};
    for (int i = 0; i < n; i++)
        argv[i + 1] = (char *)args[i];
    assert_int_equal(moe_opts_parse(o, n + 1, argv, 0), MOE_OK);
    return o;
}

static void test_launch_single_process(void **s)
{
    (void)s;
    moe_opts *o = opts_from(NULL, 0);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 1, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_SINGLE);
    assert_int_equal(l.world, 1);
    moe_opts_destroy(o);
}

static void test_launch_slurm_task_per_gpu(void **s)
{
    (void)s;
    const char *args[] = {"--distributed-port", "12345"};
    moe_opts *o = opts_from(args, 2);
    /* salloc --nodes 8 --ntasks-per-node 8: this task is rank 13, local 5 on node 1 */
    setenv("SLURM_JOB_NODELIST", "learnfair[0103-0105,0200],other7", 1);
    setenv("SLURM_NNODES", "8", 1);
    setenv("SLURM_NTASKS_PER_NODE", "8", 1);
    setenv("SLURM_PROCID", "13", 1);
    setenv("SLURM_LOCALID", "5", 1);
    setenv("SLURM_NODEID", "1", 1);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 8, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_SLURM);
    assert_int_equal(l.world, 64);
    assert_int_equal(l.rank, 13);
    assert_int_equal(l.local_rank, 5);
    assert_int_equal(l.spawn, 0);
    assert_string_equal(l.master_addr, "learnfair0103");
    assert_int_equal(l.master_port, 12345);
    /* fairseq asserts tasks per node == visible GPUs */
    assert_int_equal(moe_launch_detect(o, 4, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "8 tasks per node but 4 visible devices"));
    moe_error_clear();
    moe_opts_destroy(o);
}

static void test_launch_slurm_one_task_per_node_spawns(void **s)
{
    (void)s;
    const char *args[] = {"--distributed-port", "2222"};
    moe_opts *o = opts_from(args, 2);
    setenv("SLURM_STEP_NODELIST", "node7", 1);
    setenv("SLURM_NNODES", "2", 1);
    setenv("SLURM_NTASKS", "2", 1);
    setenv("SLURM_NODEID", "1", 1);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 4, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_SLURM);
    assert_int_equal(l.world, 8);
    assert_int_equal(l.spawn, 4);
    assert_int_equal(l.spawn_base_rank, 4);
    assert_string_equal(l.master_addr, "node7");
    moe_opts_destroy(o);
}

static void test_launch_torchrun_variables(void **s)
{
    (void)s;
    moe_opts *o = opts_from(NULL, 0);
    setenv("RANK", "3", 1);
    setenv("WORLD_SIZE", "4", 1);
    setenv("LOCAL_RANK", "1", 1);
    setenv("MASTER_ADDR", "10.1.2.3", 1);
    setenv("MASTER_PORT", "29500", 1);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 2, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_ENV);
    assert_int_equal(l.world, 4);
    assert_int_equal(l.rank, 3);
    assert_int_equal(l.local_rank, 1);
    assert_string_equal(l.master_addr, "10.1.2.3");
    assert_int_equal(l.master_port, 29500);
    setenv("RANK", "4", 1);
    assert_int_equal(moe_launch_detect(o, 2, &l), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "RANK=4 and WORLD_SIZE=4"));
    moe_error_clear();
    moe_opts_destroy(o);
}

static void test_launch_mpirun_variables(void **s)
{
    (void)s;
    moe_opts *o = opts_from(NULL, 0);
    setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
    setenv("OMPI_COMM_WORLD_RANK", "2", 1);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 1, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_MPI);
    assert_int_equal(l.world, 4);
    assert_int_equal(l.rank, 2);
    moe_opts_destroy(o);
}

static void test_launch_single_node_spawn(void **s)
{
    (void)s;
    const char *args[] = {"--distributed-world-size", "8"};
    moe_opts *o = opts_from(args, 2);
    moe_launch l;
    assert_int_equal(moe_launch_detect(o, 8, &l), MOE_OK);
    assert_int_equal(l.method, MOE_LAUNCH_SPAWN);
    assert_int_equal(l.spawn, 8);
    assert_string_equal(l.master_addr, "127.0.0.1");
    assert_true(l.master_port >= 10000 && l.master_port < 20000);
    moe_opts_destroy(o);
}

static void test_launch_slurm_first_host(void **s)
{
    (void)s;
    char h[64];
    assert_int_equal(moe_slurm_first_host("gpu[003-010,012],cpu1", h, sizeof h), MOE_OK);
    assert_string_equal(h, "gpu003");
    assert_int_equal(moe_slurm_first_host("a1,a2", h, sizeof h), MOE_OK);
    assert_string_equal(h, "a1");
    assert_int_equal(moe_slurm_first_host("", h, sizeof h), MOE_ERR_INVALID_ARG);
    moe_error_clear();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_launch_single_process),      cmocka_unit_test(test_launch_slurm_task_per_gpu),
        cmocka_unit_test(test_launch_slurm_one_task_per_node_spawns), cmocka_unit_test(test_launch_torchrun_variables),
        cmocka_unit_test(test_launch_mpirun_variables),    cmocka_unit_test(test_launch_single_node_spawn),
        cmocka_unit_test(test_launch_slurm_first_host),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
