"""``afunix serve ADDR --show-fds``: print every descriptor that arrives, then close it.

The receiving end of the seed's PHP clients (UNP 15.7): for each message it
prints the payload size and, for each descriptor, its number in this
process, kind (regular file, directory, pipe, socket, ...), target path,
inode and open mode. Works on stream, seqpacket and datagram sockets;
connections are served one ``recvmsg`` at a time from one loop, so any
number of clients can be connected at once. When standard output fails (a
closed pipe, a full disk) the server says so once on standard error, stops
printing and goes on receiving and closing descriptors.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import sys
import threading
from typing import Any

from .. import Address, listen
from ..lowlevel import SCM_MAX_FD, ControlError, close_fds, describe_fd, recv_fds
from ..server import somaxconn
from ._common import ServerOutput

_BUFSIZE = 65536


def _peer(sock: socket.socket, raw: Any) -> str:
    try:
        return Address.from_sockaddr(sock.family, raw).describe()
    except (OSError, ValueError, TypeError):
        return "unknown peer"


def show_message(sock: socket.socket, peer: str | None, count: int, out: ServerOutput) -> bool:
    """One ``recvmsg``: print what came and close its descriptors. ``False`` at EOF."""
    try:
        got = recv_fds(sock, _BUFSIZE, SCM_MAX_FD)
    except ControlError as exc:
        out.lines(f"message {count}: error: {exc}")
        return True
    fds = got.fds
    try:
        if not got.data and not fds and sock.type != socket.SOCK_DGRAM:
            return False
        sender = peer if peer is not None else _peer(sock, got.address)
        lines = [
            f"message {count} from {sender}: {len(got.data)} byte(s) of payload, "
            f"{len(fds)} descriptor(s)"
        ]
        for fd in fds:
            try:
                lines.append(f"  {describe_fd(fd).describe()}")
            except OSError as exc:  # pragma: no cover - fd vanished under us
                lines.append(f"  fd {fd}: cannot describe: {exc}")
        out.lines(*lines)
    finally:
        close_fds(fds)
    return True


def serve_show_fds(args: argparse.Namespace) -> int:
    """Listen on ``args.address`` and show descriptors until SIGTERM/SIGINT."""
    sock = listen(
        args.address,
        args.type,
        backlog=somaxconn() if args.backlog is None else args.backlog,
        mode=args.mode,
        owner=args.owner,
        group=args.group,
        parent_mode=args.parent_mode,
    )
    stop = threading.Event()
    wake_r, wake_w = socket.socketpair()
    old: dict[int, Any] = {}

    def handler(*_: object) -> None:
        stop.set()
        with contextlib.suppress(OSError):
            wake_w.send(b"x")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    sel = selectors.DefaultSelector()
    conns: dict[socket.socket, str] = {}
    count = 0
    out = ServerOutput()
    try:
        sel.register(sock, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        print(
            f"afunix: serving {args.type} on {sock.address.describe()}, showing every "
            "descriptor passed (--show-fds); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.5):
                obj = key.fileobj
                if obj is wake_r:
                    continue
                if obj is sock and sock.type != socket.SOCK_DGRAM:
                    conn, raw = sock.accept()
                    conns[conn] = _peer(sock, raw)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                assert isinstance(obj, socket.socket)
                count += 1
                if not show_message(obj, conns.get(obj), count, out):
                    count -= 1
                    sel.unregister(obj)
                    conns.pop(obj, None)
                    obj.close()
    finally:
        for signum, prev in old.items():
            signal.signal(signum, prev)
        sel.close()
        for conn in conns:
            conn.close()
        wake_r.close()
        wake_w.close()
        sock.close()
    return 0
