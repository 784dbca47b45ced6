/* peer_monitor.c: the rendezvous and the rank watchdog of peer_monitor.h.
 *
 * Wire format. Rendezvous: a rank says {magic, rank}; rank 0 answers {magic,
 * status, length} and then the blob (status 0) or the one-line reason the
 * rendezvous failed (status 1), so every rank prints the same reason. Later:
 * frames {type, a, b, length} + up to MAX_TEXT bytes of text, integers in
 * network order. Frames are tiny and rare (a handful per failure), so the
 * sockets are non-blocking for reading and a write that cannot finish within
 * half a second is given up: a rank that stops reading is found by its
 * missing answers, not by a blocked writer.
 *
 * Only the monitor's thread touches the sockets between open and close; the
 * owner's threads reach it through stop_req/stuck_req under `mu` and a
 * self-pipe that wakes its poll. It sleeps in poll with no timeout unless a
 * question is out, so an idle run costs nothing.
 *
 * A rank that said goodbye (BYE) is not reported when its connection closes:
 * ranks finish at slightly different times. It is named only if someone is
 * still stuck in a collective afterwards ("exited"). Rank 0 relays every
 * verdict: the star has no other links, so once rank 0 has said goodbye, a
 * rank that is stuck can only name rank 0.
 */
#include "peer_monitor.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HELLO_MAGIC 0x6d6f6577u /* "moew" */
#define MAX_TEXT 480
#define FRAME_HEAD 16

enum { MSG_STUCK = 1, MSG_ACK, MSG_PING, MSG_PONG, MSG_ABORT, MSG_BYE };

enum { PEER_LIVE = 0, PEER_BYE, PEER_DEAD };

typedef struct peer_conn {
    int fd;     /* -1 once closed */
    int state;  /* PEER_* */
    int answered, pending; /* in the current PING round (rank 0) */
    unsigned char rx[FRAME_HEAD + MAX_TEXT];
    size_t fill;
} peer_conn;

struct moe_peer_monitor {
    moe_peer_monitor_cfg cfg;
    double grace;
    peer_conn *conns; /* rank 0: indexed by rank (0 unused); other ranks: [0] is rank 0 */
    int nconn;
    struct pollfd *pfd;
    int *pfd_conn;
    int wake[2];
    pthread_t thread;
    int thread_started;

    pthread_mutex_t mu;
    int stop_req, stuck_req; /* under mu */
    char stuck_what[256];    /* under mu */

    /* the thread's own */
    int failed, stuck_seen;
    int round_active;
    uint32_t nonce;
    double round_deadline;
    int stuck_sent, acked;
    double ack_deadline, verdict_deadline;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int ms_until(double deadline)
{
    double ms = (deadline - now_s()) * 1000.0;
    if (ms <= 0)
        return 0;
    return ms > 1e9 ? 1000000000 : (int)ms + 1;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static moe_status say(char *err, size_t n, moe_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
    return st;
}

static void put32(unsigned char *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

/* Blocking-style transfer of exactly n bytes on a socket of either mode,
 * giving up at the deadline. */
static int full_io(int fd, void *buf, size_t n, int writing, double deadline)
{
    char *p = buf;
    while (n > 0) {
        struct pollfd pf = {fd, (short)(writing ? POLLOUT : POLLIN), 0};
        int ms = ms_until(deadline);
        if (ms <= 0)
            return -1;
        int k = poll(&pf, 1, ms);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        ssize_t got = writing ? send(fd, p, n, MSG_NOSIGNAL) : read(fd, p, n);
        if (got < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (got <= 0)
            return -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

/* Descriptors must not leak into programs a rank starts: a child holding a
 * copy would keep a dead rank's connection open. */
static void set_cloexec(int fd) { fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC); }

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* "rank 3" or "ranks 1, 3" */
static void rank_list(char *buf, size_t n, const int *ranks, int k)
{
    size_t o = (size_t)snprintf(buf, n, "%s", k == 1 ? "rank " : "ranks ");
    for (int i = 0; i < k && o + 16 < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%d", i ? ", " : "", ranks[i]);
}

/* ------------------------------------------------------------ rendezvous */

static void root_reply(int fd, int32_t status, const void *data, size_t n, double deadline)
{
    unsigned char head[12];
    put32(head, HELLO_MAGIC);
    put32(head + 4, (uint32_t)status);
    put32(head + 8, (uint32_t)n);
    if (full_io(fd, head, sizeof head, 1, deadline) == 0)
        full_io(fd, (void *)data, n, 1, deadline);
}

static moe_status rendezvous_root(moe_peer_monitor *m, const void *blob, size_t n, char *err, size_t en)
{
    const moe_peer_monitor_cfg *c = &m->cfg;
    int world = c->world, port = c->port;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons((uint16_t)port);
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, world) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return say(err, en, MOE_ERR_COMM,
                   "rank 0 cannot listen on port %d: %s (choose another --distributed-port / MASTER_PORT)", port,
                   strerror(e));
    }
    set_cloexec(fd);
    int got = 1;
    double deadline = now_s() + c->timeout_s;
    while (got < world) {
        struct pollfd pf = {fd, POLLIN, 0};
        int ms = ms_until(deadline);
        if (ms <= 0)
            break;
        int k = poll(&pf, 1, ms);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        int cfd = accept(fd, NULL, NULL);
        if (cfd < 0)
            continue;
        set_cloexec(cfd);
        /* a stray connection that says nothing must not use up the whole wait */
        double hello_deadline = now_s() + 5.0 < deadline ? now_s() + 5.0 : deadline;
        unsigned char hello[8];
        if (full_io(cfd, hello, sizeof hello, 0, hello_deadline) != 0 || get32(hello) != HELLO_MAGIC) {
            close(cfd);
            continue;
        }
        int r = (int)get32(hello + 4);
        if (r <= 0 || r >= world || m->conns[r].fd >= 0) {
            close(cfd);
            continue;
        }
        m->conns[r].fd = cfd;
        got++;
    }
    close(fd);
    if (got < world) {
        char missing[400] = "";
        size_t o = 0;
        for (int r = 1; r < world && o + 16 < sizeof missing; r++)
            if (m->conns[r].fd < 0)
                o += (size_t)snprintf(missing + o, sizeof missing - o, "%s%d", o ? ", " : "", r);
        say(err, en, MOE_ERR_COMM, "rendezvous on port %d timed out after %.0f s: rank(s) %s never arrived", port,
            c->timeout_s, missing);
        /* the ranks that came fail with the same reason instead of "broke off" */
        double reply_deadline = now_s() + 1.0;
        for (int r = 1; r < world; r++)
            if (m->conns[r].fd >= 0)
                root_reply(m->conns[r].fd, 1, err, strlen(err), reply_deadline);
        return MOE_ERR_COMM;
    }
    deadline = now_s() + c->timeout_s;
    for (int r = 1; r < world; r++) {
        unsigned char head[12];
        put32(head, HELLO_MAGIC);
        put32(head + 4, 0);
        put32(head + 8, (uint32_t)n);
        if (full_io(m->conns[r].fd, head, sizeof head, 1, deadline) != 0 ||
            full_io(m->conns[r].fd, (void *)blob, n, 1, deadline) != 0)
            return say(err, en, MOE_ERR_COMM, "rendezvous: sending %s to rank %d failed", c->blob_name, r);
    }
    return MOE_OK;
}

/* connect() that gives up at the deadline (a host that drops packets would
 * otherwise hold a blocking connect for minutes) */
static int connect_by(const struct addrinfo *ai, double deadline)
{
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0)
        return -1;
    set_cloexec(fd);
    set_nonblock(fd);
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
            close(fd);
            return -1;
        }
        struct pollfd pf = {fd, POLLOUT, 0};
        int e = 0;
        socklen_t el = sizeof e;
        int ms = ms_until(deadline);
        if (ms <= 0 || poll(&pf, 1, ms) <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el) != 0 || e != 0) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static moe_status rendezvous_peer(moe_peer_monitor *m, void *blob, size_t n, char *err, size_t en)
{
    const moe_peer_monitor_cfg *c = &m->cfg;
    char ports[16];
    snprintf(ports, sizeof ports, "%d", c->port);
    double deadline = now_s() + c->timeout_s;
    while (now_s() < deadline) {
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        int fd = -1;
        if (getaddrinfo(c->host, ports, &hints, &res) == 0) {
            fd = connect_by(res, deadline);
            freeaddrinfo(res);
        }
        if (fd < 0) {
            sleep_s(0.1);
            continue;
        }
        /* rank 0 answers by the end of its own wait, which began before we got in */
        double reply_deadline = now_s() + c->timeout_s + 1.0;
        unsigned char hello[8], head[12];
        put32(hello, HELLO_MAGIC);
        put32(hello + 4, (uint32_t)c->rank);
        if (full_io(fd, hello, sizeof hello, 1, reply_deadline) == 0 &&
            full_io(fd, head, sizeof head, 0, reply_deadline) == 0 && get32(head) == HELLO_MAGIC) {
            uint32_t status = get32(head + 4), len = get32(head + 8);
            if (status == 0 && len == n && full_io(fd, blob, n, 0, reply_deadline) == 0) {
                m->conns[0].fd = fd;
                return MOE_OK;
            }
            char why[MAX_TEXT + 1];
            if (status == 1 && len <= MAX_TEXT && full_io(fd, why, len, 0, reply_deadline) == 0) {
                why[len] = '\0';
                close(fd);
                return say(err, en, MOE_ERR_COMM, "%s", why);
            }
        }
        close(fd);
        return say(err, en, MOE_ERR_COMM, "rendezvous with rank 0 at %s:%d broke off", c->host, c->port);
    }
    return say(err, en, MOE_ERR_COMM, "rank %d could not reach rank 0 at %s:%d within %.0f s: rank 0 never arrived",
               c->rank, c->host, c->port, c->timeout_s);
}

/* ------------------------------------------------------------ the thread */

/* A write that cannot finish soon is given up (see the file comment). */
static int send_frame(peer_conn *pc, uint32_t type, uint32_t a, uint32_t b, const char *text)
{
    if (pc->fd < 0)
        return -1;
    unsigned char buf[FRAME_HEAD + MAX_TEXT];
    size_t len = text ? strnlen(text, MAX_TEXT) : 0;
    put32(buf, type);
    put32(buf + 4, a);
    put32(buf + 8, b);
    put32(buf + 12, (uint32_t)len);
    if (len)
        memcpy(buf + FRAME_HEAD, text, len);
    return full_io(pc->fd, buf, FRAME_HEAD + len, 1, now_s() + 0.5);
}

static void close_conn(peer_conn *pc)
{
    if (pc->fd >= 0)
        close(pc->fd);
    pc->fd = -1;
}

/* The verdict, once: "<what this rank was doing>: <culprit>". */
static void fire(moe_peer_monitor *m, const char *culprit)
{
    if (m->failed)
        return;
    m->failed = 1;
    char head[256], msg[FRAME_HEAD + MAX_TEXT + 256];
    pthread_mutex_lock(&m->mu);
    int stuck = m->stuck_req;
    if (stuck)
        snprintf(head, sizeof head, "%s", m->stuck_what);
    pthread_mutex_unlock(&m->mu);
    if (!stuck) {
        if (m->cfg.activity)
            m->cfg.activity(m->cfg.user, head, sizeof head);
        else
            snprintf(head, sizeof head, "rank %d cannot continue", m->cfg.rank);
    }
    snprintf(msg, sizeof msg, "%s: %s", head, culprit);
    m->cfg.on_fail(m->cfg.user, msg);
}

/* rank 0: tell every rank still there, then ourselves. shutdown() sends the
 * ABORT on its way before this process may end. */
static void fail_all(moe_peer_monitor *m, const char *culprit)
{
    for (int r = 1; r < m->cfg.world; r++) {
        peer_conn *pc = &m->conns[r];
        if (pc->fd >= 0 && pc->state == PEER_LIVE) {
            send_frame(pc, MSG_ABORT, 0, 0, culprit);
            shutdown(pc->fd, SHUT_WR);
        }
    }
    fire(m, culprit);
}

static void start_round(moe_peer_monitor *m)
{
    m->round_active = 1;
    m->nonce++;
    m->round_deadline = now_s() + m->grace;
    for (int r = 1; r < m->cfg.world; r++) {
        peer_conn *pc = &m->conns[r];
        pc->answered = pc->pending = 0;
        if (pc->state == PEER_LIVE)
            send_frame(pc, MSG_PING, m->nonce, 0, NULL);
    }
}

static int own_pending(moe_peer_monitor *m)
{
    char scratch[256];
    if (m->stuck_seen)
        return 1;
    return m->cfg.activity ? m->cfg.activity(m->cfg.user, scratch, sizeof scratch) : 1;
}

/* rank 0, when every rank still connected answered or the grace is over */
static void verdict(moe_peer_monitor *m)
{
    int world = m->cfg.world;
    int *stalled = calloc((size_t)world, sizeof(int)), *exited = calloc((size_t)world, sizeof(int)),
        *idle = calloc((size_t)world, sizeof(int));
    int ns = 0, ne = 0, ni = 0;
    char text[MAX_TEXT], list[MAX_TEXT / 2];
    if (!stalled || !exited || !idle) {
        fail_all(m, "the watchdog ran out of host memory naming the missing rank");
        goto out;
    }
    if (!own_pending(m))
        idle[ni++] = 0;
    for (int r = 1; r < world; r++) {
        const peer_conn *pc = &m->conns[r];
        if (pc->state == PEER_BYE)
            exited[ne++] = r;
        else if (pc->state == PEER_LIVE && !pc->answered)
            stalled[ns++] = r;
        else if (pc->state == PEER_LIVE && !pc->pending)
            idle[ni++] = r;
    }
    size_t o = 0;
    text[0] = '\0';
    if (ns) {
        rank_list(list, sizeof list, stalled, ns);
        o += (size_t)snprintf(text + o, sizeof text - o, "%s stalled (no answer to the watchdog)", list);
    }
    if (ne && o < sizeof text) {
        rank_list(list, sizeof list, exited, ne);
        o += (size_t)snprintf(text + o, sizeof text - o, "%s%s exited (finished while the others still wait)",
                              o ? "; " : "", list);
    }
    if (!ns && !ne) {
        if (ni) {
            rank_list(list, sizeof list, idle, ni);
            snprintf(text, sizeof text, "%s did not join (answers the watchdog but waits in no collective)", list);
        } else {
            snprintf(text, sizeof text, "every rank answers the watchdog and waits in a collective (a hang inside "
                                        "the communication library, or ranks that issued collectives in different "
                                        "orders)");
        }
    }
    fail_all(m, text);
out:
    free(stalled);
    free(exited);
    free(idle);
}

/* rank 0: one whole frame from rank r */
static void root_frame(moe_peer_monitor *m, int r, uint32_t type, uint32_t a, uint32_t b)
{
    peer_conn *pc = &m->conns[r];
    switch (type) {
    case MSG_STUCK:
        send_frame(pc, MSG_ACK, 0, 0, NULL);
        if (!m->round_active)
            start_round(m);
        break;
    case MSG_PONG:
        if (m->round_active && a == m->nonce) {
            pc->answered = 1;
            pc->pending = (int)b;
        }
        break;
    case MSG_BYE:
        pc->state = PEER_BYE;
        close_conn(pc);
        break;
    default:
        break;
    }
}

/* other ranks: one whole frame from rank 0 */
static void peer_frame(moe_peer_monitor *m, uint32_t type, uint32_t a, const char *text)
{
    peer_conn *pc = &m->conns[0];
    char scratch[256];
    if ((type == MSG_PING || type == MSG_ACK) && m->stuck_sent && !m->acked) {
        /* rank 0 is alive (a PING answers our STUCK too); its round ends
         * within one grace of our STUCK */
        m->acked = 1;
        m->verdict_deadline = now_s() + 2.0 * m->grace + 1.0;
    }
    switch (type) {
    case MSG_PING: {
        int pending = m->stuck_seen ||
                      (m->cfg.activity ? m->cfg.activity(m->cfg.user, scratch, sizeof scratch) : 1);
        send_frame(pc, MSG_PONG, a, (uint32_t)pending, NULL);
        break;
    }
    case MSG_ABORT:
        fire(m, text);
        break;
    case MSG_BYE:
        pc->state = PEER_BYE;
        close_conn(pc);
        if (m->stuck_seen)
            fire(m, "rank 0 exited (finished while the others still wait)");
        break;
    default:
        break;
    }
}

/* Read what has arrived on connection i and handle each whole frame.
 * Returns -1 when the connection closed or broke (after its last frames). */
static int pump(moe_peer_monitor *m, int i)
{
    peer_conn *pc = &m->conns[i];
    for (;;) {
        ssize_t k = read(pc->fd, pc->rx + pc->fill, sizeof pc->rx - pc->fill);
        if (k == 0)
            return -1;
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        pc->fill += (size_t)k;
        while (pc->fill >= FRAME_HEAD) {
            uint32_t len = get32(pc->rx + 12);
            if (len > MAX_TEXT)
                return -1; /* not our protocol */
            if (pc->fill < FRAME_HEAD + len)
                break;
            char text[MAX_TEXT + 1];
            memcpy(text, pc->rx + FRAME_HEAD, len);
            text[len] = '\0';
            uint32_t type = get32(pc->rx), a = get32(pc->rx + 4), b = get32(pc->rx + 8);
            pc->fill -= FRAME_HEAD + len;
            memmove(pc->rx, pc->rx + FRAME_HEAD + len, pc->fill);
            if (m->cfg.rank == 0)
                root_frame(m, i, type, a, b);
            else
                peer_frame(m, type, a, text);
            if (m->failed || pc->fd < 0)
                return 0;
        }
    }
}

/* Wait for a socket, the wake pipe or `deadline` (< 0: none); then read the
 * owner's requests. Returns 1 when asked to stop. */
static int wait_events(moe_peer_monitor *m, int *np, double deadline, int *new_stuck)
{
    int n = 0;
    m->pfd[n++] = (struct pollfd){m->wake[0], POLLIN, 0};
    for (int i = 0; i < m->nconn; i++)
        if (m->conns[i].fd >= 0) {
            m->pfd_conn[n] = i;
            m->pfd[n++] = (struct pollfd){m->conns[i].fd, POLLIN, 0};
        }
    if (poll(m->pfd, (nfds_t)n, deadline < 0 ? -1 : ms_until(deadline)) < 0)
        n = 1, m->pfd[0].revents = 0; /* EINTR: look at the requests and wait again */
    if (m->pfd[0].revents) {
        char drain[64];
        while (read(m->wake[0], drain, sizeof drain) > 0) {
        }
    }
    *np = n;
    pthread_mutex_lock(&m->mu);
    int stop = m->stop_req;
    *new_stuck = m->stuck_req && !m->stuck_seen;
    pthread_mutex_unlock(&m->mu);
    if (*new_stuck)
        m->stuck_seen = 1;
    return stop;
}

static void *root_main(void *arg)
{
    moe_peer_monitor *m = arg;
    while (!m->failed) {
        int n, new_stuck;
        if (wait_events(m, &n, m->round_active ? m->round_deadline : -1.0, &new_stuck))
            break;
        if (new_stuck && !m->round_active)
            start_round(m);
        for (int k = 1; k < n && !m->failed; k++) {
            int r = m->pfd_conn[k];
            if (!m->pfd[k].revents || m->conns[r].fd < 0)
                continue;
            if (pump(m, r) < 0 && !m->failed) {
                close_conn(&m->conns[r]);
                if (m->conns[r].state == PEER_LIVE) {
                    char culprit[96];
                    m->conns[r].state = PEER_DEAD;
                    snprintf(culprit, sizeof culprit, "rank %d died (its connection closed)", r);
                    fail_all(m, culprit);
                }
            }
        }
        if (m->failed || !m->round_active)
            continue;
        int waiting = 0;
        for (int r = 1; r < m->cfg.world; r++)
            waiting += m->conns[r].state == PEER_LIVE && !m->conns[r].answered;
        if (!waiting || now_s() >= m->round_deadline)
            verdict(m);
    }
    return NULL;
}

static void *peer_main(void *arg)
{
    moe_peer_monitor *m = arg;
    peer_conn *root = &m->conns[0];
    while (!m->failed) {
        int n, new_stuck;
        double deadline = !m->stuck_sent ? -1.0 : m->acked ? m->verdict_deadline : m->ack_deadline;
        if (wait_events(m, &n, deadline, &new_stuck))
            break;
        if (new_stuck) {
            if (root->state == PEER_BYE) {
                fire(m, "rank 0 exited (finished while the others still wait)");
                break;
            }
            send_frame(root, MSG_STUCK, 0, 0, NULL);
            m->stuck_sent = 1;
            m->ack_deadline = now_s() + m->grace;
        }
        if (n > 1 && m->pfd[1].revents && root->fd >= 0 && pump(m, 0) < 0 && !m->failed) {
            close_conn(root);
            root->state = PEER_DEAD;
            fire(m, "rank 0 died (its connection closed)");
        }
        if (m->failed || !m->stuck_sent)
            continue;
        if (!m->acked && now_s() >= m->ack_deadline)
            fire(m, "rank 0 stalled (no answer to the watchdog)");
        else if (m->acked && now_s() >= m->verdict_deadline)
            fire(m, "rank 0 stalled (its watchdog answered but gave no verdict)");
    }
    return NULL;
}

/* ------------------------------------------------------------ interface */

static void free_monitor(moe_peer_monitor *m)
{
    for (int i = 0; i < m->nconn; i++)
        close_conn(&m->conns[i]);
    if (m->wake[0] >= 0)
        close(m->wake[0]);
    if (m->wake[1] >= 0)
        close(m->wake[1]);
    pthread_mutex_destroy(&m->mu);
    free(m->conns);
    free(m->pfd);
    free(m->pfd_conn);
    free(m);
}

moe_status moe_peer_monitor_open(const moe_peer_monitor_cfg *cfg, void *blob, size_t n, moe_peer_monitor **out,
                                 char *err, size_t err_size)
{
    *out = NULL;
    if (cfg->world < 2 || cfg->rank < 0 || cfg->rank >= cfg->world || !cfg->on_fail || !cfg->host)
        return say(err, err_size, MOE_ERR_INTERNAL,
                   "peer monitor: rank %d of %d without a host or failure callback; it is for 2 or more ranks",
                   cfg->rank, cfg->world);
    moe_peer_monitor *m = calloc(1, sizeof *m);
    if (!m)
        return say(err, err_size, MOE_ERR_NOMEM, "out of host memory");
    m->cfg = *cfg;
    if (!m->cfg.blob_name)
        m->cfg.blob_name = "the rendezvous data";
    m->grace = cfg->grace_s > 0 ? cfg->grace_s : cfg->timeout_s < 5.0 ? cfg->timeout_s : 5.0;
    m->nconn = cfg->rank == 0 ? cfg->world : 1;
    m->wake[0] = m->wake[1] = -1;
    pthread_mutex_init(&m->mu, NULL);
    m->conns = calloc((size_t)m->nconn, sizeof *m->conns);
    m->pfd = calloc((size_t)m->nconn + 1, sizeof *m->pfd);
    m->pfd_conn = calloc((size_t)m->nconn + 1, sizeof *m->pfd_conn);
    if (!m->conns || !m->pfd || !m->pfd_conn) {
        free_monitor(m);
        return say(err, err_size, MOE_ERR_NOMEM, "out of host memory");
    }
    for (int i = 0; i < m->nconn; i++)
        m->conns[i].fd = -1;
    m->conns[0].state = cfg->rank == 0 ? PEER_DEAD : PEER_LIVE; /* rank 0 has no connection to itself */
    if (pipe(m->wake) != 0) {
        int e = errno;
        m->wake[0] = m->wake[1] = -1;
        free_monitor(m);
        return say(err, err_size, MOE_ERR_IO, "peer monitor: cannot create a pipe: %s", strerror(e));
    }
    for (int i = 0; i < 2; i++) {
        set_cloexec(m->wake[i]);
        set_nonblock(m->wake[i]);
    }
    moe_status st = cfg->rank == 0 ? rendezvous_root(m, blob, n, err, err_size)
                                   : rendezvous_peer(m, blob, n, err, err_size);
    if (st != MOE_OK) {
        free_monitor(m);
        return st;
    }
    int one = 1;
    for (int i = 0; i < m->nconn; i++)
        if (m->conns[i].fd >= 0) {
            set_nonblock(m->conns[i].fd);
            setsockopt(m->conns[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
    /* signals stay with the owner's threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&m->thread, NULL, cfg->rank == 0 ? root_main : peer_main, m);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) {
        free_monitor(m);
        return say(err, err_size, MOE_ERR_COMM, "peer monitor: cannot start its thread: %s", strerror(e));
    }
    m->thread_started = 1;
    *out = m;
    return MOE_OK;
}

static void wake(moe_peer_monitor *m)
{
    char b = 1;
    if (write(m->wake[1], &b, 1) < 0) {
        /* full pipe: the thread has a wake-up pending anyway */
    }
}

void moe_peer_monitor_stuck(moe_peer_monitor *m, const char *what)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    int first = !m->stuck_req;
    if (first) {
        m->stuck_req = 1;
        snprintf(m->stuck_what, sizeof m->stuck_what, "%s", what);
    }
    pthread_mutex_unlock(&m->mu);
    if (first)
        wake(m);
}

void moe_peer_monitor_close(moe_peer_monitor *m, int goodbye)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->stop_req = 1;
    pthread_mutex_unlock(&m->mu);
    wake(m);
    pthread_join(m->thread, NULL);
    /* Goodbye, unless we failed (then the others learn it from rank 0 or from
     * our closed connection, at once). Reading what is left before close() makes it a
     * FIN, not a reset that could overtake the BYE. */
    for (int i = 0; i < m->nconn; i++) {
        peer_conn *pc = &m->conns[i];
        if (pc->fd < 0)
            continue;
        if (goodbye && !m->failed && pc->state == PEER_LIVE)
            send_frame(pc, MSG_BYE, 0, 0, NULL);
        shutdown(pc->fd, SHUT_WR);
        char drain[256];
        while (read(pc->fd, drain, sizeof drain) > 0) {
        }
    }
    free_monitor(m);
}
