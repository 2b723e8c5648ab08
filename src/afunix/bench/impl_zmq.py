"""pyzmq over ``ipc://`` (a Unix stream socket underneath): two PAIR sockets
with the library's defaults, ``send``/``recv`` of ``bytes``.
"""

from __future__ import annotations

import os

import zmq

from . import _drivers as d
from ._link import Job, peer


def run(job: Job) -> d.Result:
    path = job.path("z")
    endpoint = f"ipc://{path}"
    one_way = job.case != "rtt"

    def serve() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        try:
            sock.bind(endpoint)
            if one_way:
                d.one_way_server(sock.send, sock.recv, job)
            else:
                d.rtt_server(sock.send, sock.recv, job)
        finally:
            sock.close()
            ctx.term()

    try:
        with peer(serve, job):
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.RECONNECT_IVL, 1)  # the peer may not have bound yet
            try:
                sock.connect(endpoint)
                if one_way:
                    return d.one_way_client(sock.send, sock.recv, job)
                return d.rtt_client(sock.send, sock.recv, job)
            finally:
                sock.close()
                ctx.term()
    finally:
        if os.path.exists(path):
            os.unlink(path)
