"""``afunix connect ADDR``: standard input to a server, replies to standard output (like nc -U)."""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import sys
import threading
import time
from typing import Any

from .. import AfunixError, Socket, connect
from ..lowlevel import TlsSocket, connect_tls, strerror
from ._common import (
    SOCKET_TYPES,
    UsageError,
    add_json_option,
    add_tls_options,
    address_arg,
    count_arg,
    emit_json,
    seconds_arg,
    tls_context,
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "connect",
        help="send standard input to ADDR, print replies (like nc -U)",
        description=(
            "Connect to ADDR and copy standard input to it and its replies to standard "
            "output. On a stream socket input is sent as it comes; at end of input the "
            "write side is shut down and afunix waits for the server to finish replying. "
            "On datagram and seqpacket sockets each input line is one message; a datagram "
            "client binds a private reply address automatically (UNP 15.4 point 8) and "
            "waits for one reply per datagram sent: when a reply is owed and none comes "
            "for --reply-timeout seconds, afunix stops with an error and exit status "
            "75 (try again). ADDR may be tcp://HOST:PORT, ssh://[USER@]HOST[:PORT]/PATH or "
            "tls://HOST:PORT (--ca, and --cert/--key for a mutual-TLS server). "
            "Exit status 0 on success; failures as in 'afunix --help'."
        ),
        epilog="Example: printf 'hello\\n' | afunix connect /tmp/echo.sock",
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="server address")
    p.add_argument("--type", choices=SOCKET_TYPES, default="stream", help="socket type")
    p.add_argument("--timeout", type=seconds_arg(), default=10.0, help="connect timeout in seconds")
    p.add_argument(
        "--retries", type=count_arg(0), default=0, help="retry a refused/full connect N times"
    )
    p.add_argument(
        "--linger",
        type=seconds_arg(zero=True),
        default=5.0,
        help="stream and seqpacket: after end of input, wait at most this many quiet "
        "seconds for replies (default 5)",
    )
    p.add_argument(
        "--reply-timeout",
        type=seconds_arg(),
        default=5.0,
        metavar="S",
        help="dgram: fail when a reply is owed and none has come for S seconds (default 5)",
    )
    add_json_option(
        p,
        "a summary instead of the replies (the replies as text in it)",
    )
    add_tls_options(p, server=False)
    p.set_defaults(func=cmd_connect)


def _pump_stdin(
    sock: Socket,
    per_line: bool,
    sent: list[int],
    errors: list[BaseException],
    sent_at: list[float] | None = None,
) -> None:
    """Copy standard input to *sock*; count in ``sent[0]``, append -1 at end of input.

    *sent_at*, when given, gets the time (``time.monotonic()``) each message went out.
    """
    stdin = sys.stdin.buffer
    try:
        if per_line:
            for line in stdin:
                sock.send(line)
                if sent_at is not None:
                    sent_at.append(time.monotonic())
                sent[0] += 1
        else:
            fd = stdin.fileno()
            while chunk := os.read(fd, 65536):
                sock.sendall(chunk)
                sent[0] += 1
        if sock.type != socket.SOCK_DGRAM:
            sock.shutdown(socket.SHUT_WR)
    except BaseException as exc:  # reported by the main thread
        errors.append(_explain(exc, sock))
    finally:
        sent.append(-1)  # marks end of input


def _explain(exc: BaseException, sock: Socket) -> BaseException:
    """Name the server when it drops the connection (EPIPE/ECONNRESET).

    Without this a server closing early would surface as a bare "Connection
    reset by peer", or worse as a ``BrokenPipeError`` that the CLI takes for a
    closed standard output and exits 141 without a word.
    """
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        try:
            where = sock.peer_address.describe()
        except OSError:
            where = "the server"
        err = exc.errno or errno.ECONNRESET
        return AfunixError(
            err,
            f"connection to {where} closed by the server before it read all the input "
            f"({strerror(err)})",
        )
    return exc


def _no_reply(sock: Socket, answered: int, sent: int, timeout: float) -> AfunixError:
    """The error for a datagram server that leaves a datagram unanswered."""
    try:
        where = f"the server at {sock.peer_address.describe()}"
    except OSError:
        where = "the server"
    return AfunixError(
        errno.ETIMEDOUT,
        f"no reply from {where} to datagram {answered + 1} (of {sent} sent, {answered} "
        f"answered) within {timeout:g}s: it dropped the datagram or does not answer; "
        "--reply-timeout S waits longer",
    )


def cmd_connect(args: argparse.Namespace) -> int:
    ctx = tls_context(args, args.address, server=False)
    sock: Any
    if ctx is not None and args.type != "stream":
        raise UsageError(f"--type {args.type}: tls:// is a stream")
    if ctx is not None:  # tls://: a TLS byte stream with the same calls
        sock = connect_tls(args.address, ctx, timeout=args.timeout, retries=args.retries)
    else:
        sock = connect(args.address, args.type, timeout=args.timeout, retries=args.retries)
    with sock:
        per_message = sock.type != socket.SOCK_STREAM
        datagrams = sock.type == socket.SOCK_DGRAM
        sent = [0]
        sent_at: list[float] = []
        errors: list[BaseException] = []
        pump = threading.Thread(target=_pump_stdin, args=(sock, per_message, sent, errors, sent_at))
        pump.daemon = True
        pump.start()
        out = sys.stdout.buffer
        replies: list[bytes] = []
        received = 0
        quiet_since: float | None = None
        last_reply = 0.0
        while True:
            done_input = len(sent) > 1
            if done_input and quiet_since is None:
                quiet_since = time.monotonic()
            if errors:
                raise errors[0]
            if datagrams:
                owed = sent[0]  # read before sent_at: the pump appends to it first
                if done_input and received >= owed:
                    break
                if received < owed:
                    waited = time.monotonic() - max(sent_at[received], last_reply)
                    if waited > args.reply_timeout:
                        raise _no_reply(sock, received, owed, args.reply_timeout)
            elif quiet_since is not None and time.monotonic() - quiet_since > args.linger:
                break
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready and not (isinstance(sock, TlsSocket) and sock.buffered):
                continue  # (TLS may hold decrypted data the socket will not signal)
            try:
                data = sock.recv(65536)
            except OSError as exc:
                raise _explain(exc, sock) from exc
            if not data and sock.type != socket.SOCK_DGRAM:
                break
            received += 1
            last_reply = time.monotonic()
            if args.json:
                replies.append(data)
            else:
                out.write(data)
                out.flush()
            if quiet_since is not None:
                quiet_since = time.monotonic()
        pump.join(0.5)
        if errors:
            raise errors[0]
    if args.json:
        emit_json(
            "connect",
            {
                "address": str(args.address),
                "type": args.type,
                "sent": sent[0],
                "received": received,
                "received_bytes": sum(map(len, replies)),
                "replies": [r.decode("utf-8", "replace") for r in replies],
            },
        )
    return 0
