/*
 * unp_dg_cli: a datagram client that binds its own path (UNP 15.4 point 8, 15.6).
 *
 *   unp_dg_cli SERVER_PATH CLIENT_PATH [TIMEOUT_MS]
 *
 * An unbound Unix datagram socket cannot get replies, so the client binds
 * CLIENT_PATH first. For each line of standard input: sendto the server,
 * recvfrom the reply (TIMEOUT_MS, default 5000), check it came from SERVER_PATH, print it.
 * Removes CLIENT_PATH at exit. Exit status: 0, 1 on a reply from a stranger,
 * or the errno of a failed call (EAGAIN when no reply came in time).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXLINE 4096

static int fail(const char *what, const char *path)
{
    int err = errno;
    perror(what);
    if (path != NULL)
        unlink(path);
    return err;
}

int main(int argc, char **argv)
{
    int sockfd;
    struct sockaddr_un servaddr, cliaddr, from;
    socklen_t fromlen;
    struct timeval tv = {5, 0};
    char sendline[MAXLINE], recvline[MAXLINE + 1];

    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: unp_dg_cli <server path> <client path> [timeout ms]\n");
        return 2;
    }
    if (argc == 4) {
        long ms = atol(argv[3]);
        tv.tv_sec = ms / 1000;
        tv.tv_usec = (ms % 1000) * 1000;
    }
    if ((sockfd = socket(AF_LOCAL, SOCK_DGRAM, 0)) < 0)
        return fail("socket", NULL);

    memset(&cliaddr, 0, sizeof(cliaddr));
    cliaddr.sun_family = AF_LOCAL;
    strncpy(cliaddr.sun_path, argv[2], sizeof(cliaddr.sun_path) - 1);
    unlink(argv[2]);
    if (bind(sockfd, (struct sockaddr *)&cliaddr, sizeof(cliaddr)) < 0)
        return fail("bind", NULL);
    if (setsockopt(sockfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0)
        return fail("setsockopt", argv[2]);

    memset(&servaddr, 0, sizeof(servaddr));
    servaddr.sun_family = AF_LOCAL;
    strncpy(servaddr.sun_path, argv[1], sizeof(servaddr.sun_path) - 1);

    while (fgets(sendline, MAXLINE, stdin) != NULL) {
        size_t len = strlen(sendline);
        if (sendto(sockfd, sendline, len, 0, (struct sockaddr *)&servaddr, sizeof(servaddr)) < 0)
            return fail("sendto", argv[2]);
        fromlen = sizeof(from);
        ssize_t n = recvfrom(sockfd, recvline, MAXLINE, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0)
            return fail("recvfrom", argv[2]);
        if (strcmp(from.sun_path, argv[1]) != 0) {
            fprintf(stderr, "reply from %s, not from the server (ignored)\n", from.sun_path);
            unlink(argv[2]);
            return 1;
        }
        recvline[n] = '\0';
        fputs(recvline, stdout);
        fflush(stdout);
    }
    close(sockfd);
    unlink(argv[2]);
    return 0;
}
