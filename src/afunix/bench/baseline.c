/*
 * afunix bench: the C baseline, compiled at run time by `afunix bench`.
 *
 *   baseline CASE TRANSPORT SIZE COUNT WARMUP DIR
 *
 * One process per side: the parent (the client) sets up the transport, forks
 * the peer, runs WARMUP untimed iterations and then COUNT timed ones, and
 * prints one JSON object on stdout:
 *
 *   {"elapsed_ns": N, "count": N, "bytes": N, "p50_ns": N, "p99_ns": N}
 *
 * (p50/p99 only for the round-trip case). Every message costs one system call
 * on each side (the reader of a stream reads exactly one message per read()),
 * which is what "the C baseline" means in the report: plain code, no batching.
 *
 * CASE       rtt | rate | bulk | fdpass | fdpingpong | large | large-memfd | connect
 * TRANSPORT  unix | unix-path | abstract | seqpacket | dgram | tcp | pipe
 *
 * Exit status 0 on success; otherwise a message on stderr and status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef F_SEAL_SEAL
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif

#define ALL_SEALS (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)

struct end {
    int rfd, wfd; /* the same descriptor for sockets; two pipes otherwise */
};

static const char *g_case, *g_transport;
static char g_path[108];

static void die(const char *what)
{
    fprintf(stderr, "baseline %s/%s: %s: %s\n", g_case, g_transport, what, strerror(errno));
    exit(1);
}

static void fail(const char *what)
{
    fprintf(stderr, "baseline %s/%s: %s\n", g_case, g_transport, what);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int is_tcp(void) { return strcmp(g_transport, "tcp") == 0; }

static void nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("setsockopt(TCP_NODELAY)");
}

/* Write all of buf (one call unless the kernel returns short). */
static void write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        buf += w;
        n -= (size_t)w;
    }
}

/* Read exactly n bytes (one call for a message that is already queued). */
static void read_exact(int fd, char *buf, size_t n)
{
    while (n > 0) {
        ssize_t r = read(fd, buf, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (r == 0)
            fail("unexpected end of stream");
        buf += r;
        n -= (size_t)r;
    }
}

/* Receive one message: a datagram or seqpacket record arrives whole. */
static void recv_msg(int fd, char *buf, size_t n, int records)
{
    if (!records) {
        read_exact(fd, buf, n);
        return;
    }
    ssize_t r;
    do
        r = recv(fd, buf, n, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        die("recv");
    if ((size_t)r != n)
        fail("short record");
}

static socklen_t fill_unix(struct sockaddr_un *sun, int abstract)
{
    memset(sun, 0, sizeof *sun);
    sun->sun_family = AF_UNIX;
    if (abstract) {
        size_t len = strlen(g_path + 1);
        memcpy(sun->sun_path, g_path, len + 1);
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
    }
    strcpy(sun->sun_path, g_path);
    return (socklen_t)sizeof *sun;
}

/* A listening socket for the named transports; its address goes to g_path / port. */
static int make_listener(struct sockaddr_storage *addr, socklen_t *alen)
{
    int fd;
    if (is_tcp()) {
        struct sockaddr_in *sin = (struct sockaddr_in *)addr;
        int one = 1;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket(AF_INET)");
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        memset(sin, 0, sizeof *sin);
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        *alen = sizeof *sin;
        if (bind(fd, (struct sockaddr *)sin, *alen) < 0)
            die("bind(127.0.0.1)");
        if (getsockname(fd, (struct sockaddr *)sin, alen) < 0)
            die("getsockname");
    } else {
        int abstract = strcmp(g_transport, "abstract") == 0;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket(AF_UNIX)");
        *alen = fill_unix((struct sockaddr_un *)addr, abstract);
        if (!abstract)
            unlink(g_path);
        if (bind(fd, (struct sockaddr *)addr, *alen) < 0)
            die("bind");
    }
    if (listen(fd, 128) < 0)
        die("listen");
    return fd;
}

static int connect_to(const struct sockaddr_storage *addr, socklen_t alen)
{
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (const struct sockaddr *)addr, alen) < 0)
        die("connect");
    if (is_tcp())
        nodelay(fd);
    return fd;
}

static int accept_one(int lfd)
{
    int fd;
    do
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        die("accept");
    if (is_tcp())
        nodelay(fd);
    return fd;
}

/* `afunix bench --pin`: AFUNIX_BENCH_CPU pins this process (and so the peer it
 * forks), AFUNIX_BENCH_PEER_CPU moves the peer to a CPU of its own. */
static void pin_to(const char *variable)
{
    const char *cpu = getenv(variable);
    if (cpu && *cpu) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(atoi(cpu), &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0)
            die("sched_setaffinity");
    }
}

static void pin_peer(void) { pin_to("AFUNIX_BENCH_PEER_CPU"); }

static pid_t fork_peer(void)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0)
        pin_peer();
    return pid;
}

/* Set up the transport and fork: returns the pid of the peer (0 in the peer). */
static pid_t setup(struct end *me)
{
    int sv[2];
    pid_t pid;
    if (strcmp(g_transport, "unix") == 0 || strcmp(g_transport, "seqpacket") == 0 ||
        strcmp(g_transport, "dgram") == 0) {
        int type = g_transport[0] == 'u' ? SOCK_STREAM
                   : g_transport[0] == 's' ? SOCK_SEQPACKET
                                           : SOCK_DGRAM;
        if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) < 0)
            die("socketpair");
        pid = fork_peer();
        close(sv[pid == 0 ? 0 : 1]);
        me->rfd = me->wfd = sv[pid == 0 ? 1 : 0];
        return pid;
    }
    if (strcmp(g_transport, "pipe") == 0) {
        int up[2], down[2];
        if (pipe2(up, O_CLOEXEC) < 0 || pipe2(down, O_CLOEXEC) < 0)
            die("pipe");
        pid = fork_peer();
        if (pid == 0) {
            close(up[0]);
            close(down[1]);
            me->rfd = down[0];
            me->wfd = up[1];
        } else {
            close(up[1]);
            close(down[0]);
            me->rfd = up[0];
            me->wfd = down[1];
        }
        return pid;
    }
    if (strcmp(g_transport, "unix-path") == 0 || strcmp(g_transport, "abstract") == 0 ||
        is_tcp()) {
        struct sockaddr_storage addr;
        socklen_t alen;
        int lfd = make_listener(&addr, &alen);
        pid = fork_peer();
        if (pid == 0) {
            me->rfd = me->wfd = accept_one(lfd);
        } else {
            me->rfd = me->wfd = connect_to(&addr, alen);
        }
        close(lfd);
        return pid;
    }
    fail("unknown transport");
    return -1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void report(uint64_t elapsed, long count, uint64_t bytes, uint64_t *samples)
{
    printf("{\"elapsed_ns\": %llu, \"count\": %ld, \"bytes\": %llu", (unsigned long long)elapsed,
           count, (unsigned long long)bytes);
    if (samples) {
        qsort(samples, (size_t)count, sizeof *samples, cmp_u64);
        printf(", \"p50_ns\": %llu, \"p99_ns\": %llu",
               (unsigned long long)samples[(size_t)(count - 1) / 2],
               (unsigned long long)samples[(size_t)((count - 1) * 99 / 100)]);
    }
    printf("}\n");
}

/* ---- round trip: write one message, read the echo ------------------------ */

static void rtt(pid_t peer, struct end *e, size_t size, long count, long warmup, int records)
{
    char *buf = calloc(1, size);
    if (!buf)
        die("calloc");
    if (peer == 0) {
        for (long i = 0; i < count + warmup; i++) {
            recv_msg(e->rfd, buf, size, records);
            write_all(e->wfd, buf, size);
        }
        return;
    }
    uint64_t *samples = malloc(sizeof *samples * (size_t)count);
    if (!samples)
        die("malloc");
    for (long i = 0; i < warmup; i++) {
        write_all(e->wfd, buf, size);
        recv_msg(e->rfd, buf, size, records);
    }
    uint64_t start = now_ns(), t = start;
    for (long i = 0; i < count; i++) {
        write_all(e->wfd, buf, size);
        recv_msg(e->rfd, buf, size, records);
        uint64_t t2 = now_ns();
        samples[i] = t2 - t;
        t = t2;
    }
    report(t - start, count, (uint64_t)size * (uint64_t)count, samples);
}

/* ---- one way: COUNT messages, then a one-byte acknowledgement ------------- */

static void one_way_phase(pid_t peer, struct end *e, char *buf, size_t size, long n, int records,
                          int bulk)
{
    char ack = 'k';
    if (peer == 0) {
        if (bulk && !records) {
            /* bulk: read whatever has arrived, up to one write's worth per call */
            uint64_t left = (uint64_t)size * (uint64_t)n;
            while (left > 0) {
                ssize_t r = read(e->rfd, buf, left < size ? left : size);
                if (r < 0 && errno == EINTR)
                    continue;
                if (r < 0)
                    die("read");
                if (r == 0)
                    fail("unexpected end of stream");
                left -= (uint64_t)r;
            }
        } else {
            for (long i = 0; i < n; i++)
                recv_msg(e->rfd, buf, size, records);
        }
        write_all(e->wfd, &ack, 1);
        return;
    }
    for (long i = 0; i < n; i++)
        write_all(e->wfd, buf, size);
    read_exact(e->rfd, &ack, 1);
}

static void one_way(pid_t peer, struct end *e, size_t size, long count, long warmup, int records,
                    int bulk)
{
    char *buf = malloc(size);
    if (!buf)
        die("malloc");
    memset(buf, 'x', size);
    if (warmup > 0)
        one_way_phase(peer, e, buf, size, warmup, records, bulk);
    uint64_t start = now_ns();
    one_way_phase(peer, e, buf, size, count, records, bulk);
    if (peer != 0)
        report(now_ns() - start, count, (uint64_t)size * (uint64_t)count, NULL);
}

/* ---- descriptor passing: one byte and one fd per sendmsg ----------------- */

static void send_fd(int sock, int fd)
{
    char byte = 'f';
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    while (sendmsg(sock, &msg, 0) < 0)
        if (errno != EINTR)
            die("sendmsg(SCM_RIGHTS)");
}

static int recv_fd(int sock)
{
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    ssize_t r;
    do
        r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        die("recvmsg");
    if (r == 0)
        fail("unexpected end of stream");
    if (msg.msg_flags & MSG_CTRUNC)
        fail("control data truncated (MSG_CTRUNC)");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(sizeof(int)))
        fail("expected one descriptor");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void fd_phase(pid_t peer, struct end *e, int fd, long n, int pingpong)
{
    char ack = 'k';
    if (peer == 0) {
        for (long i = 0; i < n; i++) {
            close(recv_fd(e->rfd));
            if (pingpong)
                write_all(e->wfd, &ack, 1);
        }
        if (!pingpong)
            write_all(e->wfd, &ack, 1);
        return;
    }
    for (long i = 0; i < n; i++) {
        send_fd(e->wfd, fd);
        if (pingpong)
            read_exact(e->rfd, &ack, 1);
    }
    if (!pingpong)
        read_exact(e->rfd, &ack, 1);
}

static void fdpass(pid_t peer, struct end *e, long count, long warmup, int pingpong)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open(/dev/null)");
    if (warmup > 0)
        fd_phase(peer, e, fd, warmup, pingpong);
    uint64_t start = now_ns();
    fd_phase(peer, e, fd, count, pingpong);
    if (peer != 0)
        report(now_ns() - start, count, 0, NULL);
}

/* ---- large payloads through a sealed memfd ------------------------------- */

static void memfd_phase(pid_t peer, struct end *e, const char *buf, size_t size, long n)
{
    char ack = 'k';
    if (peer == 0) {
        for (long i = 0; i < n; i++) {
            int fd = recv_fd(e->rfd);
            struct stat st;
            int seals = fcntl(fd, F_GET_SEALS);
            if (fstat(fd, &st) < 0 || seals < 0)
                die("fstat/F_GET_SEALS");
            if ((seals & ALL_SEALS) != ALL_SEALS || (size_t)st.st_size != size)
                fail("memfd not sealed or of the wrong size");
            /* MAP_POPULATE: the pages are mapped and readable, as a copy would be */
            void *p = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
            if (p == MAP_FAILED)
                die("mmap");
            munmap(p, size);
            close(fd);
        }
        write_all(e->wfd, &ack, 1);
        return;
    }
    for (long i = 0; i < n; i++) {
        int fd = memfd_create("afunix-bench", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
            die("memfd_create");
        if (ftruncate(fd, (off_t)size) < 0)
            die("ftruncate");
        write_all(fd, buf, size);
        if (fcntl(fd, F_ADD_SEALS, ALL_SEALS) < 0)
            die("F_ADD_SEALS");
        send_fd(e->wfd, fd);
        close(fd);
    }
    read_exact(e->rfd, &ack, 1);
}

static void large_memfd(pid_t peer, struct end *e, size_t size, long count, long warmup)
{
    char *buf = NULL;
    if (peer != 0) {
        buf = malloc(size);
        if (!buf)
            die("malloc");
        memset(buf, 'x', size);
    }
    if (warmup > 0)
        memfd_phase(peer, e, buf, size, warmup);
    uint64_t start = now_ns();
    memfd_phase(peer, e, buf, size, count);
    if (peer != 0)
        report(now_ns() - start, count, (uint64_t)size * (uint64_t)count, NULL);
}

/* ---- connection setup: connect, accept, close ----------------------------- */

static void conn_phase(int lfd, const struct sockaddr_storage *addr, socklen_t alen, long n,
                       int server)
{
    for (long i = 0; i < n; i++) {
        if (server) {
            close(accept_one(lfd));
        } else {
            int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
            char c;
            if (fd < 0)
                die("socket");
            if (connect(fd, (const struct sockaddr *)addr, alen) < 0)
                die("connect");
            if (read(fd, &c, 1) != 0) /* the server's close: one full cycle */
                die("read (expected end of stream)");
            close(fd);
        }
    }
}

static void connect_rate(long count, long warmup)
{
    struct sockaddr_storage addr;
    socklen_t alen;
    int lfd = make_listener(&addr, &alen);
    pid_t pid = fork_peer();
    if (pid == 0) {
        conn_phase(lfd, &addr, alen, warmup + count, 1);
        _exit(0);
    }
    close(lfd);
    conn_phase(-1, &addr, alen, warmup, 0);
    uint64_t start = now_ns();
    conn_phase(-1, &addr, alen, count, 0);
    uint64_t elapsed = now_ns() - start;
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("peer failed");
    report(elapsed, count, 0, NULL);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s CASE TRANSPORT SIZE COUNT WARMUP DIR\n", argv[0]);
        return 2;
    }
    g_case = argv[1];
    g_transport = argv[2];
    size_t size = strtoull(argv[3], NULL, 10);
    long count = strtol(argv[4], NULL, 10);
    long warmup = strtol(argv[5], NULL, 10);
    if (count < 1 || warmup < 0)
        fail("COUNT must be >= 1 and WARMUP >= 0");
    if (strcmp(g_transport, "abstract") == 0)
        snprintf(g_path, sizeof g_path, "%cafunix-bench-%ld", 0, (long)getpid());
    else
        snprintf(g_path, sizeof g_path, "%s/c%ld.sock", argv[6], (long)getpid());
    signal(SIGPIPE, SIG_IGN);
    alarm(600); /* never hang a benchmark run */
    pin_to("AFUNIX_BENCH_CPU");

    if (strcmp(g_case, "connect") == 0) {
        connect_rate(count, warmup);
        if (g_path[0])
            unlink(g_path);
        return 0;
    }
    int records = strcmp(g_transport, "seqpacket") == 0 || strcmp(g_transport, "dgram") == 0;
    struct end e;
    pid_t peer = setup(&e);
    if (peer != 0 && g_path[0])
        unlink(g_path);
    if (strcmp(g_case, "rtt") == 0)
        rtt(peer, &e, size, count, warmup, records);
    else if (strcmp(g_case, "rate") == 0)
        one_way(peer, &e, size, count, warmup, records, 0);
    else if (strcmp(g_case, "bulk") == 0 || strcmp(g_case, "large") == 0)
        one_way(peer, &e, size, count, warmup, records, 1);
    else if (strcmp(g_case, "fdpass") == 0)
        fdpass(peer, &e, count, warmup, 0);
    else if (strcmp(g_case, "fdpingpong") == 0)
        fdpass(peer, &e, count, warmup, 1);
    else if (strcmp(g_case, "large-memfd") == 0)
        large_memfd(peer, &e, size, count, warmup);
    else
        fail("unknown case");
    if (peer == 0)
        _exit(0);
    int status;
    if (waitpid(peer, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("peer failed");
    return 0;
}
