/* test_runctl.c: moelm-train under the signals and conditions of a shared
 * cluster, run as a user would (core/runctl.h): SIGTERM/SIGUSR1 finish the
 * update, save checkpoint_last and exit 0, on one rank or on all of 2 MPI
 * ranks whichever was signalled; a second signal ends the process at once;
 * SIGINT ends it without saving unless --save-on-sigint; --save-dir checked
 * before anything runs; --patience, --stop-time-hours and --log-file; ranks
 * stop without writing when mpirun is killed.
 *
 * Processes are started with fork/exec so the test holds their pids; output
 * goes to files in a fresh directory under /tmp, polled for the line that
 * says training has begun.
 */
#include <dirent.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "runcmd.h"

#define MODEL                                                                                                    \
    "--cpu --task dummy_lm --tokens-per-sample 16 --dict-size 28 --arch transformer_lm_gpt "                     \
    "--decoder-layers 2 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2 "          \
    "--moe-expert-count 4 --moe-freq 2 --criterion moe_cross_entropy --optimizer adam --lr 0.001 "               \
    "--batch-size 2 --disable-validation --no-progress-bar "

static char g_dir[64];
static int have_mpirun;

typedef struct proc {
    pid_t pid;
    char out[160], err[160];
} proc;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return calloc(1, 1);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)(n > 0 ? n : 0) + 1);
    size_t got = buf && n > 0 ? fread(buf, 1, (size_t)n, f) : 0;
    if (buf)
        buf[got] = '\0';
    fclose(f);
    return buf;
}

/* Starts `cmd` (a shell command line, exec'ed so the pid is its own) with
 * stdout and stderr in files named after `tag`. */
static void start(proc *p, const char *tag, const char *cmd)
{
    snprintf(p->out, sizeof p->out, "%s/%s.out", g_dir, tag);
    snprintf(p->err, sizeof p->err, "%s/%s.err", g_dir, tag);
    char *line = malloc(strlen(cmd) + 400);
    assert_non_null(line);
    sprintf(line, "exec %s >%s 2>%s", cmd, p->out, p->err);
    p->pid = fork();
    assert_true(p->pid >= 0);
    if (p->pid == 0) {
        execl("/bin/sh", "sh", "-c", line, (char *)NULL);
        _exit(127);
    }
    free(line);
}

/* Waits until `needle` is in p's stdout (fails after `timeout` seconds). */
static void wait_for_line(const proc *p, const char *needle, double timeout)
{
    double t0 = now_s();
    for (;;) {
        char *text = slurp(p->out);
        int found = strstr(text, needle) != NULL;
        free(text);
        if (found)
            return;
        int status;
        if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
            char *err = slurp(p->err);
            fail_msg("the process ended before printing \"%s\": %s", needle, err);
        }
        if (now_s() - t0 > timeout)
            fail_msg("no \"%s\" after %g s", needle, timeout);
        sleep_ms(20);
    }
}

/* Waits for p; returns the raw wait status (fails after `timeout` s, killing it). */
static int finish(const proc *p, double timeout)
{
    double t0 = now_s();
    int status;
    while (waitpid(p->pid, &status, WNOHANG) != p->pid) {
        if (now_s() - t0 > timeout) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &status, 0);
            fail_msg("still running after %g s", timeout);
        }
        sleep_ms(20);
    }
    return status;
}

static int exists(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* "... stopping after update 37 (epoch 1) ..." -> 37 */
static long stopped_at(const char *text)
{
    const char *s = strstr(text, "stopping after update ");
    if (!s)
        fail_msg("no stop line in:\n%s", text);
    return strtol(s + strlen("stopping after update "), NULL, 10);
}

static void rm_rf(const char *dir)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/moelm-test-runctl-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    rm_rf(g_dir);
    return 0;
}

/* The resumed run's "loaded checkpoint" update count. */
static long resume_updates(const char *launcher)
{
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s%s/moelm-train " MODEL "--max-update 1 --save-dir %s --no-save", launcher,
             MOE_TEST_BIN_DIR, g_dir);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    const char *s = strstr(r.out, "loaded checkpoint ");
    if (r.status != 0 || !s || !strstr(s, " @ "))
        fail_msg("resume failed (status %d):\n%s\n%s", r.status, r.out, r.err);
    long u = strtol(strstr(s, " @ ") + 3, NULL, 10);
    moe_cmd_result_free(&r);
    return u;
}

static void stop_by(int sig, const char *extra)
{
    proc p;
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 100000000 --save-dir %s %s", MOE_TEST_BIN_DIR,
             g_dir, extra);
    start(&p, "run", cmd);
    wait_for_line(&p, "max tokens per GPU", 60);
    sleep_ms(300); /* some updates */
    kill(p.pid, sig);
    int status = finish(&p, 60);
    char *out = slurp(p.out), *err = slurp(p.err);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("expected exit 0 after the signal, found status 0x%x:\n%s", status, err);
    long u = stopped_at(out);
    assert_true(u > 0);
    char want[96];
    snprintf(want, sizeof want, "as asked by %s: checkpoint_last saved", sig == SIGTERM   ? "SIGTERM"
                                                                         : sig == SIGUSR1 ? "SIGUSR1"
                                                                                          : "SIGINT");
    if (!strstr(out, want))
        fail_msg("no \"%s\" in:\n%s", want, out);
    assert_int_equal(moe_count_lines(out, "stopping after update"), 1);
    assert_true(exists("checkpoint_last-rank-0.pt"));
    free(out);
    free(err);
    assert_int_equal(resume_updates(""), u);
}

static void test_runctl_sigterm_saves_and_exits_0(void **s)
{
    (void)s;
    stop_by(SIGTERM, "");
}

static void test_runctl_sigusr1_saves_and_exits_0(void **s)
{
    (void)s;
    stop_by(SIGUSR1, "");
}

static void test_runctl_sigint_saves_only_when_asked(void **s)
{
    (void)s;
    stop_by(SIGINT, "--save-on-sigint");
    rm_rf(g_dir);
    assert_int_equal(mkdir(g_dir, 0700), 0);
    /* today's behaviour: the default action, nothing saved */
    proc p;
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 100000000 --save-dir %s", MOE_TEST_BIN_DIR,
             g_dir);
    start(&p, "int", cmd);
    wait_for_line(&p, "max tokens per GPU", 60);
    kill(p.pid, SIGINT);
    int status = finish(&p, 60);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT);
    assert_false(exists("checkpoint_last-rank-0.pt"));
}

static void test_runctl_second_signal_exits_at_once(void **s)
{
    (void)s;
    proc p;
    char cmd[1400];
    /* updates of about a second, so the second signal arrives while the
     * first one's update is still running (signals sent back to back would
     * merge into one pending signal) */
    snprintf(cmd, sizeof cmd,
             "%s/moelm-train " MODEL "--max-update 100000000 --save-dir %s --decoder-embed-dim 128 "
             "--decoder-ffn-embed-dim 256 --tokens-per-sample 128 --dict-size 200 --batch-size 4",
             MOE_TEST_BIN_DIR, g_dir);
    start(&p, "twice", cmd);
    wait_for_line(&p, "max tokens per GPU", 60);
    sleep_ms(100);
    kill(p.pid, SIGTERM);
    sleep_ms(50);
    kill(p.pid, SIGTERM);
    int status = finish(&p, 60);
    if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM))
        fail_msg("expected the process to end by the second SIGTERM, found status 0x%x", status);
}

/* Two MPI ranks, only rank 1 signalled: both save the same update, and a
 * 2-rank run resumes from it. */
static void test_runctl_signal_to_one_rank_stops_all(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        return;
    }
    proc p;
    char cmd[1400];
    snprintf(cmd, sizeof cmd,
             "mpirun --oversubscribe -np 2 %s/moelm-train " MODEL "--max-update 100000000 --save-dir %s",
             MOE_TEST_BIN_DIR, g_dir);
    start(&p, "ranks", cmd);
    wait_for_line(&p, "max tokens per GPU", 120);
    sleep_ms(300);
    /* rank 1: the second moelm-train child of mpirun */
    pid_t ranks[2] = {0, 0};
    int n = 0;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL && n < 2) {
        char path[300], comm[64] = "";
        long ppid = 0;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fscanf(f, "%*d (%63[^)]) %*c %ld", comm, &ppid) == 2 && ppid == (long)p.pid &&
            strcmp(comm, "moelm-train") == 0)
            ranks[n++] = (pid_t)strtol(e->d_name, NULL, 10);
        fclose(f);
    }
    if (d)
        closedir(d);
    assert_int_equal(n, 2);
    /* which of the two is rank 1 does not matter: one rank is signalled */
    kill(ranks[1], SIGTERM);
    int status = finish(&p, 120);
    char *out = slurp(p.out), *err = slurp(p.err);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("expected exit 0, found status 0x%x:\n%s", status, err);
    long u = stopped_at(out);
    assert_non_null(strstr(out, "of the 2 ranks") ? strstr(out, "of the 2 ranks") : strstr(out, "of 2 ranks"));
    assert_true(exists("checkpoint_last-rank-0.pt") && exists("checkpoint_last-rank-1.pt"));
    free(out);
    free(err);
    /* every rank's file is of the same save: a 2-rank run loads them */
    assert_int_equal(resume_updates("mpirun --oversubscribe -np 2 "), u);
}

/* mpirun killed: the ranks notice and stop without writing (before, they
 * trained on for seconds, saving every update). */
static void test_runctl_ranks_stop_when_mpirun_dies(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        return;
    }
    proc p;
    char cmd[1400];
    snprintf(cmd, sizeof cmd,
             "mpirun --oversubscribe -np 2 %s/moelm-train " MODEL
             "--max-update 100000000 --save-dir %s --save-interval-updates 1 --keep-interval-updates 1 "
             "--no-last-checkpoints",
             MOE_TEST_BIN_DIR, g_dir);
    start(&p, "orphan", cmd);
    wait_for_line(&p, "saved checkpoint", 120);
    kill(p.pid, SIGKILL);
    int status;
    waitpid(p.pid, &status, 0);
    /* the newest interval checkpoint when mpirun died, and 3 s later */
    long first = -1, last = -1;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            sleep(3);
        long best = -1;
        DIR *d = opendir(g_dir);
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            long ep, up;
            if (sscanf(e->d_name, "checkpoint_%ld_%ld-rank-", &ep, &up) == 2 && up > best)
                best = up;
        }
        if (d)
            closedir(d);
        if (pass == 0)
            first = best;
        else
            last = best;
    }
    if (last > first + 2)
        fail_msg("the ranks kept saving after mpirun died: update %ld then %ld", first, last);
}

static void expect_save_dir_refused(const char *dir, const char *needle)
{
    char cmd[8000];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 1 --save-dir '%s'", MOE_TEST_BIN_DIR, dir);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 2 || !strstr(r.err, needle) || strncmp(r.err, "moelm-train: error: --save-dir '", 32) != 0)
        fail_msg("expected exit 2 and \"%s\", found status %d:\n%s", needle, r.status, r.err);
    /* refused before any work */
    assert_null(strstr(r.out, "training on"));
    moe_cmd_result_free(&r);
}

static void test_runctl_save_dir_checked_at_start(void **s)
{
    (void)s;
    char file[128], dir[128];
    snprintf(file, sizeof file, "%s/a-file", g_dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    expect_save_dir_refused(file, "found a file that is not a directory");
    snprintf(dir, sizeof dir, "%s/a-file/sub", g_dir);
    expect_save_dir_refused(dir, "found a path through a file");
    /* a 5,000-character path: the reason survives the long value */
    static char longdir[5100];
    snprintf(longdir, sizeof longdir, "%s/", g_dir);
    size_t n = strlen(longdir);
    memset(longdir + n, 'x', 5000);
    longdir[n + 5000] = '\0';
    expect_save_dir_refused(longdir, "File name too long");
    if (geteuid() != 0) { /* root writes anywhere */
        snprintf(dir, sizeof dir, "%s/ro", g_dir);
        assert_int_equal(mkdir(dir, 0500), 0);
        expect_save_dir_refused(dir, "no file can be created");
    } else {
        printf("SKIP (read-only --save-dir): running as root, which can write anyway\n");
    }
    /* a missing directory is created, and --no-save checks nothing */
    snprintf(dir, sizeof dir, "%s/new/sub", g_dir);
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 1 --save-dir %s", MOE_TEST_BIN_DIR, dir);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_equal(r.status, 0);
    moe_cmd_result_free(&r);
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 1 --no-save --save-dir %s", MOE_TEST_BIN_DIR,
             file);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_equal(r.status, 0);
    moe_cmd_result_free(&r);
}

/* --patience 2 with a constant validation loss (lr 0): the first validation
 * sets the best, the next two do not improve on it, training stops there. */
static void test_runctl_patience_stops_early(void **s)
{
    (void)s;
    char cmd[1400];
    snprintf(cmd, sizeof cmd,
             "%s/moelm-train --cpu --task dummy_lm --tokens-per-sample 16 --dict-size 28 --arch transformer_lm_gpt "
             "--decoder-layers 2 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2 "
             "--criterion cross_entropy --optimizer adam --lr 0 --batch-size 2 --no-progress-bar --max-update 50 "
             "--validate-interval-updates 1 --max-valid-steps 1 --patience 2 --no-save",
             MOE_TEST_BIN_DIR);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 0 || !strstr(r.out, "early stop since valid performance hasn't improved for last 2 runs"))
        fail_msg("status %d:\n%s\n%s", r.status, r.out, r.err);
    assert_non_null(strstr(r.out, "num_updates 3 |"));
    assert_null(strstr(r.out, "num_updates 4 |"));
    moe_cmd_result_free(&r);
}

static void test_runctl_stop_time_hours_and_log_file(void **s)
{
    (void)s;
    char cmd[1400], log[128];
    snprintf(log, sizeof log, "%s/train.log", g_dir);
    snprintf(cmd, sizeof cmd,
             "%s/moelm-train " MODEL "--max-update 100000000 --no-save --stop-time-hours 0.0002 --log-file %s",
             MOE_TEST_BIN_DIR, log);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 0 || !strstr(r.out, "Stopping training due to cumulative_training_time: "))
        fail_msg("status %d:\n%s\n%s", r.status, r.out, r.err);
    assert_true(r.seconds < 30);
    /* the log file holds every line of the run */
    char *copy = slurp(log);
    assert_int_equal(moe_count_lines(copy, " | "), moe_count_lines(r.out, " | "));
    assert_non_null(strstr(copy, "Stopping training due to cumulative_training_time"));
    assert_non_null(strstr(copy, "done training"));
    free(copy);
    moe_cmd_result_free(&r);
    /* an unwritable log file is an argument error */
    snprintf(cmd, sizeof cmd, "%s/moelm-train " MODEL "--max-update 1 --no-save --log-file %s/no/such/dir/x.log",
             MOE_TEST_BIN_DIR, g_dir);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_equal(r.status, 2);
    assert_non_null(strstr(r.err, "--log-file"));
    moe_cmd_result_free(&r);
}

int main(void)
{
    have_mpirun = moe_mpirun_prepare();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_runctl_sigterm_saves_and_exits_0, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_sigusr1_saves_and_exits_0, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_sigint_saves_only_when_asked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_second_signal_exits_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_signal_to_one_rank_stops_all, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_ranks_stop_when_mpirun_dies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_save_dir_checked_at_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_patience_stops_early, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runctl_stop_time_hours_and_log_file, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
