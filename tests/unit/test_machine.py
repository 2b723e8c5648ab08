"""``ChannelProtocol`` alone: tables of bytes and descriptor numbers, no socket.

What a shell would send for each call (``bytes`` for one ``send``, a ``Write``
for one ``sendmsg``, ``None`` when held), how held batches flush, the memfd
choice and the ``EMSGSIZE`` resend, a stream write cut short, the references
a ``Write`` keeps, and the receive side fed by hand: messages out, control
data checked (and every descriptor closed when it is wrong). Descriptors
come from ``os.pipe``; the autouse fixture of conftest checks none leaks.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import weakref
from collections.abc import Iterator

import pytest

from afunix import ProtocolError, UnsupportedFeature
from afunix._cmsg import MSG_CTRUNC, SCM_MAX_FD, SCM_RIGHTS, SOL_SOCKET, ControlTruncated
from afunix._memfd import MemfdBuffer, seal_bytes
from afunix._protocol import CLOSED, FLAG_MEMFD, HEADER, MAGIC, NEED_DATA
from afunix._protocol.machine import HOLD_MAX, ChannelProtocol
from afunix._protocol.message import Message
from afunix._protocol.write import State, Write

from ..conftest import is_open

STREAM, DGRAM, SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET


def frame(data: bytes, nfds: int = 0, flags: int = 0, length: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, flags, nfds, len(data) if length is None else length) + data


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        if is_open(fd):
            os.close(fd)


def payload(out: Write) -> bytes:
    return b"".join(bytes(b) for b in out.buffers)


class Holder:
    """A descriptor owner that is not a file (no ResourceWarning when collected)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


# ---------------------------------------------------------------- sending


@pytest.mark.parametrize(
    ("kind", "data", "want"),
    [
        (STREAM, b"", frame(b"")),
        (STREAM, b"hi", frame(b"hi")),
        (STREAM, bytearray(b"ba"), frame(b"ba")),
        (STREAM, b"x" * 8192, frame(b"x" * 8192)),
    ],
)
def test_a_small_plain_stream_message_is_one_whole_frame(
    kind: int, data: bytes, want: bytes
) -> None:
    proto = ChannelProtocol(kind)
    assert proto.send(data) == want
    assert not proto.holding and not proto.queued


@pytest.mark.parametrize(
    ("kind", "data"),
    [(STREAM, b"x" * 8193), (STREAM, memoryview(b"view")), (SEQPACKET, b"hi"), (DGRAM, b"hi")],
)
def test_other_messages_are_a_write_of_header_and_payload_uncopied(kind: int, data: bytes) -> None:
    proto = ChannelProtocol(kind)
    out = proto.send(data)
    assert isinstance(out, Write)
    assert bytes(out.buffers[0]) == frame(b"", length=len(data))
    assert out.buffers[1].obj is (data.obj if isinstance(data, memoryview) else data)
    assert payload(out) == frame(bytes(data)) and out.total == len(frame(bytes(data)))
    assert out.ancdata == [] and out.to == ()
    assert out.inline_default == (kind != STREAM)  # packets: an EMSGSIZE may resend as memfd


def test_descriptors_ride_on_the_frame_and_are_read_once(pipe: tuple[int, int]) -> None:
    r, w = pipe
    proto = ChannelProtocol(STREAM)
    objects = [Holder(r), Holder(w)]
    reads = []

    def gen() -> Iterator[Holder]:
        for each in objects:
            reads.append(each)
            yield each

    out = proto.send(b"two", gen())
    assert isinstance(out, Write)
    assert reads == objects  # the generator was read once, whole
    assert payload(out) == frame(b"two", 2)
    assert out.fds == [r, w]
    assert out.ancdata == [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))]
    assert list(out.refs) == objects  # the caller's objects, kept until write_done
    assert out.owned == ()  # nothing of ours to close: the caller's descriptors
    assert out.advance(3) is False and out.ancdata == []  # they went with the first byte
    assert payload(out) == frame(b"two", 2)[3:]
    assert out.advance(out.total - 3) is True


def test_write_done_drops_the_references(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    proto = ChannelProtocol(STREAM)
    holder = Holder(r)
    ref = weakref.ref(holder)
    out = proto.send(b"f", [holder])
    assert isinstance(out, Write)
    del holder
    gc.collect()
    assert ref() is not None  # the Write keeps the caller's object alive until sent
    proto.write_done(out)
    gc.collect()
    assert ref() is None


def test_a_refused_descriptor_fails_before_anything_is_queued() -> None:
    proto = ChannelProtocol(STREAM)
    with pytest.raises(TypeError):
        proto.send(b"x", [True])  # a bool is no descriptor
    with pytest.raises(OSError) as info:
        proto.send(b"x", list(range(SCM_MAX_FD + 1)))
    assert info.value.errno == errno.ETOOMANYREFS or "253" in str(info.value)
    assert not proto.holding and not proto.queued


# ------------------------------------------------------------ held batches


def test_more_holds_frames_and_the_next_plain_send_writes_them_all(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    proto = ChannelProtocol(STREAM)
    assert proto.send(b"a", more=True) is None
    assert proto.send(b"b", [r], more=True) is None
    assert proto.holding and len(proto.held_fds) == 1 and proto.held_fds[0] != r  # a duplicate
    dup = proto.held_fds[0]
    out = proto.send(b"c")
    assert isinstance(out, Write) and not proto.holding
    assert payload(out) == frame(b"a") + frame(b"b", 1) + frame(b"c")
    assert out.fds == [dup] and out.owned == [dup]
    proto.write_done(out)
    assert not is_open(dup)  # ours, closed once sent
    assert is_open(r)  # the caller's


def test_held_frames_flush_at_64_kib() -> None:
    proto = ChannelProtocol(STREAM)
    chunk = b"z" * 8000
    outs = [proto.send(chunk, more=True) for _ in range(12)]
    first = next(i for i, out in enumerate(outs) if out is not None)
    assert (first + 1) * len(frame(chunk)) >= HOLD_MAX > first * len(frame(chunk))
    out = outs[first]
    assert isinstance(out, Write) and payload(out) == frame(chunk) * (first + 1)
    assert all(o is None for o in outs[first + 1 :]) and proto.holding
    rest = proto.flush()
    assert isinstance(rest, Write) and payload(rest) == frame(chunk) * (11 - first)
    assert proto.flush() is None


def test_one_sendmsg_carries_at_most_253_descriptors(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    proto = ChannelProtocol(STREAM)
    assert proto.send(b"a", [r] * 200, more=True) is None
    out = proto.send(b"b", [r] * 100, more=True)  # 300 > 253: the first batch goes alone
    assert isinstance(out, Write) and len(out.fds) == 200 and payload(out) == frame(b"a", 200)
    assert not proto.queued and len(proto.held_fds) == 100
    proto.write_done(out)
    rest = proto.flush()
    assert isinstance(rest, Write) and len(rest.fds) == 100
    proto.write_done(rest)


def test_a_large_message_behind_held_ones_is_queued_in_order() -> None:
    proto = ChannelProtocol(STREAM)
    assert proto.send(b"small", more=True) is None
    out = proto.send(b"L" * 10000)
    assert isinstance(out, Write) and payload(out) == frame(b"small")
    assert proto.queued
    nxt = proto.next_write()
    assert isinstance(nxt, Write) and payload(nxt) == frame(b"L" * 10000)
    assert not proto.queued and proto.next_write() is None


# ------------------------------------------------------------ memfd choice


@pytest.mark.parametrize(
    ("size", "memfd", "as_memfd"),
    [(999, None, False), (1000, None, True), (10, True, True), (5000, False, False)],
)
def test_the_memfd_choice(size: int, memfd: bool | None, as_memfd: bool) -> None:
    proto = ChannelProtocol(STREAM, memfd_threshold=1000)
    out = proto.send(b"m" * size, memfd=memfd)
    if not as_memfd:
        assert out == frame(b"m" * size) or payload(out) == frame(b"m" * size)  # type: ignore[arg-type]
        return
    assert isinstance(out, Write)
    assert payload(out) == frame(b"", 1, FLAG_MEMFD, length=size)
    (mfd,) = out.owned
    assert out.fds == [mfd] and os.pread(mfd, size + 1, 0) == b"m" * size
    proto.write_done(out)
    assert not is_open(mfd)


def test_emsgsize_resends_as_memfd_with_the_same_descriptors(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    proto = ChannelProtocol(DGRAM)
    holder = Holder(r)
    out = proto.send(b"p" * 5000, iter([holder]), address="/where")
    assert isinstance(out, Write) and out.inline_default and out.to == ("/where",)
    again = proto.write_failed(out, OSError(errno.EMSGSIZE, "Message too long"))
    assert isinstance(again, Write)
    assert payload(again) == frame(b"", 2, FLAG_MEMFD, length=5000)
    assert again.fds[0] == r  # the same descriptor, read once from the iterator
    assert list(again.refs) == [holder] and again.to == ("/where",)
    (mfd,) = again.owned
    assert again.fds == [r, mfd] and os.pread(mfd, 6000, 0) == b"p" * 5000
    assert proto.write_failed(again, OSError(errno.EMSGSIZE, "again")) is None  # no loop
    assert not is_open(mfd) and is_open(r)


def test_emsgsize_of_a_forced_inline_packet_is_the_callers() -> None:
    proto = ChannelProtocol(DGRAM)
    out = proto.send(b"p" * 5000, memfd=False)
    assert isinstance(out, Write) and not out.inline_default
    assert proto.write_failed(out, OSError(errno.EMSGSIZE, "too long")) is None
    assert proto.state is State.OPEN


# ------------------------------------------------------------ cut short


def test_a_stream_write_cut_short_breaks_the_channel() -> None:
    proto = ChannelProtocol(STREAM)
    out = proto.send(b"x" * 9000)
    assert isinstance(out, Write)
    assert out.advance(100) is False
    assert proto.write_failed(out, OSError(errno.EPIPE, "Broken pipe")) is None
    assert proto.state is State.BROKEN
    with pytest.raises(OSError) as info:
        proto.send(b"more")
    assert info.value.errno == errno.EPIPE


def test_a_whole_frame_cut_short_continues_then_breaks_on_failure() -> None:
    proto = ChannelProtocol(STREAM)
    whole = proto.send(b"abc")
    assert isinstance(whole, bytes)
    rest = proto.rest_of(whole, 5)
    assert payload(rest) == whole[5:] and rest.sent == 5 and rest.total == len(whole)
    assert proto.write_failed(rest, TimeoutError()) is None
    assert proto.state is State.BROKEN


def test_a_failure_before_any_byte_leaves_the_stream_open() -> None:
    proto = ChannelProtocol(STREAM)
    out = proto.send(b"x" * 9000)
    assert isinstance(out, Write)
    assert proto.write_failed(out, BlockingIOError()) is None
    assert proto.state is State.OPEN


# ---------------------------------------------------------------- receiving


def feed(
    proto: ChannelProtocol,
    data: bytes,
    anc: list[tuple[int, int, bytes]] | None = None,
    flags: int = 0,
) -> None:
    into = proto.recv_into()
    assert len(data) <= len(into)
    into[: len(data)] = data
    proto.received(len(data), anc or [], flags, None)


def test_received_frames_come_out_as_messages_then_end_of_file(pipe: tuple[int, int]) -> None:
    r, w = pipe
    proto = ChannelProtocol(STREAM)
    assert proto.next_event() is NEED_DATA
    anc = [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))]
    feed(proto, frame(b"one") + frame(b"two", 2) + frame(b"thr"), anc)
    got = []
    while isinstance(event := proto.next_event(), Message):
        got.append((bytes(event.data), event.take_fds()))
    assert got == [(b"one", []), (b"two", [r, w]), (b"thr", [])]
    assert event is NEED_DATA and proto.idle
    feed(proto, b"")
    assert proto.next_event() is CLOSED


@pytest.mark.parametrize("credentials", [False, True])
def test_end_of_file_before_any_byte_is_closed_and_stays_closed(credentials: bool) -> None:
    # The short connection's path (connect, read end of file, close): no decoder is
    # made for it, and it must answer as one would: CLOSED every time, no reading
    # after it, and close() holds nothing.
    proto = ChannelProtocol(STREAM, credentials=credentials)
    assert proto.next_event() is NEED_DATA and not proto.receiving
    feed(proto, b"")
    assert proto.next_event() is CLOSED
    assert proto.next_event() is CLOSED and not proto.idle and not proto.receiving
    with pytest.raises(RuntimeError, match="after end of file"):
        feed(proto, frame(b"late"))
    assert proto.next_event() is CLOSED
    assert proto.close() == 0
    assert proto.state is State.CLOSED


def test_descriptors_with_end_of_file_and_no_byte_are_a_protocol_error(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    proto = ChannelProtocol(STREAM)
    anc = [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))]
    with pytest.raises(ProtocolError, match="no data at all") as info:
        feed(proto, b"", anc)
    assert info.value.fds_closed == 2  # type: ignore[attr-defined]
    assert not is_open(r) and not is_open(w)
    assert proto.state is State.BROKEN


def test_a_message_split_across_reads_is_receiving_until_whole() -> None:
    proto = ChannelProtocol(STREAM)
    whole = frame(b"abcdef")
    feed(proto, whole[:5])
    assert proto.next_event() is NEED_DATA and proto.receiving and not proto.idle
    feed(proto, whole[5:])
    msg = proto.next_event()
    assert isinstance(msg, Message) and msg.data == b"abcdef"
    assert proto.next_event() is NEED_DATA and not proto.receiving


def test_truncated_control_data_closes_every_descriptor(pipe: tuple[int, int]) -> None:
    r, w = pipe
    proto = ChannelProtocol(STREAM)
    anc = [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))]
    with pytest.raises(ControlTruncated) as info:
        feed(proto, frame(b"x", 3), anc, MSG_CTRUNC)
    assert info.value.fds_closed == 2
    assert not is_open(r) and not is_open(w)
    assert proto.state is State.BROKEN


def test_a_packet_with_bad_control_data_is_dropped_not_the_channel(pipe: tuple[int, int]) -> None:
    r, w = pipe
    proto = ChannelProtocol(SEQPACKET)
    with pytest.raises(ControlTruncated):
        feed(proto, frame(b"x", 2), [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))], MSG_CTRUNC)
    assert not is_open(r) and not is_open(w)
    assert proto.state is State.OPEN
    feed(proto, frame(b"next"))
    msg = proto.next_event()
    assert isinstance(msg, Message) and msg.data == b"next"
    feed(proto, b"")  # seqpacket: an empty read is the end
    assert proto.next_event() is CLOSED


def test_descriptors_in_flight_are_counted_and_limited(pipe: tuple[int, int]) -> None:
    r, w = pipe
    proto = ChannelProtocol(STREAM, max_fds_in_flight=2)
    feed(proto, frame(b"a", 2), [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", *os.pipe()))])
    first = proto.next_event()
    assert isinstance(first, Message) and proto.in_flight == 2
    anc = [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", r, w))]
    feed(proto, frame(b"b", 2), anc)
    with pytest.raises(ProtocolError) as info:
        proto.next_event()
    assert info.value.errno == errno.ETOOMANYREFS
    assert not is_open(r) and not is_open(w)
    first.close()
    assert proto.in_flight == 0


def test_a_memfd_payload_is_refused_when_not_accepted() -> None:
    proto = ChannelProtocol(STREAM, accept_memfd=False)
    mfd = seal_bytes(b"secret")
    feed(
        proto,
        frame(b"", 1, FLAG_MEMFD, length=6),
        [(SOL_SOCKET, SCM_RIGHTS, struct.pack("i", mfd))],
    )
    with pytest.raises(ProtocolError) as info:
        proto.next_event()
    assert info.value.errno == errno.EINVAL
    assert not is_open(mfd)
    assert proto.state is State.OPEN  # the framing is intact: the next message is fine
    feed(proto, frame(b"ok"))
    msg = proto.next_event()
    assert isinstance(msg, Message) and msg.data == b"ok" and not msg.memfd


def test_a_memfd_payload_is_mapped_and_marked() -> None:
    proto = ChannelProtocol(STREAM)
    mfd = seal_bytes(b"mapped")
    feed(
        proto,
        frame(b"", 1, FLAG_MEMFD, length=6),
        [(SOL_SOCKET, SCM_RIGHTS, struct.pack("i", mfd))],
    )
    with proto.next_event() as msg:  # type: ignore[union-attr]
        assert msg.memfd and bytes(msg.data) == b"mapped" and msg.fds == ()


def test_push_back_makes_a_message_next_again() -> None:
    proto = ChannelProtocol(STREAM)
    feed(proto, frame(b"one") + frame(b"two"))
    one = proto.next_event()
    assert isinstance(one, Message)
    proto.push_back(one)
    assert proto.next_event() is one
    two = proto.next_event()
    assert isinstance(two, Message) and two.data == b"two"


def test_close_closes_what_the_protocol_holds(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    proto = ChannelProtocol(STREAM)
    proto.send(b"held", [r], more=True)
    dup = proto.held_fds[0]
    a, b = os.pipe()
    feed(
        proto, frame(b"x", 1) + frame(b"y", 1), [(SOL_SOCKET, SCM_RIGHTS, struct.pack("2i", a, b))]
    )
    assert proto.close() == 1  # the held duplicate (the decoder closes its own)
    assert not is_open(dup) and not is_open(a) and not is_open(b) and is_open(r)
    assert proto.state is State.CLOSED
    with pytest.raises(OSError) as info:
        proto.send(b"x")
    assert info.value.errno == errno.EBADF


# ------------------------------------------- a transport without descriptors

TCP = "TCP (tcp://127.0.0.1:7000)"


def no_fds(**options: object) -> ChannelProtocol:
    """A stream over a transport that carries no descriptors (TCP, ssh://)."""
    return ChannelProtocol(STREAM, carries_fds=False, transport=TCP, **options)  # type: ignore[arg-type]


def test_without_descriptors_no_control_space_and_no_memfd_threshold() -> None:
    proto = no_fds()
    assert proto.control_space == 0  # recvmsg asks for no control data at all
    assert proto.memfd_threshold is None and proto.maxfds == 0
    local = ChannelProtocol(STREAM)
    assert local.carries_fds and local.control_space > 0 and local.memfd_threshold is not None


def test_credentials_are_refused_at_construction() -> None:
    with pytest.raises(UnsupportedFeature, match=r"credentials=True\) over TCP \(tcp://") as info:
        no_fds(credentials=True)
    assert info.value.errno == errno.EOPNOTSUPP


def _buffer(proto: ChannelProtocol, r: int) -> object:
    buf = MemfdBuffer(16)
    buf.view[:3] = b"buf"
    try:
        return proto.send_buffer(buf, 3, [r] if r >= 0 else ())
    finally:
        assert not buf.closed  # refused before sealing: still the caller's
        buf.close()


# (what the call sends, what the refusal names)
REFUSED = [
    (lambda p, r: p.send(b"x", [r]), "1 descriptor"),
    (lambda p, r: p.send(b"x", iter([r, r])), "2 descriptor"),
    (lambda p, r: p.send(b"x", (Holder(r),), more=True), "1 descriptor"),
    (lambda p, r: p.send(b"L" * 100_000, [r]), "1 descriptor"),
    (lambda p, r: p.send(b"x", memfd=True), r"memfd=True"),
    (lambda p, r: p.send(b"x", [r], memfd=True), "1 descriptor"),
    (lambda p, r: _buffer(p, -1), r"send_buffer"),
    (lambda p, r: _buffer(p, r), r"send_buffer"),
]


@pytest.mark.parametrize(("call", "named"), REFUSED)
def test_descriptors_and_memfds_are_refused_before_anything_is_queued(
    pipe: tuple[int, int], call: object, named: str
) -> None:
    r, _ = pipe
    proto = no_fds()
    assert proto.send(b"held", more=True) is None  # a batch begun before the refusal
    with pytest.raises(UnsupportedFeature, match=named) as info:
        call(proto, r)  # type: ignore[operator]
    assert info.value.errno == errno.EOPNOTSUPP
    assert "over TCP (tcp://127.0.0.1:7000)" in str(info.value)
    assert "nothing was sent and the channel is still usable" in str(info.value)
    assert proto.state is State.OPEN and not proto.queued
    assert proto.held == frame(b"held") and proto.held_fds == []  # the batch, untouched
    assert is_open(r)
    out = proto.send(b"next")  # the channel goes on: the batch, then the next message
    assert isinstance(out, Write) and payload(out) == frame(b"held") + frame(b"next")
    assert not proto.holding and not proto.queued


@pytest.mark.parametrize(
    ("size", "memfd"), [(999, None), (1000, None), (300_000, None), (5000, False)]
)
def test_payloads_of_any_size_go_inline(size: int, memfd: bool | None) -> None:
    proto = ChannelProtocol(STREAM, memfd_threshold=1000, carries_fds=False, transport=TCP)
    data = b"m" * size
    out = proto.send(data, memfd=memfd)
    got = out if isinstance(out, bytes) else payload(out)  # type: ignore[arg-type]
    assert got == frame(data)  # no FLAG_MEMFD, no descriptor: the bytes themselves
    if isinstance(out, Write):
        assert not out.fds and not out.ancdata and not out.owned
    receiver = ChannelProtocol(STREAM, memfd_threshold=1000, carries_fds=False, transport=TCP)
    chunk = len(receiver.recv_into())
    for start in range(0, len(got), chunk):  # as a socket would hand it over
        piece = got[start : start + chunk]
        into = receiver.recv_into()
        into[: len(piece)] = piece
        receiver.received(len(piece), [], 0, None)
        if start + chunk < len(got):
            assert receiver.next_event() is NEED_DATA
    msg = receiver.next_event()
    assert isinstance(msg, Message) and msg.data == data and not msg.fds
    msg.close()


def test_a_header_announcing_descriptors_breaks_a_stream_without_them() -> None:
    proto = no_fds()
    feed(proto, frame(b"x", 1))  # the peer claims a descriptor nothing can carry
    with pytest.raises(ProtocolError):
        proto.next_event()
    assert proto.state is State.BROKEN
