"""``afunix openfile SOCKFD PATH MODE``: the book's ``openfile`` helper (UNP 15.7).

Run by :func:`afunix.opener.my_open` (or by any program in the book's style):
open PATH with the ``open(2)`` flags MODE (decimal, as the book's ``atoi``)
and pass the descriptor back over the socket SOCKFD with one byte of
payload. The exit status is 0 on success, else the ``errno`` of the failure
(255 when it does not fit), and nothing is printed: the caller learns
everything from the status and the descriptor.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..opener import openfile_main
from ._common import INT_MAX, count_arg, mode_arg


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "openfile",
        help="helper of my_open: open PATH, pass the descriptor on SOCKFD, exit with errno",
        description=(
            "The book's openfile (UNP figure 15.10): open PATH with the open(2) flags MODE "
            "(decimal: 0 is O_RDONLY) and send the descriptor over the Unix-domain socket "
            "SOCKFD with a one-byte payload. Exit status 0 on success, else the errno. "
            "Meant to be run by my_open (afunix cat), not by hand."
        ),
    )
    p.add_argument(
        "sockfd",
        type=count_arg(0, what="a descriptor number"),
        metavar="SOCKFD",
        help="inherited socket descriptor",
    )
    p.add_argument("path", metavar="PATH", help="file to open")
    p.add_argument(
        "flags",
        type=count_arg(0, INT_MAX, what="open(2) flags"),
        metavar="MODE",
        help="open(2) flags, decimal",
    )
    p.add_argument(
        "perm",
        type=mode_arg,
        nargs="?",
        default=0o666,
        metavar="PERM",
        help="permissions (octal) when MODE includes O_CREAT (default 666)",
    )
    p.set_defaults(func=cmd_openfile)


def cmd_openfile(args: argparse.Namespace) -> int:
    return openfile_main(args.sockfd, args.path, args.flags, args.perm)
