"""``afunix dial-stdio ADDR``: relay standard input and output to a socket (``ProxyCommand``).

One stream, two directions, each with its own thread so that neither can
stall the other (a peer that answers while it still reads would otherwise
deadlock a relay that blocks in one ``send``):

* standard input -> socket; at end of input the socket's write side is shut
  down (``SHUT_WR``), so the peer reads end of file and can still answer;
* socket -> standard output; at the socket's end of file the run ends, exit
  status 0 (the peer has said all it will).

There is no ``--json``: standard output carries the relayed bytes.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading
from typing import Any

import afunix

from ._common import address_arg, seconds_arg

CHUNK = 65536


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "dial-stdio",
        help="relay standard input and output to ADDR (for ssh's ProxyCommand)",
        description=(
            "Connect to the stream socket ADDR (a path, @abstract, tcp://host:port or "
            "ssh://[user@]host[:port]/path) and relay: standard input to the socket, the "
            "socket to standard output. At end of input the socket's write side is shut "
            "down and the relay goes on until the peer ends; when the peer ends, afunix "
            "exits 0. A connection reset or closed by the peer while input remains is an "
            "error (74). No --json: standard output carries the relayed bytes. Exit "
            "statuses as in 'afunix --help' (69 nothing there, 74 reset, 75 timed out, "
            "77 permission denied)."
        ),
        epilog=(
            "Example: ssh -o ProxyCommand='afunix dial-stdio /run/sshd.sock' host "
            "(an sshd listening on a Unix socket); "
            "afunix dial-stdio ssh://db1/run/app.sock < request > reply"
        ),
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="stream socket to dial")
    p.add_argument(
        "--timeout",
        type=seconds_arg(),
        default=30.0,
        help="connect timeout in seconds (default 30; ssh:// includes the SSH login)",
    )
    p.set_defaults(func=cmd_dial_stdio)


def _peer_error(exc: OSError, sock: socket.socket, doing: str) -> afunix.AfunixError:
    """A socket failure as an error naming the peer (never a bare ``BrokenPipeError``,
    which the CLI would take for a closed standard output and exit 141 silently)."""
    err = exc.errno or errno.EIO
    try:
        where = afunix.Address.from_sockaddr(sock.family, sock.getpeername()).describe()
    except OSError:
        where = "the peer"
    where = getattr(sock, "peer_description", where)
    return afunix.AfunixError(
        err, f"{doing} {where} failed: {os.strerror(err)} (the peer reset or closed it)"
    )


def _pump_input(sock: socket.socket, errors: list[BaseException]) -> None:
    """Standard input to *sock*; shut down the write side at end of input."""
    fd = sys.stdin.fileno()
    try:
        while chunk := os.read(fd, CHUNK):
            try:
                sock.sendall(chunk)
            except OSError as exc:
                errors.append(_peer_error(exc, sock, "sending to"))
                return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is gone: its end of file tells
                errors.append(_peer_error(exc, sock, "shutting down the write side to"))
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(sock: socket.socket) -> None:
    """Relay standard input and output to *sock* until the socket ends (see the module doc)."""
    errors: list[BaseException] = []
    pump = threading.Thread(target=_pump_input, args=(sock, errors), daemon=True)
    pump.start()
    out = sys.stdout.fileno()
    sys.stdout.flush()
    while True:
        try:
            data = sock.recv(CHUNK)
        except OSError as exc:
            raise _peer_error(exc, sock, "receiving from") from exc
        if not data:
            break
        _write_all(out, data)  # BrokenPipeError here: standard output closed (141)
    if errors:  # input the peer never took
        raise errors[0]


def cmd_dial_stdio(args: argparse.Namespace) -> int:
    with afunix.connect(args.address, timeout=args.timeout) as sock:
        relay(sock)
    return 0
