"""Plain standard-library Python, written the way most people write it.

Streams carry length-prefixed messages: ``sendall(struct.pack(...) + data)``
on one side, a ``recv_exact`` loop for the header and then for the body on
the other (two ``recv`` calls per message). Datagram and seqpacket sockets
send one message per ``send`` and ``recv(65536)``. Descriptors go through
:func:`socket.send_fds`/:func:`socket.recv_fds`. ``tls`` wraps each TCP end
with ``SSLContext.wrap_socket`` (mutual certificates, see
:func:`._link.tls_context`) and runs the same loop on the ``SSLSocket``.
"""

from __future__ import annotations

import socket
import struct
from functools import partial
from typing import Any

from . import _drivers as d
from ._link import RECORD_TRANSPORTS, End, Job, Listener, peer, run_pair, tls_context


def send_msg(sock: End, data: bytes) -> None:
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_exact(sock: End, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("the peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_msg(sock: End) -> bytes:
    (n,) = struct.unpack("!I", recv_exact(sock, 4))
    return recv_exact(sock, n)


def _record_recv(sock: End) -> bytes:
    return sock.recv(65536)


def _send_recv(end: End, transport: str) -> tuple[d.Send, d.Recv]:
    if transport in RECORD_TRANSPORTS:
        assert isinstance(end, socket.socket)
        return end.send, partial(_record_recv, end)
    return partial(send_msg, end), partial(recv_msg, end)


def run(job: Job) -> d.Result:
    case = job.case
    if case == "connect":
        return _connect(job)
    if case in ("fdpass", "fdpingpong"):
        pingpong = case == "fdpingpong"

        def fd_server(end: End) -> None:
            assert isinstance(end, socket.socket)

            def recv_fd() -> int:
                _, fds, _, _ = socket.recv_fds(end, 1, 1)
                return fds[0]

            d.fd_server(recv_fd, partial(send_msg, end), job, pingpong=pingpong)

        def fd_client(end: End) -> d.Result:
            assert isinstance(end, socket.socket)

            def send_fd(fd: int) -> None:
                socket.send_fds(end, [b"f"], [fd])

            return d.fd_client(send_fd, partial(recv_msg, end), job, pingpong=pingpong)

        return run_pair(job, fd_server, fd_client)

    if case == "rtt":
        server, client = d.rtt_server, d.rtt_client
    else:  # rate, bulk, large
        server, client = d.one_way_server, d.one_way_client
    if job.transport == "tls":
        return _over_tls(job, server, client)
    return run_pair(
        job,
        lambda end: server(*_send_recv(end, job.transport), job),
        lambda end: client(*_send_recv(end, job.transport), job),
    )


def _over_tls(job: Job, server: Any, client: Any) -> d.Result:
    """The stream loops on ``ssl.SSLSocket`` ends (the handshake is not timed)."""

    def serve(end: End) -> None:
        assert isinstance(end, socket.socket)
        with tls_context(job, server=True).wrap_socket(end, server_side=True) as tls:
            server(*_send_recv(tls, "tls"), job)

    def run_client(end: End) -> d.Result:
        assert isinstance(end, socket.socket)
        ctx = tls_context(job, server=False)
        with ctx.wrap_socket(end, server_hostname="127.0.0.1") as tls:
            result: d.Result = client(*_send_recv(tls, "tls"), job)
            return result

    return run_pair(job, serve, run_client)


def _connect(job: Job) -> d.Result:
    listener = Listener(job.transport, job)
    family = listener.family
    address = listener.address

    def accept_once() -> None:
        conn, _ = listener.sock.accept()
        conn.close()

    def connect_once() -> None:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            sock.recv(1)  # the server's close

    try:
        with peer(lambda: d.connect_server(accept_once, job), job):
            listener.close()
            return d.connect_client(connect_once, job)
    finally:
        listener.close()
        listener.unlink()
