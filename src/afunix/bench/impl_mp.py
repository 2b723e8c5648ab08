"""``multiprocessing``: a duplex :func:`multiprocessing.Pipe` (a Unix stream
socketpair with a length header per message), descriptors through
:mod:`multiprocessing.reduction`, connections through
:mod:`multiprocessing.connection` ``Listener``/``Client``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from multiprocessing import reduction
from multiprocessing.connection import Client, Connection, Listener

from . import _drivers as d
from ._link import Job, peer


def _pair_run(job: Job) -> d.Result:
    mine, theirs = multiprocessing.Pipe()
    pingpong = job.case == "fdpingpong"

    def serve() -> None:
        mine.close()
        with theirs:
            if job.case == "rtt":
                d.rtt_server(theirs.send_bytes, theirs.recv_bytes, job)
            elif job.case in ("fdpass", "fdpingpong"):
                d.fd_server(
                    lambda: int(reduction.recv_handle(theirs)),
                    theirs.send_bytes,
                    job,
                    pingpong=pingpong,
                )
            else:
                d.one_way_server(theirs.send_bytes, theirs.recv_bytes, job)

    with mine, peer(serve, job) as pid:
        theirs.close()
        if job.case == "rtt":
            return d.rtt_client(mine.send_bytes, mine.recv_bytes, job)
        if job.case in ("fdpass", "fdpingpong"):

            def send_fd(fd: int) -> None:
                reduction.send_handle(mine, fd, pid)

            return d.fd_client(send_fd, mine.recv_bytes, job, pingpong=pingpong)
        return d.one_way_client(mine.send_bytes, mine.recv_bytes, job)


def _connect(job: Job) -> d.Result:
    if job.transport == "tcp":
        listener = Listener(("127.0.0.1", 0), family="AF_INET")
    else:
        listener = Listener(job.path("m"), family="AF_UNIX")
    address, family = listener.address, ("AF_INET" if job.transport == "tcp" else "AF_UNIX")

    def accept_once() -> None:
        listener.accept().close()

    def connect_once() -> None:
        conn: Connection = Client(address, family=family)
        with conn, contextlib.suppress(EOFError):
            conn.recv_bytes()  # the server's close

    try:
        with peer(lambda: d.connect_server(accept_once, job), job):
            return d.connect_client(connect_once, job)
    finally:
        listener.close()  # also removes the socket file
        if family == "AF_UNIX":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)


def run(job: Job) -> d.Result:
    if job.case == "connect":
        return _connect(job)
    return _pair_run(job)
