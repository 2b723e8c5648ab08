/*
 * unp_unixbind: the book's unixbind (UNP figure 15.2).
 *
 *   unp_unixbind PATH
 *
 * Removes PATH, binds a stream socket to it, and prints what getsockname()
 * returns: "bound name = PATH, returned len = N". The file is left in place,
 * as in the book. Exit status: 0, or the errno of the call that failed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int sockfd;
    socklen_t len;
    struct sockaddr_un addr1, addr2;

    if (argc != 2) {
        fprintf(stderr, "usage: unp_unixbind <pathname>\n");
        return 2;
    }
    if ((sockfd = socket(AF_LOCAL, SOCK_STREAM, 0)) < 0) {
        perror("socket");
        return errno;
    }
    unlink(argv[1]); /* OK if this fails */

    memset(&addr1, 0, sizeof(addr1));
    addr1.sun_family = AF_LOCAL;
    strncpy(addr1.sun_path, argv[1], sizeof(addr1.sun_path) - 1);
    if (bind(sockfd, (struct sockaddr *)&addr1, SUN_LEN(&addr1)) < 0) {
        perror("bind");
        return errno;
    }

    len = sizeof(addr2);
    if (getsockname(sockfd, (struct sockaddr *)&addr2, &len) < 0) {
        perror("getsockname");
        return errno;
    }
    printf("bound name = %s, returned len = %d\n", addr2.sun_path, (int)len);
    return 0;
}
