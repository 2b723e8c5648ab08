"""The channel shells' one-call paths of the core (issue 16), on real sockets, both cores.

``Channel.send``/``AsyncChannel.send`` give a small frame to the core's
``send_frame`` (one ``sendmsg``) or, with ``more=True``, to ``hold_frame``; the
rest of a frame the kernel took only part of goes through the protocol. A
receive that finds messages decoded already takes them without a lock. These
tests force each branch and count that it ran; each runs with the compiled
core's functions and with their pure-Python twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import pytest

import afunix.aio as aio_mod
import afunix.channel as channel_mod
from afunix import PeerTimeout
from afunix._core import ccore
from afunix._io import py_send_frame
from afunix.aio import AsyncChannel
from afunix.channel import Channel

from ..conftest import open_fds

CORES = ["compiled", "pure"] if ccore is not None else ["pure"]


@pytest.fixture(params=CORES)
def partials(request: pytest.FixtureRequest) -> Iterator[list[int]]:
    """The shells' send_frame, counting the sends the kernel took only part of."""
    base = py_send_frame if request.param == "pure" else channel_mod.send_frame
    counted: list[int] = []

    def send_frame(sock: Any, data: Any, fds: Any, limit: int) -> int:
        sent = base(sock, data, fds, limit)
        if 0 <= sent < len(data) + 8:
            counted.append(sent)
        return sent

    with (
        patch.object(channel_mod, "send_frame", send_frame),
        patch.object(aio_mod, "send_frame", send_frame),
    ):
        yield counted


def shrink(chan: Any) -> None:
    chan.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


@pytest.mark.timeout(30)
def test_a_frame_cut_short_by_the_send_timeout_closes_the_channel(partials: list[int]) -> None:
    """A sender whose peer stops reading: the core's send takes what fits; the rest waits
    ``send_timeout`` in the protocol's path, then the channel closes (the frame was cut)."""
    before = open_fds()
    rounds = 0
    for rounds in range(1, 51):  # noqa: B007 - counted: until one send was cut
        a, b = Channel.pair(send_timeout=0.05)
        with a, b:
            shrink(a)
            with pytest.raises(PeerTimeout):
                for _ in range(10_000):
                    a.send(b"y" * 5000)
            if partials:
                assert a.closed  # half a frame went: the peer's framing is lost
                break
            assert not a.closed  # nothing of the last frame went: still usable
    assert partials, f"no send was cut in {rounds} rounds"
    assert open_fds() == before


@pytest.mark.timeout(60)
def test_frames_partly_sent_are_finished_intact_by_a_concurrent_reader(
    partials: list[int],
) -> None:
    """An ``AsyncChannel`` (non-blocking socket) writing faster than its peer reads: the
    rests of cut frames go through the protocol; every message arrives whole and in order."""
    before = open_fds()
    sizes = [(i * 7919) % 8000 + 1 for i in range(3000)]

    async def main() -> list[bytes]:
        a, b = AsyncChannel.pair()
        with a, b:
            shrink(a)

            async def reader() -> list[bytes]:
                return [(await b.recv()).data for _ in sizes]  # type: ignore[misc]

            task = asyncio.ensure_future(reader())
            for i, size in enumerate(sizes):
                await a.send(bytes([i % 251]) * size)
            return await task

    got = asyncio.run(main())
    assert got == [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    assert partials, "no frame was cut (the test did not reach the branch)"
    assert open_fds() == before


@pytest.mark.timeout(60)
def test_held_frames_and_ready_messages_keep_their_order_across_threads() -> None:
    """``more=True`` frames held by the core's hold_frame, with and without descriptors
    between them, flushed by size and by ``recv``; received in one thread while another
    sends: order and payloads kept, 20,000 messages."""
    before = open_fds()
    r, w = socket.socketpair()
    a, b = Channel.pair()
    got: list[Any] = []

    def receive() -> None:
        for _ in range(20_000):
            with b.recv() as msg:
                got.append((msg.data, len(msg.fds)))

    t = threading.Thread(target=receive)
    t.start()
    with a, b, r, w, contextlib.ExitStack():
        for i in range(20_000):
            fds = (r.fileno(),) if i % 97 == 0 else ()
            a.send(i.to_bytes(4, "big") * (i % 50), fds, more=i % 1000 != 999)
        a.flush()
        t.join(50)
        assert not t.is_alive()
    assert got == [
        (i.to_bytes(4, "big") * (i % 50), 1 if i % 97 == 0 else 0) for i in range(20_000)
    ]
    assert open_fds() == before
