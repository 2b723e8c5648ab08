"""afunix's blocking :class:`~afunix.channel.Channel`, used the way its docs show.

Rows: ``unix`` is a channel over a Unix stream socketpair with default
options (one-way bursts pass ``more=True``, as a producer that knows more
messages follow does), except that bulk throughput and large payloads over
``unix`` never use a memfd (``memfd_threshold=None``: the socket copy).
``memfd`` sends each large payload with ``send(data, memfd=True)``: a sealed
memfd. Connection setup uses ``Channel.listen``/``connect``. ``tcp`` is a
channel on each end of a loopback TCP connection (what ``Channel.connect``
and ``Listener.accept`` give for ``tcp://``); ``tls`` the same over TLS with
mutual certificates (:class:`afunix.lowlevel.TlsSocket`, what ``tls://`` with
``ssl=`` gives), against stdlib code on an ``ssl.SSLSocket``.
"""

from __future__ import annotations

import contextlib
import socket
from functools import partial
from typing import Any

from afunix.channel import Channel
from afunix.lowlevel import TlsSocket

from . import _drivers as d
from ._link import End, Job, peer, run_pair, tls_context


def touch(data: Any) -> None:
    """Make a mapped payload resident (one byte per page), as a copy would be."""
    if isinstance(data, memoryview) and len(data) > 4096:
        bytes(data[::4096])


def options(job: Job) -> dict[str, Any]:
    """Channel options: the defaults, except never a memfd for the bulk case and for
    ``large`` over ``unix`` (the socket copy); ``large`` over ``memfd`` sends with
    ``memfd=True`` (see :func:`send_kwargs`)."""
    if job.case == "bulk" or (job.case == "large" and job.transport == "unix"):
        return {"memfd_threshold": None, "max_size": max(job.size, 1 << 20)}
    return {"max_size": max(job.size, 64 << 20)}


def channel_of(end: End, job: Job, *, server: bool = False) -> Channel:
    assert isinstance(end, socket.socket)
    if job.transport == "tls":  # the handshake is not timed
        ctx = tls_context(job, server=server)
        where = "tls://127.0.0.1"
        tls = (
            TlsSocket.server(end, ctx, where, 60)
            if server
            else TlsSocket.client(end, ctx, "127.0.0.1", where, 60)
        )
        return Channel(tls, **options(job))  # type: ignore[arg-type]
    return Channel(end, **options(job))


def send_kwargs(job: Job) -> dict[str, Any]:
    """``more=True`` for bursts of small messages (with or without a descriptor);
    ``memfd=True`` for the memfd row."""
    if job.case == "large" and job.transport == "memfd":
        return {"memfd": True}
    if job.case in ("rate", "fdpass"):
        return {"more": True}
    return {}


def receiver(chan: Channel, job: Job) -> d.Recv:
    if job.case in ("bulk", "large"):

        def recv_payload() -> None:
            with chan.recv() as msg:
                touch(msg.data)

        return recv_payload
    return chan.recv


def run(job: Job) -> d.Result:
    if job.case == "connect":
        return _connect(job)
    transport = "unix" if job.transport == "memfd" else job.transport
    pingpong = job.case == "fdpingpong"

    def server(end: End) -> None:
        with channel_of(end, job, server=True) as chan:
            if job.case == "rtt":
                recv = chan.recv
                d.rtt_server(chan.send, lambda: recv().data, job)
            elif job.case in ("fdpass", "fdpingpong"):

                def recv_fd() -> int:
                    return chan.recv().take_fd(0)

                d.fd_server(recv_fd, chan.send, job, pingpong=pingpong)
            else:
                d.one_way_server(chan.send, receiver(chan, job), job)

    def client(end: End) -> d.Result:
        with channel_of(end, job) as chan:
            if job.case == "rtt":
                return d.rtt_client(chan.send, chan.recv, job)
            if job.case in ("fdpass", "fdpingpong"):
                send, more = chan.send, job.case == "fdpass"  # a burst: more follow

                def send_fd(fd: int) -> None:
                    send(b"", (fd,), more=more)

                return d.fd_client(send_fd, chan.recv, job, pingpong=pingpong)
            # Bursts say that more messages follow (recv() then flushes what is held).
            return d.one_way_client(partial(chan.send, **send_kwargs(job)), chan.recv, job)

    return run_pair(Job(**{**job.to_json(), "transport": transport}), server, client)


def _connect(job: Job) -> d.Result:
    path = job.path("a")
    listener = Channel.listen(path)  # stays open here: closing it removes the file

    def accept_once() -> None:
        listener.accept().close()

    def connect_once() -> None:
        with Channel.connect(path) as chan, contextlib.suppress(EOFError):
            chan.recv()  # the server's close

    try:
        with peer(lambda: d.connect_server(accept_once, job), job):
            return d.connect_client(connect_once, job)
    finally:
        listener.close()
