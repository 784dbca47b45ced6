/* test_peer_monitor.c: the NCCL communicator's rendezvous and rank watchdog
 * (plugins/communicators/peer_monitor.c) with real processes and sockets on
 * 127.0.0.1, no GPU and no NCCL.
 *
 * Each case forks three ranks. A rank "waits in a collective" from the moment
 * it is connected and, like nccl.c's watchdog, reports it stuck after TIMEOUT;
 * the parent kills or stops one of them and reads what every rank's on_fail
 * said, through a pipe, with the time it took. The assertions are on the exact
 * rank named and on the elapsed time: a death is reported at once, a stall
 * after the timeout plus the grace for answers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "plugins/communicators/peer_monitor.h"

#define WORLD 3
#define TIMEOUT 2.0
#define GRACE 1.0
#define MSG_MAX 700

typedef enum scenario {
    SC_COLLECTIVE, /* every rank waits in a collective and reports it stuck after TIMEOUT */
    SC_BYE,        /* every rank finishes normally, at different times */
    SC_EXITED      /* rank 2 finishes; ranks 0 and 1 still wait in a collective */
} scenario;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------ a rank */

static int child_report_fd = -1;
static int child_rank;
static atomic_int child_failed;

/* one write() of one line: atomic on a pipe, so ranks never interleave */
static void child_say(const char *kind, const char *msg)
{
    char line[MSG_MAX + 32];
    int n = snprintf(line, sizeof line, "%s %d %s\n", kind, child_rank, msg ? msg : "");
    if (write(child_report_fd, line, (size_t)n) < 0) {
        /* the parent is gone; nothing to report to */
    }
}

static void child_on_fail(void *user, const char *msg)
{
    (void)user;
    child_say("F", msg);
    atomic_store(&child_failed, 1);
}

static int child_activity(void *user, char *buf, size_t n)
{
    (void)user;
    snprintf(buf, n, "rank %d waits in test collective #1", child_rank);
    return 1;
}

/* wait up to s seconds; returns 1 as soon as on_fail has fired */
static int child_wait(double s)
{
    double end = now_s() + s;
    while (now_s() < end) {
        if (atomic_load(&child_failed))
            return 1;
        sleep_s(0.01);
    }
    return atomic_load(&child_failed);
}

static void child_main(int rank, int port, scenario sc)
{
    child_rank = rank;
    moe_peer_monitor_cfg cfg = {rank, WORLD, "127.0.0.1", port, TIMEOUT, GRACE, "the test id",
                                child_on_fail, child_activity, NULL};
    unsigned char blob[128];
    for (int i = 0; i < 128; i++)
        blob[i] = rank == 0 ? (unsigned char)(i * 7 + 1) : 0;
    moe_peer_monitor *m = NULL;
    char err[MSG_MAX];
    if (moe_peer_monitor_open(&cfg, blob, sizeof blob, &m, err, sizeof err) != MOE_OK) {
        child_say("E", err);
        _exit(0);
    }
    for (int i = 0; i < 128; i++)
        if (blob[i] != (unsigned char)(i * 7 + 1)) {
            child_say("E", "the blob arrived changed");
            _exit(0);
        }
    child_say("U", NULL);
    if (sc == SC_BYE || (sc == SC_EXITED && rank == 2)) {
        /* rank 2 leaves first, then rank 0 (the hub), rank 1 last */
        static const double leave_at[WORLD] = {0.7, 1.1, 0.3};
        if (!child_wait(sc == SC_BYE ? leave_at[rank] : 0.3)) {
            moe_peer_monitor_close(m, 1);
            child_say("D", NULL);
        }
        _exit(0);
    }
    if (!child_wait(TIMEOUT)) {
        char what[128];
        snprintf(what, sizeof what, "test collective #1 timed out after %.0f s on rank %d", TIMEOUT, rank);
        moe_peer_monitor_stuck(m, what);
        child_wait(10.0);
    }
    /* like nccl.c: a rank that failed ends without closing (no goodbye) */
    if (!atomic_load(&child_failed))
        moe_peer_monitor_close(m, 1);
    _exit(0);
}

/* ------------------------------------------------------------ the parent */

typedef struct outcome {
    int up[WORLD], done[WORLD], n_fail[WORLD], n_err[WORLD];
    char fail[WORLD][MSG_MAX], err[WORLD][MSG_MAX];
    double fail_t[WORLD], err_t[WORLD]; /* seconds after the action */
    int port;
} outcome;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

typedef struct reader {
    int fd;
    char buf[8 * MSG_MAX];
    size_t fill;
    int eof;
} reader;

/* Read lines until `deadline`; stop early once done_fn says so. */
static void read_lines(reader *rd, outcome *o, double t0, double deadline, int (*done_fn)(const outcome *, int),
                       int arg)
{
    while (!rd->eof && !(done_fn && done_fn(o, arg))) {
        double left = deadline - now_s();
        if (left <= 0)
            break;
        struct pollfd pf = {rd->fd, POLLIN, 0};
        if (poll(&pf, 1, (int)(left * 1000) + 1) <= 0)
            continue;
        if (rd->fill + 1 >= sizeof rd->buf)
            break;
        ssize_t k = read(rd->fd, rd->buf + rd->fill, sizeof rd->buf - rd->fill - 1);
        if (k <= 0) {
            rd->eof = 1;
            break;
        }
        rd->fill += (size_t)k;
        char *nl;
        while ((nl = memchr(rd->buf, '\n', rd->fill)) != NULL) {
            *nl = '\0';
            char kind = rd->buf[0];
            int r = atoi(rd->buf + 2);
            const char *msg = strchr(rd->buf + 2, ' ');
            msg = msg ? msg + 1 : "";
            double t = now_s() - t0;
            if (r >= 0 && r < WORLD) {
                if (kind == 'U')
                    o->up[r] = 1;
                else if (kind == 'D')
                    o->done[r] = 1;
                else if (kind == 'F' && o->n_fail[r]++ == 0) {
                    snprintf(o->fail[r], MSG_MAX, "%s", msg);
                    o->fail_t[r] = t;
                } else if (kind == 'E' && o->n_err[r]++ == 0) {
                    snprintf(o->err[r], MSG_MAX, "%s", msg);
                    o->err_t[r] = t;
                }
            }
            size_t used = (size_t)(nl + 1 - rd->buf);
            memmove(rd->buf, nl + 1, rd->fill - used);
            rd->fill -= used;
        }
    }
}

/* every started rank is connected or has failed to */
static int all_up(const outcome *o, int mask)
{
    for (int r = 0; r < WORLD; r++)
        if ((mask >> r & 1) && !o->up[r] && !o->n_err[r])
            return 0;
    return 1;
}

/* every rank in mask has said its last word */
static int all_ended(const outcome *o, int mask)
{
    for (int r = 0; r < WORLD; r++)
        if ((mask >> r & 1) && !o->done[r] && !o->n_fail[r] && !o->n_err[r])
            return 0;
    return 1;
}

/* Start the ranks in `started`; once they are connected, send `sig` to rank
 * `victim` (sig 0: none) and collect until every rank in `expect` has ended.
 * Times in the outcome count from that moment. */
static void run_ranks(scenario sc, int started, int victim, int sig, int expect, outcome *o)
{
    memset(o, 0, sizeof *o);
    o->port = free_port();
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid[WORLD] = {0};
    for (int r = 0; r < WORLD; r++) {
        if (!(started >> r & 1))
            continue;
        pid[r] = fork();
        assert_true(pid[r] >= 0);
        if (pid[r] == 0) {
            close(p[0]);
            child_report_fd = p[1];
            child_main(r, o->port, sc);
        }
    }
    close(p[1]);
    reader rd = {p[0], {0}, 0, 0};
    double t0 = now_s();
    read_lines(&rd, o, t0, t0 + TIMEOUT + 5.0, all_up, started);
    t0 = now_s();
    if (sig && pid[victim] > 0)
        kill(pid[victim], sig);
    read_lines(&rd, o, t0, t0 + TIMEOUT + 2 * GRACE + 5.0, all_ended, expect);
    /* a second report from one rank would show up by now */
    read_lines(&rd, o, t0, now_s() + 0.2, NULL, 0);
    for (int r = 0; r < WORLD; r++)
        if (pid[r] > 0) {
            kill(pid[r], SIGKILL);
            waitpid(pid[r], NULL, 0);
        }
    close(p[0]);
}

/* rank `r` reported exactly once, "<what it was doing>: <culprit>", within
 * [lo, hi] seconds of the action */
static void expect_fail(const outcome *o, int r, const char *culprit, double lo, double hi)
{
    char stuck[128], waiting[128];
    snprintf(stuck, sizeof stuck, "test collective #1 timed out after %.0f s on rank %d", TIMEOUT, r);
    snprintf(waiting, sizeof waiting, "rank %d waits in test collective #1", r);
    print_message("rank %d after %.2f s: %s\n", r, o->fail_t[r], o->fail[r]);
    assert_int_equal(o->n_fail[r], 1);
    const char *sep = strstr(o->fail[r], ": ");
    assert_non_null(sep);
    assert_string_equal(sep + 2, culprit);
    char head[MSG_MAX];
    snprintf(head, sizeof head, "%.*s", (int)(sep - o->fail[r]), o->fail[r]);
    assert_true(strcmp(head, stuck) == 0 || strcmp(head, waiting) == 0);
    assert_true(o->fail_t[r] >= lo);
    assert_true(o->fail_t[r] <= hi);
}

static void expect_quiet(const outcome *o, int r)
{
    assert_int_equal(o->n_fail[r], 0);
    assert_int_equal(o->n_err[r], 0);
}

static void test_peer_monitor_killed_rank_named_at_once(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_COLLECTIVE, 07, 2, SIGKILL, 03, &o);
    expect_fail(&o, 0, "rank 2 died (its connection closed)", 0.0, 1.5);
    expect_fail(&o, 1, "rank 2 died (its connection closed)", 0.0, 1.5);
}

static void test_peer_monitor_stopped_rank_named_after_timeout(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_COLLECTIVE, 07, 1, SIGSTOP, 05, &o);
    expect_fail(&o, 0, "rank 1 stalled (no answer to the watchdog)", TIMEOUT - 0.5, TIMEOUT + GRACE + 1.0);
    expect_fail(&o, 2, "rank 1 stalled (no answer to the watchdog)", TIMEOUT - 0.5, TIMEOUT + GRACE + 1.0);
    assert_int_equal(o.n_fail[1], 0);
}

static void test_peer_monitor_killed_rank0_named_at_once(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_COLLECTIVE, 07, 0, SIGKILL, 06, &o);
    expect_fail(&o, 1, "rank 0 died (its connection closed)", 0.0, 1.5);
    expect_fail(&o, 2, "rank 0 died (its connection closed)", 0.0, 1.5);
}

static void test_peer_monitor_stopped_rank0_named_after_timeout(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_COLLECTIVE, 07, 0, SIGSTOP, 06, &o);
    expect_fail(&o, 1, "rank 0 stalled (no answer to the watchdog)", TIMEOUT - 0.5, TIMEOUT + GRACE + 1.0);
    expect_fail(&o, 2, "rank 0 stalled (no answer to the watchdog)", TIMEOUT - 0.5, TIMEOUT + GRACE + 1.0);
}

static void test_peer_monitor_normal_exit_not_reported(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_BYE, 07, 0, 0, 07, &o);
    for (int r = 0; r < WORLD; r++) {
        expect_quiet(&o, r);
        assert_int_equal(o.done[r], 1);
    }
}

static void test_peer_monitor_exited_rank_named_when_waited_for(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_EXITED, 07, 0, 0, 07, &o);
    expect_quiet(&o, 2);
    assert_int_equal(o.done[2], 1);
    /* every rank still connected answers at once: no grace to wait out */
    expect_fail(&o, 0, "rank 2 exited (finished while the others still wait)", TIMEOUT - 0.5, TIMEOUT + 1.0);
    expect_fail(&o, 1, "rank 2 exited (finished while the others still wait)", TIMEOUT - 0.5, TIMEOUT + 1.0);
}

static void test_peer_monitor_rendezvous_names_missing_rank(void **s)
{
    (void)s;
    outcome o;
    run_ranks(SC_COLLECTIVE, 03, 0, 0, 03, &o); /* rank 2 never starts */
    char want[200];
    snprintf(want, sizeof want, "rendezvous on port %d timed out after %.0f s: rank(s) 2 never arrived", o.port,
             TIMEOUT);
    for (int r = 0; r < 2; r++) {
        print_message("rank %d: %s\n", r, o.err[r]);
        assert_int_equal(o.n_err[r], 1);
        assert_string_equal(o.err[r], want);
        assert_int_equal(o.n_fail[r], 0);
        assert_true(o.err_t[r] >= TIMEOUT - 0.5 && o.err_t[r] <= TIMEOUT + 2.0);
    }
}

int main(void)
{
    /* a rank that has gone must not take the parent with it */
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_peer_monitor_killed_rank_named_at_once),
        cmocka_unit_test(test_peer_monitor_stopped_rank_named_after_timeout),
        cmocka_unit_test(test_peer_monitor_killed_rank0_named_at_once),
        cmocka_unit_test(test_peer_monitor_stopped_rank0_named_after_timeout),
        cmocka_unit_test(test_peer_monitor_normal_exit_not_reported),
        cmocka_unit_test(test_peer_monitor_exited_rank_named_when_waited_for),
        cmocka_unit_test(test_peer_monitor_rendezvous_names_missing_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
