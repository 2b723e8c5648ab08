"""asyncio streams (``open_unix_connection``/``open_connection``), written the
usual way: ``write`` + ``await drain()`` per message, ``readexactly`` for a
4-byte length header and then the body.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from . import _drivers as d
from ._link import End, Job, Listener, peer, run_pair


async def send_msg(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(struct.pack("!I", len(data)) + data)
    await writer.drain()


async def recv_msg(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack("!I", await reader.readexactly(4))
    return await reader.readexactly(n)


async def _open(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if sock.family == socket.AF_UNIX:
        return await asyncio.open_unix_connection(sock=sock)
    return await asyncio.open_connection(sock=sock)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def _client(sock: socket.socket, job: Job) -> d.Result:
    reader, writer = await _open(sock)
    try:
        msg = d.payload(job.size)
        clock = time.perf_counter_ns
        if job.case == "rtt":
            for _ in range(job.warmup):
                await send_msg(writer, msg)
                await recv_msg(reader)
            stamps = [0] * (job.count + 1)
            stamps[0] = clock()
            for i in range(1, job.count + 1):
                await send_msg(writer, msg)
                await recv_msg(reader)
                stamps[i] = clock()
            return d.latency_result(stamps, job.size)
        for n in (job.warmup, job.count):
            start = clock()
            for _ in range(n):
                await send_msg(writer, msg)
            if n:
                await recv_msg(reader)
        return d.result(clock() - start, job.count, job.size * job.count)
    finally:
        await _close(writer)


async def _server(sock: socket.socket, job: Job) -> None:
    reader, writer = await _open(sock)
    try:
        if job.case == "rtt":
            for _ in range(job.warmup + job.count):
                await send_msg(writer, await recv_msg(reader))
            return
        for n in (job.warmup, job.count):
            for _ in range(n):
                await recv_msg(reader)
            if n:
                await send_msg(writer, d.ACK)
    finally:
        await _close(writer)


def _as_socket(end: End) -> socket.socket:
    assert isinstance(end, socket.socket)
    return end


def run(job: Job) -> d.Result:
    if job.case == "connect":
        return _connect(job)
    return run_pair(
        job,
        lambda end: asyncio.run(_server(_as_socket(end), job)),
        lambda end: asyncio.run(_client(_as_socket(end), job)),
    )


def _connect(job: Job) -> d.Result:
    listener = Listener(job.transport, job)
    total = job.warmup + job.count

    async def serve() -> None:
        done = asyncio.Event()
        seen = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            writer.close()
            seen += 1
            if seen == total:
                done.set()

        if job.transport == "tcp":
            server = await asyncio.start_server(handle, sock=listener.sock)
        else:
            server = await asyncio.start_unix_server(handle, sock=listener.sock)
        async with server:
            await done.wait()

    async def connect_once() -> None:
        if job.transport == "tcp":
            host, port = listener.address
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await asyncio.open_unix_connection(listener.address)
        await reader.read(1)  # the server's close
        await _close(writer)

    async def client() -> d.Result:
        for _ in range(job.warmup):
            await connect_once()
        start = time.perf_counter_ns()
        for _ in range(job.count):
            await connect_once()
        return d.result(time.perf_counter_ns() - start, job.count)

    try:
        with peer(lambda: asyncio.run(serve()), job):
            listener.close()
            return asyncio.run(client())
    finally:
        listener.close()
        listener.unlink()
