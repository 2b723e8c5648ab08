"""``send_fds``/``recv_fds``, :class:`Outgoing`, ``describe_fd`` and sealed memfds, on a real kernel.

Covers: ints, files and sockets accepted; received descriptors are
close-on-exec; ``SCM_MAX_FD`` (253) works and 254 is refused before anything
is sent; partial writes, ``EAGAIN`` and ``EINTR`` never send a descriptor
twice or lose one; ``MSG_PEEK`` is refused; a receiver without room is told;
the memfd seals are checked before mapping.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afunix import ControlTruncated, TooManyFds
from afunix._fds import (
    SCM_MAX_FD,
    Outgoing,
    describe_fd,
    fileno_of,
    recv_fds,
    recvmsg_items,
    send_fds,
    sendall_fds,
)
from afunix._memfd import (
    REQUIRED_SEALS,
    SENDER_SEALS,
    MemfdBuffer,
    MemfdPool,
    PayloadError,
    SealedPayload,
    seal_bytes,
)


@pytest.fixture
def sp() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def same_file(fd1: int, fd2: int) -> bool:
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_ino, s1.st_dev) == (s2.st_ino, s2.st_dev)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ------------------------------------------------------------- what is accepted
def test_ints_files_and_sockets(sp: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    a, b = sp
    path = tmp_path / "f"
    path.write_bytes(b"content")
    r, w = os.pipe()
    other, other_peer = socket.socketpair()
    with open(path, "rb") as f, other, other_peer:
        try:
            n = send_fds(a, b"four", [r, f, other, w])
            assert n == 4
            data, fds, flags, _ = recv_fds(b, 100, 4)
            try:
                assert data == b"four"
                assert flags == 0
                assert len(fds) == 4
                assert same_file(fds[0], r)
                assert same_file(fds[1], f.fileno())
                assert same_file(fds[2], other.fileno())
                assert same_file(fds[3], w)
                assert os.read(fds[1], 100) == b"content"
                assert stat.S_ISSOCK(os.fstat(fds[2]).st_mode)
            finally:
                close_all(fds)
        finally:
            os.close(r)
            os.close(w)


def test_fileno_of_refuses_closed_and_odd_things() -> None:
    s = socket.socket(socket.AF_UNIX)
    s.close()
    with pytest.raises(ValueError, match="closed"):
        fileno_of(s)
    with pytest.raises(TypeError):
        fileno_of(True)
    with pytest.raises(ValueError):
        fileno_of(-3)


def test_received_descriptors_are_close_on_exec(sp: tuple[socket.socket, socket.socket]) -> None:
    a, b = sp
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)  # the sender's copy is inheritable...
        send_fds(a, b"x", [r])
        _, fds, _, _ = recv_fds(b, 1, 1)
        try:
            # ...the received one is close-on-exec all the same (MSG_CMSG_CLOEXEC).
            assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            close_all(fds)
    finally:
        os.close(r)
        os.close(w)


def test_empty_payload_cannot_carry_descriptors(sp: tuple[socket.socket, socket.socket]) -> None:
    a, _ = sp
    with pytest.raises(ValueError, match="at least one byte"):
        send_fds(a, b"", [0])


# --------------------------------------------------------------- SCM_MAX_FD
def test_253_descriptors_pass_in_one_message(sp: tuple[socket.socket, socket.socket]) -> None:
    a, b = sp
    base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        send_fds(a, b"m", [base] * SCM_MAX_FD)
    finally:
        os.close(base)
    _, fds, _, _ = recv_fds(b, 1, SCM_MAX_FD)
    try:
        assert len(fds) == 253
        assert len(set(fds)) == 253
    finally:
        close_all(fds)


def test_254_descriptors_are_refused_before_sending(
    sp: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sp
    with pytest.raises(TooManyFds, match="253") as info:
        send_fds(a, b"m", [0] * 254)
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, ValueError)
    with pytest.raises(BlockingIOError):
        b.recv(1, socket.MSG_DONTWAIT)
    with pytest.raises(ValueError, match="maxfds"):
        recv_fds(b, 1, 254)


# ----------------------------------------------- room for descriptors, MSG_PEEK
def test_receiver_without_room_is_told(sp: tuple[socket.socket, socket.socket]) -> None:
    """15.7: without room the kernel drops the descriptors; afunix reports it."""
    a, b = sp
    send_fds(a, b"x", [0])
    with pytest.raises(ControlTruncated, match="made no room") as info:
        recv_fds(b, 1, maxfds=0)
    assert info.value.errno == errno.EMSGSIZE


def test_room_for_one_sender_sends_three(sp: tuple[socket.socket, socket.socket]) -> None:
    a, b = sp
    before = sorted(os.listdir("/proc/self/fd"))
    send_fds(a, b"x", [0, 1, 2])
    with pytest.raises(ControlTruncated, match="room for 1 descriptor") as info:
        recv_fds(b, 1, maxfds=1)
    assert info.value.fds_closed >= 1  # those that did arrive were closed
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_msg_peek_is_refused_and_leaves_the_message(
    sp: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sp
    send_fds(a, b"x", [0])
    with pytest.raises(ValueError, match="MSG_PEEK"):
        recv_fds(b, 1, 1, flags=socket.MSG_PEEK)
    with pytest.raises(ValueError, match="MSG_PEEK"):
        recvmsg_items(b, 1, 0, flags=socket.MSG_PEEK)
    _, fds, _, _ = recv_fds(b, 1, 1)
    assert len(fds) == 1
    close_all(fds)


# ------------------------------------------- partial writes, EAGAIN and EINTR
def _reader(sock: socket.socket, total: int, into: dict[str, Any]) -> None:
    got = bytearray()
    fds: list[int] = []
    chunks_with_fds = []
    while len(got) < total:
        data, new, _, _ = recv_fds(sock, 65536, 8)
        if not data:
            break
        if new:
            chunks_with_fds.append(len(got))
        got += data
        fds += new
    into.update(data=bytes(got), fds=fds, at=chunks_with_fds)


def test_partial_writes_send_descriptors_once(sp: tuple[socket.socket, socket.socket]) -> None:
    a, b = sp
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    payload = os.urandom(2 * 1024 * 1024)
    out = Outgoing([b"HEAD", payload], [0, 1])
    result: dict[str, Any] = {}
    t = threading.Thread(target=_reader, args=(b, len(payload) + 4, result))
    t.start()
    calls = blocked = 0
    while not out.done:
        try:
            calls += 1
            out.send_some(a)
        except BlockingIOError:
            blocked += 1
            assert out.fds_sent or out.sent == 0
            import select

            select.select([], [a], [], 5)
    t.join(10)
    try:
        assert calls > 2  # really partial
        assert blocked > 0  # and EAGAIN happened
        assert result["data"] == b"HEAD" + payload
        assert len(result["fds"]) == 2  # exactly once
        assert result["at"] == [0]  # with the first byte
    finally:
        close_all(result.get("fds", []))


def test_eagain_before_anything_went_retries_with_descriptors(
    sp: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sp
    a.setblocking(False)
    filler = 0
    while True:  # fill the socket completely
        try:
            filler += a.send(b"\0" * 65536)
        except BlockingIOError:
            break
    out = Outgoing([b"after"], [0])
    with pytest.raises(BlockingIOError):
        out.send_some(a)
    assert not out.fds_sent and out.sent == 0  # nothing left: the fds are not lost
    drained = 0
    fds: list[int] = []
    while drained < filler:
        data, new, _, _ = recv_fds(b, 65536, 1)
        drained += len(data)
        fds += new
    assert fds == []
    assert out.send_some(a)
    data, fds, _, _ = recv_fds(b, 100, 1)
    assert data == b"after"
    assert len(fds) == 1
    close_all(fds)


class _InterruptOnce:
    """Wraps a real socket; the first ``sendmsg`` fails with EINTR before sending."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.type = sock.type
        self.calls = 0

    def sendmsg(self, *args: Any) -> int:
        self.calls += 1
        if self.calls == 1:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return self.sock.sendmsg(*args)


def test_eintr_is_retried_with_the_descriptors(sp: tuple[socket.socket, socket.socket]) -> None:
    a, b = sp
    fake = _InterruptOnce(a)
    sendall_fds(fake, b"x", [0])  # type: ignore[arg-type]
    assert fake.calls == 2
    _, fds, _, _ = recv_fds(b, 1, 1)
    assert len(fds) == 1
    close_all(fds)


def test_real_signals_during_a_blocking_send(sp: tuple[socket.socket, socket.socket]) -> None:
    """A timer signal every millisecond interrupts the blocked sendmsg again and again."""
    a, b = sp
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = os.urandom(4 * 1024 * 1024)
    hits = [0]

    def on_alarm(*_: object) -> None:
        hits[0] += 1

    result: dict[str, Any] = {}
    old = signal.signal(signal.SIGALRM, on_alarm)
    t = threading.Thread(target=_reader, args=(b, len(payload), result))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        t.start()
        sendall_fds(a, payload, [0, 1, 2])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        t.join(10)
    try:
        assert hits[0] > 0
        assert result["data"] == payload
        assert len(result["fds"]) == 3
        assert result["at"] == [0]
    finally:
        close_all(result.get("fds", []))


def test_datagram_sends_whole_packets(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        sendall_fds(a, b"one", [0])
        sendall_fds(a, b"two", [1, 2])
        first = recv_fds(b, 100, 3)
        second = recv_fds(b, 100, 3)
        try:
            assert (first.data, len(first.fds)) == (b"one", 1)
            assert (second.data, len(second.fds)) == (b"two", 2)
        finally:
            close_all(first.fds + second.fds)


# ------------------------------------------------------------------ describe_fd
def test_describe_fd_kinds(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"abcdef")
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    d = os.open(tmp_path, os.O_RDONLY)
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    null = os.open(os.devnull, os.O_WRONLY)
    mfd = seal_bytes(b"x")
    try:
        os.lseek(fd, 2, os.SEEK_SET)
        info = describe_fd(fd)
        assert info.kind == "regular file"
        assert info.target == str(path)
        assert info.inode == path.stat().st_ino
        assert info.mode.startswith("read-write")
        assert "O_APPEND" in info.mode
        assert info.offset == 2
        assert str(path) in info.describe()
        assert describe_fd(d).kind == "directory"
        assert describe_fd(r).kind == "pipe"
        assert describe_fd(r).offset is None
        assert describe_fd(w).mode == "write-only"
        assert describe_fd(s1.fileno()).kind == "socket"
        assert describe_fd(null).kind == "character device"
        assert describe_fd(null).target == "/dev/null"
        assert describe_fd(mfd).kind == "memfd"
    finally:
        for x in (fd, d, r, w, null, mfd):
            os.close(x)
        s1.close()
        s2.close()


# ----------------------------------------------------------------- sealed memfds
def test_seal_bytes_sets_every_seal() -> None:
    fd = seal_bytes(b"payload")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SENDER_SEALS
        with pytest.raises(PermissionError):
            os.write(fd, b"more")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
    finally:
        os.close(fd)


def test_sealed_payload_maps_read_only() -> None:
    data = os.urandom(100_000)
    payload = SealedPayload(seal_bytes(data), len(data))
    try:
        assert payload.view == data
        assert payload.view.readonly
        with pytest.raises(TypeError):
            payload.view[0] = 1
    finally:
        payload.close()


def test_empty_sealed_payload() -> None:
    payload = SealedPayload(seal_bytes(b""), 0)
    assert payload.view == b""
    payload.close()


def _unsealed(data: bytes, seals: int = 0) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(
    ("make", "length", "match"),
    [
        (lambda: _unsealed(b"abc"), 3, "lacks the seal"),
        (
            lambda: _unsealed(b"abc", fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
            3,
            "F_SEAL_WRITE",
        ),
        (lambda: seal_bytes(b"abc"), 4, "holds 3 bytes but the header announced 4"),
        (lambda: os.pipe()[0], 3, "not a memfd"),
        (lambda: os.open(os.devnull, os.O_RDONLY), 0, "not a memfd"),
    ],
)
def test_sealed_payload_checks_before_mapping(make: Any, length: int, match: str) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    fd = make()
    with pytest.raises(PayloadError, match=match):
        SealedPayload(fd, length)
    with pytest.raises(OSError, match="Bad file"):
        os.fstat(fd)  # taken and closed
    after = sorted(os.listdir("/proc/self/fd"))
    # (os.pipe()'s write end is the only thing the test itself leaves open)
    extra = set(after) - set(before)
    for name in extra:
        os.close(int(name))
    assert len(extra) <= 1


def test_regular_file_is_not_a_sealable_memfd(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with pytest.raises(PayloadError, match="not a sealable memfd"):
        SealedPayload(os.open(path, os.O_RDONLY), 3)


def test_memfd_buffer_fill_then_seal() -> None:
    buf = MemfdBuffer(1 << 16)
    with buf.view as v:
        v[:5] = b"hello"
    fd = buf.seal(5)
    assert buf.closed
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        assert os.fstat(fd).st_size == 5
        with mmap.mmap(fd, 5, prot=mmap.PROT_READ) as m:
            assert m[:] == b"hello"
    finally:
        os.close(fd)


def test_memfd_buffer_refuses_to_seal_while_viewed() -> None:
    buf = MemfdBuffer(4096)
    view = buf.view
    with pytest.raises(BufferError, match="memoryview"):
        buf.seal(1)
    view.release()
    os.close(buf.seal(1))
    with pytest.raises(ValueError, match="sealed"):
        buf.seal(1)


def test_memfd_pool_hands_out_prepared_buffers() -> None:
    with MemfdPool(8192, spares=2) as pool:
        pool.fill()
        assert len(pool) == 2
        small = pool.acquire(100)
        assert len(pool) == 1
        assert small.capacity == 8192
        big = pool.acquire(100_000)  # too big for the pool: allocated fresh
        assert big.capacity == 100_000
        assert len(pool) == 1
        os.close(small.seal(100))
        big.close()
