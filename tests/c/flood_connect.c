/* flood_connect PATH NPROC SECONDS HOLD WAIT_MS: a connection flood against a
 * Unix stream server. NPROC children connect to PATH in a loop for SECONDS. Each
 * waits up to WAIT_MS for the server's verdict on a new connection (0: does not
 * wait), then keeps up to HOLD connections open (the oldest is closed to make
 * room). A connection counts as refused when the server closes it or writes to
 * it before the client has sent anything. Prints "tried refused failed" summed
 * over all children (failed: connect() itself failed). */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void flood(const struct sockaddr_un *sun, double secs, int hold, int wait_ms, int out)
{
    long counts[3] = {0, 0, 0}; /* tried, refused, failed */
    struct pollfd held[256];
    int n = 0, next = 0;
    double deadline = now() + secs;
    while (now() < deadline) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            break;
        if (connect(fd, (const struct sockaddr *)sun, sizeof *sun) < 0) {
            counts[2]++;
            close(fd);
            continue;
        }
        counts[0]++;
        if (wait_ms > 0) {
            struct pollfd one = {.fd = fd, .events = POLLIN};
            if (poll(&one, 1, wait_ms) > 0) {
                counts[1]++;
                close(fd);
                continue;
            }
        }
        if (n < hold) {
            held[n].fd = fd;
            held[n].events = POLLIN;
            n++;
        } else {
            close(held[next].fd);
            held[next].fd = fd;
            next = (next + 1) % hold;
        }
        if (poll(held, n, 0) > 0) {
            for (int i = 0; i < n; i++) {
                if (held[i].revents) {
                    counts[1]++;
                    close(held[i].fd);
                    held[i] = held[--n];
                    i--;
                }
            }
            next = 0;
        }
    }
    if (write(out, counts, sizeof counts) != sizeof counts)
        _exit(1);
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: flood_connect PATH NPROC SECONDS HOLD WAIT_MS\n");
        return 2;
    }
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    strncpy(sun.sun_path, argv[1], sizeof sun.sun_path - 1);
    int nproc = atoi(argv[2]), hold = atoi(argv[4]), wait_ms = atoi(argv[5]);
    double secs = atof(argv[3]);
    if (hold < 1 || hold > 256 || nproc < 1) {
        fprintf(stderr, "flood_connect: NPROC >= 1, 1 <= HOLD <= 256\n");
        return 2;
    }
    int pipefd[2];
    if (pipe(pipefd) < 0) {
        perror("pipe");
        return 1;
    }
    for (int i = 0; i < nproc; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            close(pipefd[0]);
            flood(&sun, secs, hold, wait_ms, pipefd[1]);
        }
    }
    close(pipefd[1]);
    long total[3] = {0, 0, 0}, got[3];
    while (read(pipefd[0], got, sizeof got) == sizeof got)
        for (int k = 0; k < 3; k++)
            total[k] += got[k];
    while (wait(NULL) > 0)
        ;
    printf("%ld %ld %ld\n", total[0], total[1], total[2]);
    return 0;
}
