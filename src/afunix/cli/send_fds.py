"""``afunix send-fds ADDR FILE...``: pass descriptors to a server, as the seed's PHP clients do."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from .. import connect
from ..lowlevel import describe_fd, sendall_fds
from ._common import NoInput, add_json_option, address_arg, emit_json

#: The seed's PHP clients send one space as the payload the descriptors ride on.
PAYLOAD = b" "


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "send-fds",
        help="open FILEs and pass their descriptors to ADDR (SCM_RIGHTS, one-byte payload)",
        description=(
            "Open each FILE read-only (directories too) and send all the descriptors to "
            "the server at ADDR in one message whose payload is one byte, as the seed's "
            "PHP clients do (UNP 15.7). FILE may be fd:N to pass descriptor N inherited "
            "from the shell (a pipe, a socket, ...). Up to 253 descriptors (SCM_MAX_FD)."
        ),
        epilog="Example: afunix send-fds /tmp/fds.sock /etc/hostname /tmp --type dgram",
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="the receiving server")
    p.add_argument("files", nargs="+", metavar="FILE", help="a path, or fd:N")
    p.add_argument(
        "--type",
        choices=["stream", "dgram", "seqpacket"],
        default="stream",
        help="socket type (default stream)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    add_json_option(p, "what was sent")
    p.set_defaults(func=cmd_send_fds)


def _open(spec: str) -> tuple[int, bool]:
    """A descriptor for FILE or fd:N, and whether we opened it (and must close it)."""
    if spec.startswith("fd:"):
        try:
            fd = int(spec[3:], 10)
        except ValueError:
            fd = -1
        if fd < 0:
            raise ValueError(f"bad descriptor spec {spec!r}: use fd:N with N 0 or more")
        try:
            os.fstat(fd)  # EBADF now, with a clear message, rather than in sendmsg
        except OSError as exc:
            raise NoInput(exc.errno, f"{exc.strerror}: descriptor {fd} is not open", spec) from None
        return fd, False
    try:
        return os.open(spec, os.O_RDONLY | os.O_CLOEXEC), True
    except OSError as exc:
        raise NoInput.wrap(exc) from None


def _fd_fields(fd: int) -> dict[str, object]:
    info = describe_fd(fd)
    return {"kind": info.kind, "target": info.target, "inode": info.inode, "mode": info.mode}


def cmd_send_fds(args: argparse.Namespace) -> int:
    opened: list[int] = []
    fds: list[int] = []
    try:
        for spec in args.files:
            fd, ours = _open(spec)
            fds.append(fd)
            if ours:
                opened.append(fd)
        # The seed's datagram client is unbound: no reply is expected.
        bind = None if args.type == "dgram" else "auto"
        with connect(args.address, args.type, bind=bind) as sock:
            sendall_fds(sock, PAYLOAD, fds)
            if args.type != "dgram":
                sock.shutdown(socket.SHUT_WR)
        if args.json:
            emit_json(
                "send-fds",
                {
                    "address": str(args.address),
                    "type": args.type,
                    "payload_bytes": len(PAYLOAD),
                    "descriptors": [
                        {"spec": spec, **_fd_fields(fd)}
                        for spec, fd in zip(args.files, fds, strict=True)
                    ],
                },
            )
        elif not args.quiet:
            where = args.address.describe()
            print(f"sent {len(PAYLOAD)} byte and {len(fds)} descriptor(s) to {where}:")
            for spec, fd in zip(args.files, fds, strict=True):
                print(f"  {spec}: {describe_fd(fd).describe()}")
            sys.stdout.flush()
    finally:
        for fd in opened:
            os.close(fd)
    return 0
