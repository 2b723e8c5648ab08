"""The channel shells over ``ChannelProtocol``: timeouts, async connect, the reader callback.

* ``idle_timeout``, ``message_timeout`` and ``send_timeout`` raise
  ``PeerTimeout`` (``ETIMEDOUT``) against a real peer that is silent, stops
  mid-message, or never reads; without them the socket is never touched for
  timeouts (no ``SO_RCVTIMEO``/``SO_SNDTIMEO``, no ``settimeout``).
* ``AsyncChannel.connect`` makes one non-blocking connect and uses a worker
  thread only when the server's queue is full (``EAGAIN``).
* The asynchronous parts run under asyncio and under trio (the ``runtime``
  fixture, through anyio).
* The asyncio reader callback receives for waiting tasks: messages that come
  while nobody waits are not lost, and a message taken for a task cancelled
  before it ran goes to the next ``recv``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import afunix.aio
from afunix import AsyncChannel, Channel, PeerTimeout
from afunix._protocol import HEADER, MAGIC

TIMEVAL = struct.Struct("@ll")


def frame(data: bytes) -> bytes:
    return HEADER.pack(MAGIC, 0, 0, len(data)) + data


def kernel_timeouts(sock: socket.socket) -> tuple[tuple[int, int], tuple[int, int]]:
    rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.size)
    snd = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TIMEVAL.size)
    return TIMEVAL.unpack(rcv), TIMEVAL.unpack(snd)


# ------------------------------------------------------------------ timeouts


def test_without_timeouts_the_socket_is_left_alone() -> None:
    a, b = Channel.pair()
    with a, b:
        assert a.socket.gettimeout() is None
        assert kernel_timeouts(a.socket) == ((0, 0), (0, 0))


def test_idle_timeout_against_a_silent_peer_keeps_the_channel_open() -> None:
    a, b = Channel.pair(idle_timeout=0.2)
    with a, b:
        started = time.monotonic()
        with pytest.raises(PeerTimeout) as info:
            b.recv()
        assert info.value.errno == errno.ETIMEDOUT
        assert "idle_timeout=0.2" in str(info.value)
        assert time.monotonic() - started >= 0.19
        assert not b.closed
        a.send(b"late but welcome")
        assert b.recv().data == b"late but welcome"


def test_message_timeout_against_a_peer_that_stops_mid_message() -> None:
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chan = Channel(theirs, message_timeout=0.3)
    with raw, chan:
        whole = frame(b"x" * 100)
        raw.sendall(whole[:20])  # the header and part of the payload, then silence
        started = time.monotonic()
        with pytest.raises(PeerTimeout) as info:
            chan.recv()
        assert info.value.errno == errno.ETIMEDOUT
        assert "message_timeout=0.3" in str(info.value)
        assert 0.25 <= time.monotonic() - started < 10


def test_message_timeout_does_not_limit_the_wait_for_a_message_to_begin() -> None:
    a, b = Channel.pair(message_timeout=0.1)
    with a, b:
        timer = threading.Timer(0.4, a.send, (b"after a pause",))
        timer.start()
        try:
            assert b.recv().data == b"after a pause"  # no message had begun: no limit
        finally:
            timer.join()


def test_send_timeout_against_a_peer_that_never_reads() -> None:
    a, b = Channel.pair(send_timeout=0.2)
    with a, b:
        sent = 0
        with pytest.raises(PeerTimeout) as info:
            for sent in range(1, 100_000):  # noqa: B007 - counted for the message below
                a.send(b"y" * 1000)
        assert info.value.errno == errno.ETIMEDOUT
        assert "send_timeout=0.2" in str(info.value)
        assert sent > 10, f"timed out after {sent} messages"


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_timeout_must_be_positive(bad: float) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b, pytest.raises(ValueError, match="positive"):
        Channel(a, idle_timeout=bad)


def test_async_timeouts(runtime: str) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair(idle_timeout=0.2)
        with a, b:
            with pytest.raises(PeerTimeout) as info:
                await b.recv()
            assert "idle_timeout" in str(info.value)
            assert not b._waiter.receivers  # the timed-out wait left nothing behind
            if b._recv_lock is not None:
                assert not b._recv_lock.locked()  # (trio: the turn was given back)
            await a.send(b"still open")
            assert (await b.recv()).data == b"still open"
        raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with raw, AsyncChannel(theirs, message_timeout=0.3) as chan:
            raw.sendall(frame(b"z" * 50)[:12])
            with pytest.raises(PeerTimeout) as info:
                await chan.recv()
            assert "message_timeout" in str(info.value)
        a, b = AsyncChannel.pair(send_timeout=0.2)
        with a, b:
            with pytest.raises(PeerTimeout) as info:
                for _ in range(100_000):
                    await a.send(b"y" * 1000)
            assert "send_timeout" in str(info.value)

    anyio.run(body, backend=runtime)


def test_async_idle_timeout_counts_the_wait_for_a_turn(runtime: str) -> None:
    """Two receivers with an idle timeout and a silent peer: both time out on time,
    the second although the first held the turn meanwhile."""

    async def body() -> None:
        a, b = AsyncChannel.pair(idle_timeout=0.3)
        errors: list[str] = []

        async def receive() -> None:
            with pytest.raises(PeerTimeout) as info:
                await b.recv()
            errors.append(str(info.value))

        with a, b, anyio.fail_after(0.3 * 2 + 10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                tg.start_soon(receive)
        assert len(errors) == 2 and all("idle_timeout" in e for e in errors)

    anyio.run(body, backend=runtime)


# ------------------------------------------------------------ async connect


def counting_to_thread(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., Any]]:
    """Count the channel's trips to a worker thread (under either runtime)."""
    calls: list[Callable[..., Any]] = []
    real = afunix.aio.to_thread

    async def to_thread(func: Callable[..., Any], /, *args: Any) -> Any:
        calls.append(func)
        return await real(func, *args)

    monkeypatch.setattr(afunix.aio, "to_thread", to_thread)
    return calls


def test_async_connect_without_a_thread_when_the_queue_has_room(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    calls = counting_to_thread(monkeypatch)
    path = sockdir / "s"

    async def body() -> None:
        with Channel.listen(path) as listener:
            for _ in range(20):
                client = await AsyncChannel.connect(path)
                with client, listener.accept() as server:
                    await client.send(b"ping")
                    assert server.recv().data == b"ping"

    anyio.run(body, backend=runtime)
    assert calls == []  # 20 connects, no worker thread


def test_async_connect_waits_in_a_thread_when_the_queue_is_full(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    calls = counting_to_thread(monkeypatch)
    path = sockdir / "s"

    async def body() -> None:
        with Channel.listen(path, backlog=0) as listener:
            first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            first.connect(str(path))  # fills the queue of one (Linux: backlog 0 is 1)
            accepted: list[Channel] = []
            clients: list[AsyncChannel] = []

            async def connect() -> None:
                clients.append(await AsyncChannel.connect(path, timeout=20))

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(connect)
                    with anyio.fail_after(10):
                        while not calls:  # until the connect waits in its worker thread
                            await anyio.sleep(0.01)
                    assert not clients
                    accepted.append(listener.accept())  # room: the waiting connect goes in
                    accepted.append(await anyio.to_thread.run_sync(listener.accept))
                with clients[0] as client:
                    await client.send(b"through")
                    assert accepted[1].recv().data == b"through"
            finally:
                first.close()
                for chan in accepted:
                    chan.close()

    anyio.run(body, backend=runtime)
    assert len(calls) == 1  # the connect's own


def test_async_connect_reports_a_missing_socket(sockdir: Path, runtime: str) -> None:
    async def body() -> None:
        with pytest.raises(OSError) as info:
            await AsyncChannel.connect(sockdir / "nobody-here")
        assert info.value.errno == errno.ENOENT and "no such socket" in str(info.value)

    anyio.run(body, backend=runtime)


# ---------------------------------------------------------- reader callback


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_messages_arriving_while_nobody_waits_are_not_lost() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            first = asyncio.ensure_future(b.recv())
            await turns()
            await a.send(b"first")
            assert (await first).data == b"first"  # the reader stays registered
            for i in range(200):
                await a.send(b"%d" % i)
                if i % 50 == 0:
                    await turns()  # callbacks with nobody waiting: they unregister
            got = [bytes((await b.recv()).data) for _ in range(200)]
            assert got == [b"%d" % i for i in range(200)]

    asyncio.run(body())


def test_a_receiver_cancelled_before_it_ran_loses_no_message() -> None:
    """1,000 rounds: the reader callback completes a task's future, the task is
    cancelled before it resumes, and the message goes to the next recv."""

    async def body() -> int:
        a, b = AsyncChannel.pair()
        rescued = 0
        with a, b:
            for i in range(1000):
                task = asyncio.ensure_future(b.recv())
                await turns(2)
                (fut,) = b._waiter.receivers
                await a.send(b"%d" % i)
                while not fut.done():
                    await asyncio.sleep(0)
                task.cancel()  # the result is there, the task has not run yet
                with pytest.raises(asyncio.CancelledError):
                    await task
                msg = await asyncio.wait_for(b.recv(), 5)
                assert msg.data == b"%d" % i
                rescued += 1
        return rescued

    assert asyncio.run(body()) == 1000


def test_a_rescued_message_goes_to_the_next_waiting_receiver() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            first = asyncio.ensure_future(b.recv())
            await turns(2)
            second = asyncio.ensure_future(b.recv())
            await turns(2)
            fut = b._waiter.receivers[0]
            await a.send(b"one")
            while not fut.done():
                await asyncio.sleep(0)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert (await asyncio.wait_for(second, 5)).data == b"one"

    asyncio.run(body())
