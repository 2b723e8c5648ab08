"""afunix's :class:`~afunix.aio.AsyncChannel`: ``await send()``/``await recv()``.

The same rows as :mod:`.impl_afunix` (for large payloads only the default
path, sealed memfds from 256 KiB up), one event loop per process.
"""

from __future__ import annotations

import asyncio
import socket
import time

from afunix.aio import AsyncChannel

from . import _drivers as d
from ._link import End, Job, run_pair
from .impl_afunix import options, send_kwargs, touch


async def _server(sock: socket.socket, job: Job) -> None:
    async with AsyncChannel(sock, **options(job)) as chan:
        if job.case == "rtt":
            for _ in range(job.warmup + job.count):
                await chan.send((await chan.recv()).data)
            return
        pingpong = job.case == "fdpingpong"
        for n in (job.warmup, job.count):
            if not n:
                continue
            for _ in range(n):
                msg = await chan.recv()
                if job.case in ("fdpass", "fdpingpong"):
                    msg.close()
                    if pingpong:
                        await chan.send(d.ACK)
                else:
                    touch(msg.data)
                    msg.close()
            if not pingpong:
                await chan.send(d.ACK)


async def _client(sock: socket.socket, job: Job) -> d.Result:
    async with AsyncChannel(sock, **options(job)) as chan:
        clock = time.perf_counter_ns
        msg = d.payload(job.size)
        if job.case == "rtt":
            for _ in range(job.warmup):
                await chan.send(msg)
                await chan.recv()
            stamps = [0] * (job.count + 1)
            stamps[0] = clock()
            for i in range(1, job.count + 1):
                await chan.send(msg)
                await chan.recv()
                stamps[i] = clock()
            return d.latency_result(stamps, job.size)
        kwargs = send_kwargs(job)
        fds = job.case in ("fdpass", "fdpingpong")
        pingpong = job.case == "fdpingpong"
        fd = open("/dev/null", "rb") if fds else None  # noqa: SIM115 - closed below
        try:
            start = clock()
            for n in (job.warmup, job.count):
                if not n:
                    continue
                start = clock()
                for _ in range(n):
                    if fd is not None:
                        await chan.send(b"", (fd,), **kwargs)
                        if pingpong:
                            await chan.recv()
                    else:
                        await chan.send(msg, **kwargs)
                if not pingpong:
                    await chan.recv()
            nbytes = 0 if fds else job.size * job.count
            return d.result(clock() - start, job.count, nbytes)
        finally:
            if fd is not None:
                fd.close()


def _sock(end: End) -> socket.socket:
    assert isinstance(end, socket.socket)
    return end


def run(job: Job) -> d.Result:
    transport = "unix" if job.transport == "memfd" else job.transport
    return run_pair(
        Job(**{**job.to_json(), "transport": transport}),
        lambda end: asyncio.run(_server(_sock(end), job)),
        lambda end: asyncio.run(_client(_sock(end), job)),
    )
