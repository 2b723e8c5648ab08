/*
 * fd_mycat: the book's mycat (UNP figure 15.7) with its my_open (15.8) and
 * read_fd (15.11), exec'ing afunix's openfile as the helper.
 *
 *   fd_mycat PATHNAME
 *
 * my_open makes a stream socketpair, forks, and the child execs
 * `$AFUNIX openfile SOCKFD PATHNAME MODE` ($AFUNIX: the afunix command,
 * default "afunix" on $PATH). The parent waits for it; exit status 0 means a
 * descriptor is waiting in the socket, anything else is the errno of the
 * failed open. The file is then copied to standard output.
 * Exit status: 0, or 1 with "cannot open PATHNAME: strerror" on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUFFSIZE 8192

static ssize_t read_fd(int fd, void *ptr, size_t nbytes, int *recvfd)
{
    struct msghdr msg;
    struct iovec iov[1];
    ssize_t n;
    union {
        struct cmsghdr cm;
        char control[CMSG_SPACE(sizeof(int))];
    } control_un;
    struct cmsghdr *cmptr;

    memset(&msg, 0, sizeof(msg));
    msg.msg_control = control_un.control;
    msg.msg_controllen = sizeof(control_un.control);
    msg.msg_name = NULL;
    msg.msg_namelen = 0;
    iov[0].iov_base = ptr;
    iov[0].iov_len = nbytes;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;

    if ((n = recvmsg(fd, &msg, 0)) <= 0)
        return n;

    if ((cmptr = CMSG_FIRSTHDR(&msg)) != NULL && cmptr->cmsg_len == CMSG_LEN(sizeof(int))) {
        if (cmptr->cmsg_level != SOL_SOCKET) {
            fprintf(stderr, "control level != SOL_SOCKET\n");
            exit(1);
        }
        if (cmptr->cmsg_type != SCM_RIGHTS) {
            fprintf(stderr, "control type != SCM_RIGHTS\n");
            exit(1);
        }
        memcpy(recvfd, CMSG_DATA(cmptr), sizeof(int));
    } else {
        *recvfd = -1; /* descriptor was not passed */
    }
    return n;
}

static int my_open(const char *pathname, int mode)
{
    int fd, sockfd[2], status;
    pid_t childpid;
    char c, argsockfd[10], argmode[10];
    const char *afunix = getenv("AFUNIX");

    if (afunix == NULL)
        afunix = "afunix";
    if (socketpair(AF_LOCAL, SOCK_STREAM, 0, sockfd) < 0)
        return -1;

    if ((childpid = fork()) == 0) { /* child process */
        close(sockfd[0]);
        snprintf(argsockfd, sizeof(argsockfd), "%d", sockfd[1]);
        snprintf(argmode, sizeof(argmode), "%d", mode);
        execlp(afunix, afunix, "openfile", argsockfd, pathname, argmode, (char *)NULL);
        perror("execl error");
        _exit(127);
    }

    /* parent process - wait for the child to terminate */
    close(sockfd[1]); /* close the end we don't use */
    if (waitpid(childpid, &status, 0) < 0) {
        close(sockfd[0]);
        return -1;
    }
    if (WIFEXITED(status) == 0) {
        fprintf(stderr, "child did not terminate\n");
        exit(1);
    }
    if ((status = WEXITSTATUS(status)) == 0) {
        if (read_fd(sockfd[0], &c, 1, &fd) <= 0 || fd < 0) {
            errno = EPROTO;
            fd = -1;
        }
    } else {
        errno = status; /* set errno value from child's status */
        fd = -1;
    }
    close(sockfd[0]);
    return fd;
}

int main(int argc, char **argv)
{
    int fd, n;
    char buff[BUFFSIZE];

    if (argc != 2) {
        fprintf(stderr, "usage: mycat <pathname>\n");
        exit(1);
    }
    if ((fd = my_open(argv[1], O_RDONLY)) < 0) {
        fprintf(stderr, "cannot open %s: %s\n", argv[1], strerror(errno));
        exit(1);
    }
    while ((n = read(fd, buff, BUFFSIZE)) > 0)
        write(STDOUT_FILENO, buff, n);
    exit(0);
}
