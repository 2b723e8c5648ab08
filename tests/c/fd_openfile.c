/*
 * fd_openfile: the book's openfile (UNP figure 15.10) with its write_fd (15.13).
 *
 *   fd_openfile SOCKFD PATHNAME MODE
 *
 * Opens PATHNAME with the open(2) flags MODE (decimal, atoi) and passes the
 * descriptor back over the Unix-domain socket SOCKFD with one byte of payload.
 * Exit status: 0 on success, else the errno of the failure (255 if none).
 * afunix.opener.my_open(helper=...) runs it in place of `afunix openfile`.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static ssize_t write_fd(int fd, void *ptr, size_t nbytes, int sendfd)
{
    struct msghdr msg;
    struct iovec iov[1];
    union {
        struct cmsghdr cm;
        char control[CMSG_SPACE(sizeof(int))];
    } control_un;
    struct cmsghdr *cmptr;

    memset(&msg, 0, sizeof(msg));
    msg.msg_control = control_un.control;
    msg.msg_controllen = sizeof(control_un.control);

    cmptr = CMSG_FIRSTHDR(&msg);
    cmptr->cmsg_len = CMSG_LEN(sizeof(int));
    cmptr->cmsg_level = SOL_SOCKET;
    cmptr->cmsg_type = SCM_RIGHTS;
    memcpy(CMSG_DATA(cmptr), &sendfd, sizeof(int));

    msg.msg_name = NULL;
    msg.msg_namelen = 0;
    iov[0].iov_base = ptr;
    iov[0].iov_len = nbytes;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;

    return sendmsg(fd, &msg, 0);
}

int main(int argc, char **argv)
{
    int fd;

    if (argc != 4) {
        fprintf(stderr, "openfile <sockfd#> <filename> <mode>\n");
        exit(1);
    }
    if ((fd = open(argv[2], atoi(argv[3]))) < 0)
        exit((errno > 0) ? errno : 255);
    if (write_fd(atoi(argv[1]), "", 1, fd) < 0)
        exit((errno > 0) ? errno : 255);
    exit(0);
}
