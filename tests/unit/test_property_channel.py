"""Socket-free property test of :class:`ChannelProtocol` (DESIGN.md phase 1, step 7).

Two protocols, a sender and a receiver, talk through a *simulated kernel*: a
fake socket with ``sendmsg``/``send``/``recvmsg_into`` that keeps Linux's
rules (the rules the channel relies on) and cuts everything at random:

* **cut writes**: each ``sendmsg`` takes a random number of bytes (or none:
  ``EAGAIN``); the descriptors of a write ride on the first byte that went;
* **chunked reads**: each ``recvmsg_into`` returns a random number of bytes;
  a read gets the descriptors of every ``sendmsg`` whose first byte it
  covers, and ends at the latest with the ``sendmsg`` that carried them
  (Linux's ``unix_stream_read_generic``);
* **truncated control data**: some reads find less control room than the
  descriptors need: the kernel closes the rest and sets ``MSG_CTRUNC``;
* **packets** (seqpacket): one ``sendmsg`` is one packet or ``EMSGSIZE``
  past a random size limit, which makes an inline default a memfd resend.

The shells' own I/O functions (:mod:`afunix._io`: ``write_some``,
``try_frame``, ``receive`` with its lean path) drive the fake socket, so what
runs is what a ``Channel`` runs, minus the kernel. Checked per example:
messages arrive whole and in order; each descriptor is the caller's file
(by inode), sent as a file object the caller dropped at once (the protocol
keeps it alive until its bytes went); a truncation is a ``ControlTruncated``
that leaves nothing open; and the descriptor table is the same afterwards.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afunix._io
from afunix import ControlTruncated
from afunix._cmsg import close_fds, rights
from afunix._io import py_recv_frame, receive, try_frame, write_some
from afunix._protocol import CLOSED, NEED_DATA
from afunix._protocol.machine import ChannelProtocol
from afunix._protocol.message import Message
from afunix._protocol.write import Write

from ..conftest import fd_baseline

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
    ],
)
STREAM, SEQPACKET = int(socket.SOCK_STREAM), int(socket.SOCK_SEQPACKET)
FILES = 4  # distinct files (inodes) the messages' descriptors are opened on


class Owner:
    """A caller's descriptor that closes when collected, as a dropped file does."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass
class Segment:
    """What one ``sendmsg`` put in the stream: its bytes, and the receiver's copies of
    the descriptors it carried (made at send time, as ``SCM_RIGHTS`` does)."""

    data: bytes
    fds: list[int]
    read: int = 0


@dataclass
class Kernel:
    """One direction of a simulated socket (see the module docstring)."""

    kind: int
    rng: random.Random
    packet_max: int = 1 << 30
    segments: list[Segment] = field(default_factory=list)
    closed: bool = False
    truncations: int = 0
    allow_truncation: bool = False

    # -- the sender's side ---------------------------------------------------------

    def sendmsg(self, buffers: list[Any], ancdata: list[Any], flags: int, *to: Any) -> int:
        assert flags & socket.MSG_NOSIGNAL
        data = b"".join(bytes(b) for b in buffers)
        fds = [n for level, kind, raw in ancdata for n in _ints(raw)]
        assert not fds or ancdata == [rights(fds)]
        if self.kind == SEQPACKET:
            if len(data) > self.packet_max:
                raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
            self._put(data, fds)
            return len(data)
        if self.rng.random() < 0.15:
            raise BlockingIOError(errno.EAGAIN, "no room")
        n = self.rng.randint(1, len(data)) if data else 0
        self._put(data[:n], fds)
        return n

    def send(self, frame: bytes, flags: int) -> int:
        return self.sendmsg([frame], [], flags)

    def _put(self, data: bytes, fds: list[int]) -> None:
        copies = [os.dup(fd) for fd in fds]  # EBADF here: the caller's file was gone
        self.segments.append(Segment(data, copies))

    # -- the receiver's side -------------------------------------------------------

    def recvmsg_into(
        self, views: list[memoryview], ancbufsize: int, flags: int
    ) -> tuple[int, list[Any], int, Any]:
        (view,) = views
        segments = self.segments
        if not segments:
            if self.closed:
                return 0, [], 0, None
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
        if self.kind == SEQPACKET:
            seg = segments.pop(0)
            n = min(len(view), len(seg.data))
            view[:n] = seg.data[:n]
            msg_flags = socket.MSG_TRUNC if n < len(seg.data) else 0
            return n, *self._control(seg.fds, ancbufsize, msg_flags), None
        want = self.rng.randint(1, len(view))
        got = 0
        fds: list[int] = []
        while segments and got < want:
            seg = segments[0]
            if seg.read == 0:
                fds += seg.fds
                seg.fds = []
            take = min(want - got, len(seg.data) - seg.read)
            view[got : got + take] = seg.data[seg.read : seg.read + take]
            got += take
            seg.read += take
            if seg.read == len(seg.data):
                segments.pop(0)
                if fds:
                    break  # a read ends with the sendmsg that carried descriptors
            elif fds:
                break
        return got, *self._control(fds, ancbufsize, 0), None

    def _control(self, fds: list[int], ancbufsize: int, msg_flags: int) -> tuple[list[Any], int]:
        if not fds:
            return [], msg_flags
        room = len(fds)
        if self.allow_truncation and self.rng.random() < 0.3:
            room = self.rng.randint(0, len(fds) - 1)  # the receiver's buffer was too small
        if 4 * len(fds) > ancbufsize:  # (never: the protocol asks for room for 253)
            room = min(room, ancbufsize // 4)
        if room < len(fds):
            self.truncations += 1
            close_fds(fds[room:])
            fds = fds[:room]
            msg_flags |= socket.MSG_CTRUNC
        return ([rights(fds)] if fds else []), msg_flags

    def drop(self) -> None:
        """Close the receiver's copies still in the stream."""
        for seg in self.segments:
            close_fds(seg.fds)
        self.segments.clear()


def _ints(raw: bytes) -> list[int]:
    return list(struct.unpack(f"{len(raw) // 4}i", raw))


# -------------------------------------------------------------- the two ends


def send_all(proto: ChannelProtocol, kernel: Kernel, out: bytes | Write | None) -> None:
    """What the shells do with one ``send``'s result: write it, then what is queued."""
    sock: Any = kernel
    if isinstance(out, bytes):
        try:
            out = try_frame(sock, out, proto)
        except BlockingIOError:
            out = proto.rest_of(out, 0)
    while out is not None:
        while True:
            try:
                if write_some(sock, out):
                    break
            except BlockingIOError:
                continue  # the shell waits for room, then writes again
            except OSError as exc:
                again = proto.write_failed(out, exc)
                if again is None:
                    raise
                out = again
        if out.owned:
            proto.write_done(out)
        out = proto.next_write() if proto.queued else None


def receive_ready(proto: ChannelProtocol, kernel: Kernel, into: list[Message | None]) -> bool:
    """Receive what the kernel has; ``True`` at the end of the stream.

    A packet whose control data was cut is dropped (``None`` in *into*) and the
    channel goes on; on a stream the ``ControlTruncated`` ends it (raised).
    """
    sock: Any = kernel
    while True:
        if not proto.idle:
            event = proto.next_event()
            if event is CLOSED:
                return True
            if isinstance(event, Message):
                into.append(event)
                continue
        try:
            # The simulated kernel has no descriptor: the pure-Python twin of the core's
            # recv_frame reads it (tests/unit/test_ccore.py holds the two to one contract).
            with patch.object(afunix._io, "recv_frame", py_recv_frame):
                event = receive(sock, proto)
        except BlockingIOError:
            return False
        except ControlTruncated:
            if proto.stream:
                raise
            into.append(None)
            continue
        if event is CLOSED:
            return True
        if isinstance(event, Message):
            into.append(event)
        else:
            assert event is NEED_DATA


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("inodes")
    paths = [base / f"file{i}" for i in range(FILES)]
    for i, path in enumerate(paths):
        path.write_bytes(b"file %d" % i)
    return paths


def inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


message_st = st.tuples(
    st.one_of(st.binary(max_size=64), st.integers(min_value=65, max_value=40_000)),
    st.lists(st.integers(min_value=0, max_value=FILES - 1), max_size=3),  # which files
    st.booleans(),  # more=True
    st.sampled_from([None, None, None, True]),  # memfd
)


@SETTINGS
@given(
    messages=st.lists(message_st, min_size=1, max_size=12),
    kind=st.sampled_from([STREAM, STREAM, SEQPACKET]),
    truncate=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
    packet_max=st.integers(min_value=100, max_value=50_000),
)
def test_random_messages_through_a_simulated_kernel(
    files: list[Path],
    messages: list[tuple[bytes | int, list[int], bool, bool | None]],
    kind: int,
    truncate: bool,
    seed: int,
    packet_max: int,
) -> None:
    # One seeded generator for the kernel's cuts (hypothesis's own lazy Random can
    # stop an example between two steps of the simulated kernel, by design).
    rng = random.Random(seed)
    want_inodes = [inode_of(p) for p in files]
    with fd_baseline():
        kernel = Kernel(kind, rng, packet_max=packet_max, allow_truncation=truncate)
        sender = ChannelProtocol(kind, memfd_threshold=20_000)
        receiver = ChannelProtocol(kind, recv_bufsize=rng.choice([8, 64, 4096, 256 * 1024]))
        got: list[Message | None] = []
        sent: list[tuple[bytes, list[int]]] = []
        broke: ControlTruncated | None = None
        try:
            for data, which, hold, memfd in messages:
                payload = data if isinstance(data, bytes) else rng.randbytes(data)
                more = hold and kind == STREAM
                # file objects the caller drops at once: only the protocol keeps them
                owners = [Owner(files[i]) for i in which]
                out = sender.send(payload, owners, memfd=memfd, more=more)
                del owners  # only the protocol keeps the files now (and their Write)
                send_all(sender, kernel, out)
                del out
                sent.append((payload, which))
                if broke is None and rng.random() < 0.5:
                    try:
                        receive_ready(receiver, kernel, got)
                    except ControlTruncated as exc:
                        broke = exc
            send_all(sender, kernel, sender.flush())
            kernel.closed = True
            if broke is None:
                try:
                    ended = receive_ready(receiver, kernel, got)
                except ControlTruncated as exc:
                    broke = exc
                else:
                    assert ended
            if broke is not None:  # a stream: the messages before it came whole
                assert kernel.truncations, "a truncation error without a truncation"
                assert broke.errno is not None
            else:
                assert len(got) == len(sent)
                assert got.count(None) == (kernel.truncations if kind == SEQPACKET else 0)
            for msg, (payload, which) in zip(got, sent, strict=False):
                if msg is not None:
                    assert bytes(msg.data) == payload
                    assert [inode(fd) for fd in msg.fds] == [want_inodes[i] for i in which]
        finally:
            for msg in got:
                if msg is not None:
                    msg.close()
            kernel.drop()
            sender.close()
            receiver.close()


def inode_of(path: Path) -> tuple[int, int]:
    st_ = path.stat()
    return st_.st_dev, st_.st_ino
