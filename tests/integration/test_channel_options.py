"""Channel options the broker needs, held by both shells: ``recv(timeout=)``,
:attr:`PeerTimeout.expired`, ``fd_room`` and ``discard_fds``.

Real socket pairs; the peer is a plain socket that writes exactly the bytes
and descriptors a test needs (a frame cut in two, three descriptors on one
byte). Whether the receiver still holds a descriptor is asked of the kernel:
the read end of a pipe sees end of file only once every copy of its write end
is closed. Async tests run under asyncio and under trio (anyio on each).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from afunix import AsyncChannel, Channel, ControlTruncated, PeerTimeout, ProtocolError

from ..conftest import run_under

HEADER = struct.Struct("!BBHI")


def _header(length: int, nfds: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(0xAF, flags, nfds, length)


def _rights(*fds: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def _only_copy_gone(read_end: int) -> bool:
    """Whether every copy of the pipe's write end is closed (the read end sees EOF)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


@pytest.fixture
def raw_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the peer's): ``ours`` goes to a channel, the peer writes raw bytes."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


# ------------------------------------------------------------ recv(timeout=), expired


def test_recv_timeout_bounds_the_whole_call_and_says_so(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Nothing comes: ``expired == "call"`` after the timeout; a message that began and
    stalls: the same bound holds (no message_timeout starts afresh), and the error
    says the message had begun. The socket's ``SO_RCVTIMEO`` is cleared after."""
    ours, peer = raw_pair
    chan = Channel(ours)
    started = time.monotonic()
    with pytest.raises(PeerTimeout) as idle:
        chan.recv(timeout=0.2)
    assert idle.value.expired == "call" and idle.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started >= 0.19
    assert "had begun" not in str(idle.value)
    peer.sendall(_header(10) + b"abc")  # begun, never finished
    started = time.monotonic()
    with pytest.raises(PeerTimeout) as begun:
        chan.recv(timeout=0.3)
    took = time.monotonic() - started
    assert begun.value.expired == "call" and "had begun" in str(begun.value)
    assert 0.29 <= took < 2.0
    assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) != bytes(16)
    peer.sendall(b"defghij" + _header(2) + b"ok")  # the rest, and one more message
    assert chan.recv().data == b"abcdefghij"  # (an untimed recv: SO_RCVTIMEO cleared)
    assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == bytes(16)
    assert chan.recv(timeout=5).data == b"ok"
    chan.close()


def test_the_shorter_of_the_call_and_the_channel_timeouts_wins(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = raw_pair
    chan = Channel(ours, idle_timeout=0.15, message_timeout=0.15)
    with pytest.raises(PeerTimeout) as idle:
        chan.recv(timeout=60)
    assert idle.value.expired == "idle"
    with pytest.raises(PeerTimeout) as call:
        chan.recv(timeout=0.05)
    assert call.value.expired == "call"
    peer.sendall(_header(10) + b"abc")
    with pytest.raises(PeerTimeout) as message:
        chan.recv(timeout=60)
    assert message.value.expired == "message"
    with pytest.raises(ValueError, match=">= 0"):
        chan.recv(timeout=-1)
    chan.close()


def test_send_timeout_says_send() -> None:
    a, b = Channel.pair(send_timeout=0.1)
    try:
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(PeerTimeout) as info:
            for _ in range(100_000):  # b never reads
                a.send(b"x" * 1000)
        assert info.value.expired == "send"
    finally:
        a.close()
        b.close()


def test_async_recv_timeout_and_expired(runtime: str) -> None:
    async def main() -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with peer, AsyncChannel(ours, idle_timeout=5) as chan:
            started = time.monotonic()
            with pytest.raises(PeerTimeout) as call:
                await chan.recv(timeout=0.2)
            assert call.value.expired == "call" and time.monotonic() - started >= 0.19
            peer.sendall(_header(10) + b"abc")  # begun, never finished
            started = time.monotonic()
            with pytest.raises(PeerTimeout) as begun:
                await chan.recv(timeout=0.3)
            assert begun.value.expired == "call" and "had begun" in str(begun.value)
            assert 0.29 <= time.monotonic() - started < 2.0
            peer.sendall(b"defghij")
            assert (await chan.recv(timeout=5)).data == b"abcdefghij"
        ours2, peer2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with peer2, AsyncChannel(ours2, idle_timeout=0.1, message_timeout=0.1) as chan2:
            with pytest.raises(PeerTimeout) as idle:
                await chan2.recv(timeout=60)
            assert idle.value.expired == "idle"
            peer2.sendall(_header(10) + b"abc")
            with pytest.raises(PeerTimeout) as message:
                await chan2.recv(timeout=60)
            assert message.value.expired == "message"

    run_under(runtime, main)


# ------------------------------------------------------------------ fd_room, discard_fds


def test_fd_room_bounds_what_one_recvmsg_may_bring(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Room for one: three descriptors on one byte are cut by the kernel (``MSG_CTRUNC``),
    the stream channel closes, and no copy of them stays in this process."""
    ours, peer = raw_pair
    chan = Channel(ours, maxfds=1, fd_room=1)
    r, w = os.pipe()
    try:
        peer.sendmsg([_header(1, 3) + b"x"], _rights(w, w, w))
        os.close(w)
        with pytest.raises(ControlTruncated):
            chan.recv(timeout=5)
        assert chan.closed
        assert _only_copy_gone(r)
    finally:
        os.close(r)
    with pytest.raises(ValueError, match="fd_room"):
        Channel.pair(fd_room=254)


def test_discard_fds_closes_each_as_it_arrives(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    """The header and one descriptor, the rest of the message withheld: the receiver
    has closed the descriptor already (the pipe sees EOF) while the message is not
    whole; once it is, it shows the descriptor as -1, and the channel goes on."""
    ours, peer = raw_pair
    chan = Channel(ours, maxfds=1, fd_room=1, discard_fds=True)
    r, w = os.pipe()
    try:
        peer.sendmsg([_header(4, 1) + b"ab"], _rights(w))
        os.close(w)
        with pytest.raises(PeerTimeout):  # the message has begun, not ended
            chan.recv(timeout=0.2)
        assert _only_copy_gone(r), "the receiver still holds the descriptor"
        peer.sendall(b"cd" + _header(2) + b"ok")
        with chan.recv(timeout=5) as msg:
            assert (msg.data, msg.fds) == (b"abcd", (-1,))
            assert msg.take_fds() == []
        assert chan.recv(timeout=5).data == b"ok"
        # One on a header announcing none (the decoder keeps such a descriptor for a
        # later header of a batch): closed all the same, nothing held meanwhile.
        r2, w2 = os.pipe()
        try:
            peer.sendmsg([_header(1) + b"z"], _rights(w2))
            os.close(w2)
            assert chan.recv(timeout=5).data == b"z"
            assert _only_copy_gone(r2)
        finally:
            os.close(r2)
    finally:
        os.close(r)
        chan.close()


def test_discard_fds_refuses_a_memfd_payload(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A memfd payload whose memfd was closed on arrival cannot be read: it is refused
    as with ``accept_memfd=False`` (EINVAL), and the stream goes on."""
    ours, peer = raw_pair
    chan = Channel(ours, maxfds=1, discard_fds=True)
    memfd = os.memfd_create("payload")
    try:
        os.write(memfd, b"data")
        peer.sendmsg([_header(4, 1, flags=1)], _rights(memfd))
    finally:
        os.close(memfd)
    with pytest.raises(ProtocolError) as info:
        chan.recv(timeout=5)
    assert info.value.errno == errno.EINVAL and not chan.closed
    peer.sendall(_header(2) + b"ok")
    assert chan.recv(timeout=5).data == b"ok"
    chan.close()


def test_async_discard_fds_and_fd_room(runtime: str) -> None:
    async def main() -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = os.pipe()
        try:
            with peer, AsyncChannel(ours, maxfds=1, fd_room=1, discard_fds=True) as chan:
                peer.sendmsg([_header(2, 1) + b"hi"], _rights(w))
                os.close(w)
                with await chan.recv(timeout=5) as msg:
                    assert (msg.data, msg.fds) == (b"hi", (-1,))
                assert _only_copy_gone(r)
                peer.sendmsg([_header(1, 2) + b"x"], _rights(r, r))
                with pytest.raises(ControlTruncated):
                    await chan.recv(timeout=5)
        finally:
            os.close(r)

    run_under(runtime, main)


def _later(delay: float, sock: socket.socket, data: bytes) -> threading.Timer:
    timer = threading.Timer(delay, sock.sendall, (data,))
    timer.start()
    return timer


def test_a_message_begun_while_the_idle_limit_ran_gets_the_message_limit() -> None:
    """Half a message within idle_timeout, the rest after it but within message_timeout:
    the message comes (the idle limit is for a message to begin)."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with peer, Channel(ours, idle_timeout=0.4, message_timeout=5) as chan:
        first = _later(0.1, peer, _header(6) + b"abc")
        rest = _later(0.8, peer, b"def")
        try:
            assert chan.recv().data == b"abcdef"
        finally:
            first.join()
            rest.join()


def test_async_a_message_begun_while_the_idle_limit_ran_gets_the_message_limit(
    runtime: str,
) -> None:
    async def main() -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with peer, AsyncChannel(ours, idle_timeout=0.4, message_timeout=5) as chan:
            first = _later(0.1, peer, _header(6) + b"abc")
            rest = _later(0.8, peer, b"def")
            try:
                assert (await chan.recv()).data == b"abcdef"
            finally:
                first.join()
                rest.join()

    run_under(runtime, main)


def test_async_a_receiver_waiting_its_turn_is_held_to_its_limits(runtime: str) -> None:
    """Two receivers, nothing comes: each gets its idle (or call) timeout, whoever waits
    for whom (trio: the second waits its turn under a lock, counted in its limits)."""

    async def main() -> None:
        import anyio

        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with peer, AsyncChannel(ours, idle_timeout=0.3) as chan:
            errors: list[str] = []

            async def receive(timeout: float | None) -> None:
                started = time.monotonic()
                try:
                    await chan.recv(timeout=timeout)
                except PeerTimeout as exc:
                    errors.append(exc.expired)
                    assert time.monotonic() - started < 3.0

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(receive, None)
                tasks.start_soon(receive, 0.1)
            assert sorted(errors) == ["call", "idle"]

    run_under(runtime, main)


def test_a_message_begun_by_the_read_that_ended_another_has_its_own_limit() -> None:
    """One read brings the end of A and the start of B: B's message_timeout runs from
    then, not from when A began (B finished 1.1 s after it began, 0.6 s after A's limit
    would have run out: it arrives)."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = _header(6) + b"aaaaaa"
    b = _header(6) + b"bbbbbb"
    with peer, Channel(ours, message_timeout=2.0) as chan:
        timers = [
            _later(0.0, peer, a[:5]),
            _later(1.5, peer, a[5:] + b[:5]),
            _later(2.6, peer, b[5:]),
        ]
        try:
            assert chan.recv().data == b"aaaaaa"
            assert chan.recv().data == b"bbbbbb"
        finally:
            for timer in timers:
                timer.join()
