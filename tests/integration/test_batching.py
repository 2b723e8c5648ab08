"""Descriptors of many messages in one ``sendmsg`` (issue 6): ``send(..., fds, more=True)``.

The sender holds small messages with their descriptors (duplicated, so the
caller may close its own at once) and writes them with one ``sendmsg``
carrying up to 253 descriptors (``SCM_MAX_FD``). The receiver hands every
message exactly its own descriptors. These tests check that on the real
kernel: the batching really happens (a raw receiver sees many descriptors
in one ``recvmsg``), every descriptor lands on its own message (by inode),
and nothing leaks on any path.
"""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import os
import socket
import tempfile

import pytest

from afunix import ProtocolError
from afunix._protocol import SCM_MAX_FD, RawMessage, StreamDecoder
from afunix.aio import AsyncChannel
from afunix.channel import Channel

pytestmark = pytest.mark.timeout(60)


def files(n: int) -> list[int]:
    """*n* descriptors of distinct files (distinct inodes), to tell them apart."""
    out = []
    for _ in range(n):
        fd, path = tempfile.mkstemp(dir="/tmp", prefix="afx-b-")
        os.unlink(path)
        out.append(fd)
    return out


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def raw_recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` with room for 253 descriptors, as the kernel delivers it."""
    data, anc, flags, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(SCM_MAX_FD * 4))
    assert not flags & socket.MSG_CTRUNC
    fds = array.array("i")
    for level, kind, payload in anc:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def test_held_messages_go_in_one_sendmsg_with_all_their_descriptors() -> None:
    mine = files(3)
    a_sock, b_sock = socket.socketpair()
    a = Channel(a_sock)
    try:
        a.send(b"plain first", more=True)
        a.send(b"one", [mine[0]], more=True)
        a.send(b"", [mine[1], mine[2]], more=True)
        want = [inode(fd) for fd in mine]
        for fd in mine:  # ours to close at once: the channel holds duplicates
            os.close(fd)
        a.send(b"last, no more")  # writes everything held
        data, fds = raw_recv(b_sock)
        assert len(fds) == 3  # one sendmsg carried all three
        assert [inode(fd) for fd in fds] == want
        dec = StreamDecoder()
        dec.receive_data(data, fds)
        got = [dec.next_message() for _ in range(4)]
        assert [m.data for m in got if isinstance(m, RawMessage)] == [
            b"plain first",
            b"one",
            b"",
            b"last, no more",
        ]
        assert [len(m.fds) for m in got if isinstance(m, RawMessage)] == [0, 1, 2, 0]
        for fd in fds:
            os.close(fd)
    finally:
        a.close()
        b_sock.close()


def test_253_descriptors_at_most_per_sendmsg() -> None:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    a_sock, b_sock = socket.socketpair()
    a = Channel(a_sock)
    try:
        for _ in range(300):
            a.send(b"", [fd], more=True)
        a.flush()
        counts = []
        while sum(counts) < 300:
            _, fds = raw_recv(b_sock)
            counts.append(len(fds))
            for got in fds:
                os.close(got)
        assert counts == [SCM_MAX_FD, 300 - SCM_MAX_FD]
    finally:
        os.close(fd)
        a.close()
        b_sock.close()


@pytest.mark.parametrize("recv_bufsize", [16, 4096, 256 * 1024])
def test_every_message_gets_its_own_descriptors(recv_bufsize: int) -> None:
    """Mixed messages, batched and not, received through buffers that cut the
    stream anywhere: each message has exactly the files sent with it."""
    pool = files(40)
    plan: list[tuple[bytes, list[int], bool]] = []
    for i in range(400):
        nfds = (0, 1, 1, 2, 3)[i % 5]
        chosen = [pool[(i + k) % len(pool)] for k in range(nfds)]
        payload = bytes([i % 256]) * (i % 37)
        if i % 97 == 0:
            payload = b"L" * 20_000  # too big to hold: written after the held ones
        plan.append((payload, chosen, i % 11 != 0))
    a, b = Channel.pair(recv_bufsize=recv_bufsize)
    try:
        expected = [(payload, [inode(fd) for fd in fds]) for payload, fds, _ in plan]

        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                b.close()
                for payload, fds, more in plan:
                    a.send(payload, fds, more=more)
                a.close()
                code = 0
            finally:
                os._exit(code)
        a.close()
        got = []
        for msg in b:
            with msg:
                got.append((bytes(msg.data), [inode(fd) for fd in msg.fds]))
        assert os.waitpid(pid, 0)[1] == 0
        assert got == expected
    finally:
        a.close()
        b.close()
        for fd in pool:
            os.close(fd)


def test_in_flight_limit_counts_only_messages_handed_out() -> None:
    """A batch of 200 descriptors does not trip max_fds_in_flight=64 when the
    receiver closes each message as it goes: only delivered ones count."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    a, b = Channel.pair(max_fds_in_flight=64)
    try:
        for _ in range(200):
            a.send(b"x", [fd], more=True)
        a.flush()
        for _ in range(200):
            os.close(b.recv().take_fd(0))
        for _ in range(65):
            a.send(b"y", [fd], more=True)
        a.flush()
        held = [b.recv() for _ in range(64)]
        with pytest.raises(ProtocolError) as info:
            b.recv()
        assert "in flight" in str(info.value)
        for msg in held:
            msg.close()
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_close_drops_held_duplicates() -> None:
    """Closing with held messages writes them; if the peer is gone, the
    duplicates are closed anyway (the fd-leak check of every test sees to it)."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    a, b = Channel.pair()
    try:
        b.close()
        for _ in range(10):
            a.send(b"", [fd], more=True)
        assert len(a._proto.held_fds) == 10
    finally:
        a.close()
        os.close(fd)
    assert a._proto.held_fds == []


def test_a_closed_descriptor_is_refused_before_anything_is_held() -> None:
    a, b = Channel.pair()
    with a, b:
        fd = max(int(n) for n in os.listdir("/proc/self/fd")) + 100  # surely not open
        with pytest.raises(OSError) as info:
            a.send(b"", [fd], more=True)
        assert info.value.errno == errno.EBADF  # from the duplicate
        assert not a._proto.held
        a.send(b"still fine")
        assert b.recv().data == b"still fine"


def test_async_batches_descriptors_too() -> None:
    pool = files(5)

    async def main() -> list[tuple[bytes, list[int]]]:
        a, b = AsyncChannel.pair()
        try:
            for i in range(50):
                await a.send(bytes([i]), [pool[i % 5]], more=True)
            await a.send(b"end")
            out = []
            for _ in range(51):
                with await b.recv() as msg:
                    out.append((bytes(msg.data), [inode(fd) for fd in msg.fds]))
            return out
        finally:
            a.close()
            b.close()

    try:
        want = [(bytes([i]), [inode(pool[i % 5])]) for i in range(50)] + [(b"end", [])]
        assert asyncio.run(main()) == want
    finally:
        for fd in pool:
            os.close(fd)


def test_a_forgotten_message_closes_its_descriptors_and_says_so() -> None:
    """Only messages with descriptors carry a finalizer; it closes what was not taken,
    warns, and gives the channel's in-flight count back."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    a, b = Channel.pair(max_fds_in_flight=2)
    try:
        a.send(b"one", [fd, fd])
        msg = b.recv()
        received = list(msg.fds)
        assert b._proto.in_flight == 2
        with pytest.warns(ResourceWarning, match="2 descriptor"):
            del msg
            gc.collect()
        for got in received:
            with pytest.raises(OSError):
                os.fstat(got)
        assert b._proto.in_flight == 0
        a.send(b"two", [fd, fd])  # room again
        with b.recv() as again:
            assert len(again.fds) == 2
        plain = b"plain"
        a.send(plain)
        assert b.recv().data == plain  # no finalizer, no warning
    finally:
        os.close(fd)
        a.close()
        b.close()
