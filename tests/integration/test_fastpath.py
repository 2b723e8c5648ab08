"""The channel fast paths (issue 6): plain frames decoded in batches, held frames
(``send(..., more=True)``) written together, and the order of everything kept.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from afunix._protocol import (
    FLAG_MEMFD,
    HEADER,
    MAGIC,
    NEED_DATA,
    FrameError,
    RawMessage,
    StreamDecoder,
)
from afunix.aio import AsyncChannel
from afunix.channel import Channel

from ..conftest import simple_payload


def frame(payload: bytes, nfds: int = 0, magic: int = MAGIC) -> bytes:
    return HEADER.pack(magic, 0, nfds, len(payload)) + payload


# ---- sans-IO: StreamDecoder.next_fast --------------------------------------------------


def fast(dec: StreamDecoder) -> object:
    """``next_fast``, a plain frame's Message as its payload bytes."""
    item = dec.next_fast()
    return item if item is None or type(item) is tuple else simple_payload(item)


def test_next_fast_decodes_every_buffered_frame_in_order() -> None:
    dec = StreamDecoder()
    dec.receive_data(b"".join(frame(bytes([i]) * i) for i in range(5)) + frame(b"tail")[:6])
    got = [fast(dec) for _ in range(5)]
    assert got == [bytes([i]) * i for i in range(5)]
    assert dec.next_fast() is None  # the tail is incomplete
    assert dec.next_message() is NEED_DATA
    dec.receive_data(frame(b"tail")[6:])
    assert fast(dec) == b"tail"
    assert dec.buffered == 0


def test_next_fast_gives_descriptors_with_their_frame() -> None:
    r, w = os.pipe()
    os.close(w)
    dec = StreamDecoder()
    try:
        dec.receive_data(frame(b"one") + frame(b"two"))
        dec.receive_data(frame(b"fd", nfds=1) + frame(b"three"), [r])
        assert fast(dec) == b"one"
        assert fast(dec) == b"two"
        assert dec.next_fast() == (b"fd", [r])  # the descriptor, owned by the caller now
        assert dec.held_fds == 0
        assert fast(dec) == b"three"
    finally:
        dec.close()
        os.close(r)


def test_next_fast_leaves_a_memfd_frame_to_next_message() -> None:
    r, w = os.pipe()
    os.close(w)
    dec = StreamDecoder()
    try:
        dec.receive_data(frame(b"one") + HEADER.pack(MAGIC, FLAG_MEMFD, 1, 10), [r])
        assert fast(dec) == b"one"
        assert dec.next_fast() is None  # a flag: the general path decides
        msg = dec.next_message()
        assert isinstance(msg, RawMessage) and msg.memfd and msg.fds == [r]
    finally:
        dec.close()
        os.close(r)


def test_next_message_returns_frames_decoded_ahead_first() -> None:
    dec = StreamDecoder()
    dec.receive_data(frame(b"a") + frame(b"b") + frame(b"c"))
    assert fast(dec) == b"a"
    got = [dec.next_message() for _ in range(2)]
    assert [m.data for m in got if isinstance(m, RawMessage)] == [b"b", b"c"]


@pytest.mark.parametrize(
    "bad",
    [frame(b"x", magic=0x00), HEADER.pack(MAGIC, 0x80, 0, 1) + b"x", HEADER.pack(MAGIC, 0, 0, 99)],
)
def test_next_fast_never_decides_a_bad_frame(bad: bytes) -> None:
    dec = StreamDecoder(max_size=64)
    dec.receive_data(frame(b"ok") + bad + b"\0" * 99)
    assert fast(dec) == b"ok"
    assert dec.next_fast() is None
    with pytest.raises(FrameError):
        dec.next_message()


# ---- Channel: plain messages, more=True, flush ------------------------------------------


def test_more_holds_until_a_message_without_more() -> None:
    a, b = Channel.pair()
    with a, b:
        for i in range(3):
            a.send(b"m%d" % i, more=True)
        with pytest.raises(BlockingIOError):
            b.socket.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # nothing written yet
        a.send(b"last")
        assert [b.recv().data for _ in range(4)] == [b"m0", b"m1", b"m2", b"last"]


def test_flush_recv_and_close_write_what_is_held() -> None:
    a, b = Channel.pair()
    with b:
        a.send(b"x", more=True)
        a.flush()
        assert b.recv().data == b"x"
        a.send(b"ping", more=True)
        # recv() flushes first: a reply can never wait on what we hold.
        with pytest.raises(BlockingIOError):
            b.socket.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        b.socket.setblocking(True)
        a.send(b"y", more=True)
        a.close()
        assert [b.recv().data for _ in range(2)] == [b"ping", b"y"]
        with pytest.raises(EOFError):
            b.recv()


def test_more_writes_once_enough_is_held() -> None:
    a, b = Channel.pair()
    with a, b:
        for _ in range(70):
            a.send(b"z" * 1000, more=True)  # 70 KB > the 64 KiB the channel holds
        assert len(b.socket.recv(1 << 20, socket.MSG_DONTWAIT | socket.MSG_PEEK)) > 60_000


def test_descriptors_keep_their_place_after_held_messages() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        with a, b:
            a.send(b"first", more=True)
            a.send(b"with fd", [w])
            a.send(b"after")
            assert b.recv().data == b"first"
            with b.recv() as msg:
                assert msg.data == b"with fd" and len(msg.fds) == 1
            assert b.recv().data == b"after"
    finally:
        os.close(r)
        os.close(w)


def test_small_memfd_threshold_still_uses_memfd() -> None:
    a, b = Channel.pair(memfd_threshold=16)
    with a, b:
        a.send(b"s" * 8)  # below the threshold: the plain fast path
        a.send(b"m" * 32)  # at or above it: a sealed memfd, even if small
        assert b.recv().data == b"s" * 8
        with b.recv() as msg:
            assert isinstance(msg.data, memoryview) and bytes(msg.data) == b"m" * 32


def test_fast_path_on_a_closed_channel_raises() -> None:
    a, b = Channel.pair()
    b.close()
    a.close()
    with pytest.raises(OSError):
        a.send(b"late")


def test_many_small_messages_across_processes() -> None:
    a, b = Channel.pair()
    n = 20000
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            a.close()
            total = sum(len(b.recv().data) for _ in range(n))
            b.send(str(total).encode())
            code = 0
        finally:
            os._exit(code)
    b.close()
    with a:
        for i in range(n):
            a.send(b"%d" % i, more=True)
        assert int(a.recv().data) == sum(len(b"%d" % i) for i in range(n))
    _, status = os.waitpid(pid, 0)
    assert status == 0


# ---- AsyncChannel -------------------------------------------------------------------------


def test_async_more_flush_and_aclose() -> None:
    async def main() -> None:
        a, b = AsyncChannel.pair()
        try:
            for i in range(3):
                await a.send(b"a%d" % i, more=True)
            await a.send(b"now")
            assert [(await b.recv()).data for _ in range(4)] == [b"a0", b"a1", b"a2", b"now"]
            await a.send(b"held", more=True)
            await a.flush()
            assert (await b.recv()).data == b"held"
            await a.send(b"bye", more=True)
            await a.aclose()
            assert (await b.recv()).data == b"bye"
            with pytest.raises(EOFError):
                await b.recv()
        finally:
            a.close()
            b.close()

    asyncio.run(main())


# ---- large plain payloads: received straight into their own buffer ------------------------


def test_start_direct_take_buffered_and_skip() -> None:
    dec = StreamDecoder()
    body = bytes(range(256)) * 400  # 102400 bytes
    dec.receive_data(frame(body)[:1000])
    assert dec.start_direct(200_000) == 0  # smaller than asked for: not direct
    assert dec.start_direct(65536) == len(body)
    head = dec.take_buffered_bytes()
    assert head == body[: 1000 - HEADER.size]
    dec.skip(len(body) - 992)  # what the caller received itself
    assert dec.take_buffered_bytes() == b""
    dec.receive_data(frame(b"next"))
    assert fast(dec) == b"next"
    assert dec.next_message() is NEED_DATA


def test_large_plain_payloads_arrive_whole_and_in_order() -> None:
    a, b = Channel.pair(memfd_threshold=None)
    big = bytes(range(256)) * 4096  # 1 MiB
    with a, b:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                for data in (big, b"small", big[:70000], big):
                    a.send(data)
                code = 0
            finally:
                os._exit(code)
        got = [b.recv().data for _ in range(4)]
        os.waitpid(pid, 0)
    assert isinstance(got[0], memoryview) and got[0].readonly  # received in place
    assert [bytes(g) for g in got] == [big, b"small", big[:70000], big]


def test_async_large_plain_payloads_arrive_whole_and_in_order() -> None:
    """The asyncio channel receives large payloads in place too, waiting as they come."""
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffer holds

    async def main() -> list[bytes | memoryview]:
        a, b = AsyncChannel.pair(memfd_threshold=None)
        async with a, b:

            async def sender() -> None:
                for data in (big, b"small", big[:300_000], big):
                    await a.send(data)

            task = asyncio.ensure_future(sender())
            got = [(await b.recv()).data for _ in range(4)]
            await task
            return got

    got = asyncio.run(main())
    assert isinstance(got[0], memoryview) and got[0].readonly  # received in place
    assert [bytes(g) for g in got] == [big, b"small", big[:300_000], big]


def test_async_peer_closing_mid_payload_closes_the_channel() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        chan = AsyncChannel(b)
        try:
            a.sendall(frame(b"y" * 400_000)[:100_000])
            recv = asyncio.ensure_future(chan.recv())
            await asyncio.sleep(0.05)  # it is waiting for the rest of the payload
            assert not recv.done()
            a.close()
            with pytest.raises(FrameError, match="mid-message"):
                await recv
            assert chan.closed
        finally:
            a.close()
            chan.close()

    asyncio.run(main())


def test_peer_closing_mid_payload_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    chan = Channel(b)
    try:
        a.sendall(frame(b"y" * 400_000)[:100_000])  # large: received in place
        a.close()
        with pytest.raises(FrameError, match="mid-message"):
            chan.recv()
        assert chan.closed
    finally:
        chan.close()


def test_descriptors_inside_a_payload_are_refused_and_closed() -> None:
    a, b = socket.socketpair()
    chan = Channel(b)
    r, w = os.pipe()
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            chan.recv()
        except BaseException as exc:
            errors.append(exc)

    try:
        a.sendall(frame(b"z" * 400_000)[:100_000])  # large: received in place
        reader = threading.Thread(target=receive)
        reader.start()
        time.sleep(0.2)  # the reader now waits inside the payload
        socket.send_fds(a, [b"z" * 10], [r])
        reader.join(10)
        assert len(errors) == 1 and isinstance(errors[0], FrameError)
        assert "middle of a message" in str(errors[0])
        assert chan.closed
    finally:
        chan.close()
        a.close()
        os.close(r)
        os.close(w)


def test_payloads_at_the_memfd_threshold_still_go_as_memfd() -> None:
    a, b = Channel.pair(memfd_threshold=256 * 1024)
    with a, b:
        a.send(b"q" * 100_000)  # below it: plain, received directly
        a.send(b"r" * 300_000)  # above it: memfd
        first = b.recv()
        assert bytes(first.data) == b"q" * 100_000
        with b.recv() as second:
            assert bytes(second.data) == b"r" * 300_000


def test_small_message_with_descriptors_fast_path() -> None:
    from afunix._fds import TooManyFds

    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        with a, b:
            a.send(b"held", more=True)
            a.send(b"two fds", [r, w])
            assert b.recv().data == b"held"
            with b.recv() as msg:
                assert msg.data == b"two fds" and len(msg.fds) == 2
                assert all(os.get_inheritable(fd) is False for fd in msg.fds)
            with pytest.raises(TooManyFds):
                a.send(b"", [r] * 254)
    finally:
        os.close(r)
        os.close(w)
