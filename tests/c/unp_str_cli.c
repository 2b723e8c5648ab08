/*
 * unp_str_cli: a line client in the style of the book's str_cli (UNP 5.5, 15.5).
 *
 *   unp_str_cli PATH [stream|seqpacket]
 *
 * Connects to PATH; for each line of standard input: write it, read the reply
 * up to and including its newline, print it. Exits 0 at end of input, 1 if the
 * server closed early, or the errno of a failed call.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXLINE 4096

static int writen(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read until the buffer ends with a newline (a seqpacket record comes whole). */
static ssize_t readline(int fd, char *buf, size_t max)
{
    size_t got = 0;
    while (got < max - 1) {
        ssize_t r = read(fd, buf + got, max - 1 - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            break;
        got += (size_t)r;
        if (buf[got - 1] == '\n')
            break;
    }
    buf[got] = '\0';
    return (ssize_t)got;
}

int main(int argc, char **argv)
{
    int sockfd, type = SOCK_STREAM;
    struct sockaddr_un servaddr;
    char sendline[MAXLINE], recvline[MAXLINE];

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: unp_str_cli <pathname> [stream|seqpacket]\n");
        return 2;
    }
    if (argc == 3 && strcmp(argv[2], "seqpacket") == 0)
        type = SOCK_SEQPACKET;
    if ((sockfd = socket(AF_LOCAL, type, 0)) < 0) {
        perror("socket");
        return errno;
    }
    memset(&servaddr, 0, sizeof(servaddr));
    servaddr.sun_family = AF_LOCAL;
    strncpy(servaddr.sun_path, argv[1], sizeof(servaddr.sun_path) - 1);
    if (connect(sockfd, (struct sockaddr *)&servaddr, sizeof(servaddr)) < 0) {
        perror("connect");
        return errno;
    }

    while (fgets(sendline, MAXLINE, stdin) != NULL) {
        if (writen(sockfd, sendline, strlen(sendline)) < 0) {
            perror("write");
            return errno;
        }
        ssize_t n = readline(sockfd, recvline, MAXLINE);
        if (n < 0) {
            perror("read");
            return errno;
        }
        if (n == 0) {
            fprintf(stderr, "str_cli: server terminated prematurely\n");
            return 1;
        }
        fputs(recvline, stdout);
        fflush(stdout);
    }
    close(sockfd);
    return 0;
}
