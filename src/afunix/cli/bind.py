"""``afunix bind PATH``: the book's ``unixbind`` (UNP figure 15.2), done safely."""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

from .. import listen
from ._common import (
    SOCKET_TYPES,
    add_json_option,
    address_arg,
    creating_socket,
    emit_json,
    mode_arg,
    print_line,
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bind",
        help="bind a socket, print getsockname() and the file's mode (unixbind)",
        description=(
            "Bind a Unix-domain socket to ADDR, print the name and length that "
            "getsockname() returns (as the book's unixbind does) and the socket file's "
            "mode, then close it. The file is left in place unless --remove is given, "
            "like the book's program. A stale socket file at ADDR is replaced; any other "
            "file is refused."
        ),
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="path or @abstract name")
    p.add_argument("--type", choices=SOCKET_TYPES, default="stream")
    p.add_argument("--mode", type=mode_arg, help="file mode, e.g. 600 (default: 777 & ~umask)")
    p.add_argument("--remove", action="store_true", help="remove the socket file afterwards")
    add_json_option(p)
    p.set_defaults(func=cmd_bind)


def cmd_bind(args: argparse.Namespace) -> int:
    with creating_socket():
        sock = listen(args.address, args.type, mode=args.mode)
    try:
        addr = sock.address
        length = addr.sockaddr_len
        path = addr.filesystem_path
        mode = stat.S_IMODE(os.lstat(path).st_mode) if path is not None else None
        if args.json:
            emit_json(
                "bind",
                {
                    "name": str(addr),
                    "kind": addr.kind.value,
                    "type": args.type,
                    "len": length,
                    "mode": None if mode is None else f"{mode:04o}",
                    "removed": bool(args.remove),
                },
            )
        else:
            print_line(f"bound name = {addr.describe()}, returned len = {length}")
            if mode is not None:
                print(f"mode = {mode:04o} ({stat.filemode(stat.S_IFSOCK | mode)})")
            else:
                print("mode = none (abstract names have no file and no permissions)")
    finally:
        if args.remove:
            sock.close()
        else:
            os.close(sock.detach())  # keep the file, as unixbind does
    return 0
