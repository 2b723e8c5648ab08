/*
 * unp_str_echo_serv: a fork-per-connection echo server in the book's style (UNP 15.5).
 *
 *   unp_str_echo_serv PATH
 *
 * unlink, bind, listen; SIGCHLD reaped with a waitpid(-1, WNOHANG) loop;
 * accept restarted after EINTR; each child closes the listening socket and
 * echoes bytes until the client's end of file. Runs until killed; the
 * caller removes PATH. Messages go to standard error.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXLINE 4096

static void sig_chld(int signo)
{
    pid_t pid;
    int stat;
    (void)signo;
    while ((pid = waitpid(-1, &stat, WNOHANG)) > 0)
        ; /* the book prints here; printf is not async-signal-safe */
}

static void str_echo(int sockfd)
{
    ssize_t n;
    char buf[MAXLINE];
again:
    while ((n = read(sockfd, buf, MAXLINE)) > 0) {
        ssize_t off = 0;
        while (off < n) {
            ssize_t w = write(sockfd, buf + off, (size_t)(n - off));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return;
            }
            off += w;
        }
    }
    if (n < 0 && errno == EINTR)
        goto again;
}

int main(int argc, char **argv)
{
    int listenfd, connfd;
    pid_t childpid;
    socklen_t clilen;
    struct sockaddr_un cliaddr, servaddr;
    struct sigaction sa;

    if (argc != 2) {
        fprintf(stderr, "usage: unp_str_echo_serv <pathname>\n");
        return 2;
    }
    if ((listenfd = socket(AF_LOCAL, SOCK_STREAM, 0)) < 0) {
        perror("socket");
        return errno;
    }
    unlink(argv[1]);
    memset(&servaddr, 0, sizeof(servaddr));
    servaddr.sun_family = AF_LOCAL;
    strncpy(servaddr.sun_path, argv[1], sizeof(servaddr.sun_path) - 1);
    if (bind(listenfd, (struct sockaddr *)&servaddr, sizeof(servaddr)) < 0) {
        perror("bind");
        return errno;
    }
    if (listen(listenfd, 50) < 0) {
        perror("listen");
        return errno;
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = sig_chld;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: accept sees EINTR, as in the book */
    sigaction(SIGCHLD, &sa, NULL);

    for (;;) {
        clilen = sizeof(cliaddr);
        if ((connfd = accept(listenfd, (struct sockaddr *)&cliaddr, &clilen)) < 0) {
            if (errno == EINTR)
                continue; /* back to for() */
            perror("accept");
            return errno;
        }
        if ((childpid = fork()) == 0) { /* child process */
            close(listenfd);
            str_echo(connfd);
            exit(0);
        }
        close(connfd); /* parent closes connected socket */
    }
}
