"""The sans-IO framing (``afunix._protocol``): frames <-> bytes tables, both directions.

Stream decoding is fed what ``recvmsg`` calls would return: chunks of bytes,
each with the descriptors the kernel delivered with it. Descriptors are real
(dups of /dev/null) so that "closed on error" can be checked.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from afunix import ProtocolError
from afunix._protocol import (
    BATCH_SPAN,
    CLOSED,
    FLAG_MEMFD,
    HEADER,
    NEED_DATA,
    SCM_MAX_FD,
    FrameError,
    RawMessage,
    StreamDecoder,
    decode_header,
    decode_packet,
    encode_header,
)

from ..conftest import is_open

# ------------------------------------------------------------- header table
HEADER_TABLE = [
    # (length, nfds, flags) <-> the 8 header bytes
    ((0, 0, 0), b"\xaf\x00\x00\x00\x00\x00\x00\x00"),
    ((5, 0, 0), b"\xaf\x00\x00\x00\x00\x00\x00\x05"),
    ((5, 2, 0), b"\xaf\x00\x00\x02\x00\x00\x00\x05"),
    ((1, 253, 0), b"\xaf\x00\x00\xfd\x00\x00\x00\x01"),
    ((0x01020304, 1, 0), b"\xaf\x00\x00\x01\x01\x02\x03\x04"),
    ((1 << 20, 1, FLAG_MEMFD), b"\xaf\x01\x00\x01\x00\x10\x00\x00"),
]


@pytest.mark.parametrize(("fields", "raw"), HEADER_TABLE)
def test_encode_header(fields: tuple[int, int, int], raw: bytes) -> None:
    length, nfds, flags = fields
    assert encode_header(length, nfds, flags) == raw
    assert len(raw) == HEADER.size == 8


@pytest.mark.parametrize(("fields", "raw"), HEADER_TABLE)
def test_decode_header(fields: tuple[int, int, int], raw: bytes) -> None:
    length, nfds, flags = fields
    assert decode_header(raw, max_size=1 << 30) == (flags, nfds, length)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 254, 0), "253"),
        ((1 << 32, 0, 0), "32-bit"),
        ((-1, 0, 0), "32-bit"),
        ((1, 0, 0x80), "unknown flags"),
        ((1, 0, FLAG_MEMFD), "nfds >= 1"),
    ],
)
def test_encode_header_refuses(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_header(*args)


@pytest.mark.parametrize(
    ("raw", "match", "err"),
    [
        (b"GET / HT", "not an afunix frame", errno.EPROTO),
        (b"\xaf\x80\x00\x00\x00\x00\x00\x00", "unknown flags", errno.EPROTO),
        (b"\xaf\x00\x00\xfe\x00\x00\x00\x01", "254 descriptors", errno.EPROTO),
        (b"\xaf\x01\x00\x00\x00\x00\x00\x01", "no descriptor", errno.EPROTO),
        (b"\xaf\x00\x00\x00\x00\x00\x04\x01", "1025 bytes exceeds", errno.EMSGSIZE),
    ],
)
def test_decode_header_refuses(raw: bytes, match: str, err: int) -> None:
    with pytest.raises(FrameError, match=match) as info:
        decode_header(raw, max_size=1024)
    assert info.value.errno == err
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value, OSError)


# ----------------------------------------------------------- helpers
def frame(payload: bytes, nfds: int = 0, flags: int = 0) -> bytes:
    length = payload if not flags & FLAG_MEMFD else b""
    return encode_header(len(payload), nfds, flags) + length


def drain(dec: StreamDecoder) -> list[RawMessage | str]:
    out: list[RawMessage | str] = []
    while True:
        ev = dec.next_message()
        if ev is NEED_DATA:
            return [*out, "NEED_DATA"]
        if ev is CLOSED:
            return [*out, "CLOSED"]
        assert isinstance(ev, RawMessage)
        out.append(ev)


def feed(dec: StreamDecoder, chunks: list[tuple[bytes, list[int]]]) -> list[RawMessage | str]:
    """Feed each ``recvmsg`` chunk, then end of file; every message and the last event."""
    got: list[RawMessage | str] = []
    for data, fds in chunks:
        dec.receive_data(data, fds)
        got += [m for m in drain(dec) if m != "NEED_DATA"]
    dec.receive_data(b"")
    return got + drain(dec)


# ------------------------------------------------------ stream decoding table
def test_one_message_one_chunk(newfd: Callable[[], int]) -> None:
    a, b = newfd(), newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"hello", 2), [a, b])
    assert drain(dec) == [RawMessage(b"hello", [a, b], 0, 5), "NEED_DATA"]
    dec.receive_data(b"")
    assert drain(dec) == ["CLOSED"]


def test_bytes_to_frames_table(newfd: Callable[[], int]) -> None:
    """Chunks (as recvmsg returns them) -> messages, in one table."""
    fd1, fd2, fd3 = newfd(), newfd(), newfd()
    m1, m2, m3 = frame(b"one", 1), frame(b"", 0), frame(b"three!", 2)
    stream = m1 + m2 + m3
    cases = [
        # everything at once is impossible with two fd-carrying headers, so:
        [(m1 + m2, [fd1]), (m3, [fd2, fd3])],
        # byte by byte: fds come with each header's first byte
        [
            (stream[i : i + 1], [fd1] if i == 0 else [fd2, fd3] if i == len(m1 + m2) else [])
            for i in range(len(stream))
        ],
        # the tail of one message and the head of the next (with its fds) in one chunk
        [(m1[:5], [fd1]), (m1[5:] + m2 + m3[:3], [fd2, fd3]), (m3[3:], [])],
    ]
    for chunks in cases:
        dec = StreamDecoder()
        assert feed(dec, chunks) == [
            RawMessage(b"one", [fd1], 0, 3),
            RawMessage(b"", [], 0, 0),
            RawMessage(b"three!", [fd2, fd3], 0, 6),
            "CLOSED",
        ]
        assert dec.held_fds == 0


def test_frames_to_bytes_table() -> None:
    """The other direction: what a sender writes for each message."""
    table = [
        ((b"", 0), b"\xaf\0\0\0\0\0\0\0"),
        ((b"x", 1), b"\xaf\0\0\x01\0\0\0\x01x"),
        ((b"abc", 3), b"\xaf\0\0\x03\0\0\0\x03abc"),
    ]
    for (payload, nfds), raw in table:
        assert frame(payload, nfds) == raw
        dec = StreamDecoder()
        dec.receive_data(raw, [])
        if nfds:
            with pytest.raises(FrameError):
                dec.next_message()
        else:
            assert drain(dec)[0] == RawMessage(payload, [], 0, len(payload))


def test_memfd_frame_has_no_inline_body(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(encode_header(1 << 20, 1, FLAG_MEMFD) + frame(b"next"), [fd])
    first, second, rest = drain(dec)
    assert isinstance(first, RawMessage)
    assert first.memfd
    assert first.length == 1 << 20
    assert first.data == b""
    assert first.fds == [fd]
    assert second == RawMessage(b"next", [], 0, 4)
    assert rest == "NEED_DATA"


def test_tag_follows_the_header(newfd: Callable[[], int]) -> None:
    dec = StreamDecoder()
    m1, m2 = frame(b"aaaa"), frame(b"bb")
    dec.receive_data(m1[:3], tag="A")
    dec.receive_data(m1[3:] + m2[:1], tag="B")
    dec.receive_data(m2[1:], tag="C")
    first, second, _ = drain(dec)
    assert isinstance(first, RawMessage)
    assert isinstance(second, RawMessage)
    assert (first.tag, second.tag) == ("A", "B")


# ------------------------------------------------------------- batched frames
def test_one_batch_serves_several_headers(newfd: Callable[[], int]) -> None:
    """One sendmsg of several whole frames carries all their descriptors, in order;
    the receiver may get its bytes in any cut (the descriptors with the first)."""
    a, b, c, d = newfd(), newfd(), newfd(), newfd()
    plain, f1, f2, f3 = frame(b"p"), frame(b"one", 1), frame(b"", 2), frame(b"three", 1)
    stream = plain + f1 + f2 + f3
    cuts: list[list[tuple[bytes, list[int]]]] = [
        [(stream, [a, b, c, d])],
        [(stream[:8], [a, b, c, d]), (stream[8:30], []), (stream[30:], [])],
        *([(stream[:i], [a, b, c, d]), (stream[i:], [])] for i in range(1, len(stream))),
    ]
    for chunks in cuts:
        dec = StreamDecoder()
        assert feed(dec, chunks) == [
            RawMessage(b"p", [], 0, 1),
            RawMessage(b"one", [a], 0, 3),
            RawMessage(b"", [b, c], 0, 0),
            RawMessage(b"three", [d], 0, 5),
            "CLOSED",
        ]
        assert dec.held_fds == 0


def test_batches_back_to_back(newfd: Callable[[], int]) -> None:
    """The tail of one batch's bytes and the next batch arrive in one recvmsg."""
    a, b, c = newfd(), newfd(), newfd()
    first = frame(b"a", 1) + frame(b"bb", 1)
    second = frame(b"ccc", 1)
    dec = StreamDecoder()
    dec.receive_data(first[:4], [a, b])
    assert drain(dec) == ["NEED_DATA"]
    dec.receive_data(first[4:] + second, [c])
    assert drain(dec) == [
        RawMessage(b"a", [a], 0, 1),
        RawMessage(b"bb", [b], 0, 2),
        RawMessage(b"ccc", [c], 0, 3),
        "NEED_DATA",
    ]
    assert dec.held_fds == 0


def test_batch_with_leftover_when_the_next_has_passed(newfd: Callable[[], int]) -> None:
    """A batch must be used up by the headers of its own sendmsg: once a later batch's
    bytes are all behind the headers, the oldest batch may hold nothing more."""
    a, b, c = newfd(), newfd(), newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"a", 1), [a, b])  # two descriptors, one header
    assert drain(dec) == [RawMessage(b"a", [a], 0, 1), "NEED_DATA"]
    dec.receive_data(frame(b"c"), [c])
    dec.receive_data(frame(b"d"))
    with pytest.raises(FrameError, match=r"1 descriptor.*no message header announced"):
        drain(dec)
    assert not is_open(b)
    assert not is_open(c)


@pytest.mark.parametrize("fast", [False, True])
def test_batch_descriptors_cannot_be_parked(newfd: Callable[[], int], fast: bool) -> None:
    """Descriptors no header takes within BATCH_SPAN bytes of their batch fail the
    stream, even while plain traffic keeps flowing and no new batch comes."""

    def drain_either() -> list[RawMessage | str]:
        while fast and dec.next_fast() is not None:  # the fast path, as channels use it
            pass
        return drain(dec)

    a, b = newfd(), newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"a", 1), [a, b])  # one descriptor too many
    assert dec.next_message() == RawMessage(b"a", [a], 0, 1)
    chunk = frame(b"p" * 8000) * 8
    sent = len(frame(b"a", 1))
    while sent + len(chunk) < BATCH_SPAN:  # every header of these within the span
        dec.receive_data(chunk)
        assert drain_either()[-1] == "NEED_DATA"  # plain frames still come out
        sent += len(chunk)
    dec.receive_data(chunk)  # headers past the span
    with pytest.raises(FrameError, match=r"1 descriptor.*no message header announced"):
        drain_either()
    assert not is_open(b)


def test_batch_with_leftover_at_eof(newfd: Callable[[], int]) -> None:
    a, b = newfd(), newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"a", 1), [a, b])
    dec.receive_data(b"")
    assert dec.next_message() == RawMessage(b"a", [a], 0, 1)
    with pytest.raises(FrameError, match=r"1 descriptor.*no message header announced"):
        dec.next_message()
    assert is_open(a)  # the message's
    assert not is_open(b)


def test_descriptors_never_come_after_their_header(newfd: Callable[[], int]) -> None:
    a = newfd()
    dec = StreamDecoder()
    raw = frame(b"abc", 1)
    dec.receive_data(raw[:2], [])
    dec.receive_data(raw[2:], [a])  # the header began before these bytes
    with pytest.raises(FrameError, match="none arrived with it"):
        drain(dec)
    assert not is_open(a)


def test_too_many_descriptors_waiting(newfd: Callable[[], int]) -> None:
    """Descriptors cannot pile up ahead of their headers: at most two batches' worth."""
    dec = StreamDecoder()
    fds = [newfd() for _ in range(2 * SCM_MAX_FD + 1)]
    big = frame(b"x" * 100, 2)
    dec.receive_data(big[:9], fds[:SCM_MAX_FD])
    dec.receive_data(big[9:20], fds[SCM_MAX_FD:-1])
    with pytest.raises(FrameError, match="507 descriptors arrived ahead"):
        dec.receive_data(big[20:30], fds[-1:])
    assert not any(is_open(fd) for fd in fds)


# --------------------------------------------------------------- stream errors
def test_announced_fds_missing(newfd: Callable[[], int]) -> None:
    other = newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"a", 0) + frame(b"b", 2), [])
    dec.receive_data(frame(b"c", 1), [other])
    with pytest.raises(FrameError, match=r"announces 2 descriptor.*none arrived") as info:
        drain(dec)
    assert not is_open(other)
    assert info.value.fds_closed == 1


def test_fd_count_mismatch(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"x", 2), [fd])
    with pytest.raises(FrameError, match=r"announces 2 descriptor.*1 arrived"):
        dec.next_message()
    assert not is_open(fd)


def test_fds_attached_to_the_middle_of_a_message(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    raw = frame(b"0123456789")
    dec.receive_data(raw[:10], [])
    dec.receive_data(raw[10:], [fd])  # no header starts in these bytes
    dec.receive_data(frame(b"next"), [])
    with pytest.raises(FrameError, match="no message starts"):
        drain(dec)
    assert not is_open(fd)


def test_fds_with_trailing_bytes_at_eof(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    raw = frame(b"0123456789")
    dec.receive_data(raw[:10], [])
    dec.receive_data(raw[10:], [fd])
    dec.receive_data(b"")
    with pytest.raises(FrameError, match="no message header announced"):
        drain(dec)
    assert not is_open(fd)


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 9, 12])
def test_peer_closes_mid_message(newfd: Callable[[], int], cut: int) -> None:
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"hello", 1)[:cut], [fd])
    dec.receive_data(b"")
    with pytest.raises(FrameError, match="mid-message"):
        drain(dec)
    assert not is_open(fd)


def test_oversized_frame(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder(max_size=4)
    dec.receive_data(frame(b"hello", 1), [fd])
    with pytest.raises(FrameError, match="exceeds the maximum") as info:
        dec.next_message()
    assert info.value.errno == errno.EMSGSIZE
    assert not is_open(fd)


def test_max_fds(newfd: Callable[[], int]) -> None:
    fds = [newfd(), newfd()]
    dec = StreamDecoder(max_fds=1)
    dec.receive_data(frame(b"x", 2), fds)
    with pytest.raises(FrameError, match="max_fds=1"):
        dec.next_message()
    assert not any(is_open(fd) for fd in fds)


def test_garbage(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(b"GET / HTTP/1.0\r\n\r\n", [fd])
    with pytest.raises(FrameError, match="not an afunix frame"):
        dec.next_message()
    assert not is_open(fd)


def test_fds_without_data(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    with pytest.raises(FrameError, match="no data"):
        dec.receive_data(b"", [fd])
    assert not is_open(fd)


def test_errors_are_sticky_and_close_later_fds(newfd: Callable[[], int]) -> None:
    dec = StreamDecoder()
    dec.receive_data(b"\x00" * 8)
    with pytest.raises(FrameError) as first:
        dec.next_message()
    with pytest.raises(FrameError) as again:
        dec.next_message()
    assert again.value is first.value
    late = newfd()
    with pytest.raises(FrameError):
        dec.receive_data(b"more", [late])
    assert not is_open(late)


def test_close_releases_held_fds(newfd: Callable[[], int]) -> None:
    a, b = newfd(), newfd()
    dec = StreamDecoder()
    dec.receive_data(frame(b"hello", 1)[:9], [a])  # header parsed, body pending
    dec.receive_data(frame(b"next", 1)[:1], [b])  # not parsed yet
    assert dec.next_message() is NEED_DATA
    assert dec.held_fds == 1 + 1
    dec.close()
    assert not is_open(a)
    assert not is_open(b)


def test_receive_after_eof_is_a_bug() -> None:
    dec = StreamDecoder()
    dec.receive_data(b"")
    with pytest.raises(RuntimeError):
        dec.receive_data(b"x")


# ------------------------------------------------------------------- packets
def test_packet_table(newfd: Callable[[], int]) -> None:
    a, b = newfd(), newfd()
    assert decode_packet(frame(b"abc", 2), [a, b]) == RawMessage(b"abc", [a, b], 0, 3)
    assert decode_packet(frame(b"")) == RawMessage(b"", [], 0, 0)
    memfd = decode_packet(encode_header(99, 1, FLAG_MEMFD), [a], tag="t")
    assert (memfd.memfd, memfd.length, memfd.data, memfd.tag) == (True, 99, b"", "t")


@pytest.mark.parametrize(
    ("packet", "nfds", "kw", "match"),
    [
        (b"\xaf\0\0\x01\0\0\0\x01x", 1, {"truncated": True}, "MSG_TRUNC"),
        (b"\xaf\0", 1, {}, "shorter than the 8-byte header"),
        (b"\xaf\0\0\x01\0\0\0\x02x", 1, {}, "holds 1 payload bytes but its header announces 2"),
        (b"\xaf\0\0\x02\0\0\0\x01x", 1, {}, "announces 2 descriptor.*1 arrived"),
        (b"\xaf\0\0\x00\0\0\0\x01x", 1, {}, "announces 0 descriptor.*1 arrived"),
        (b"\xaf\0\0\x01\0\0\0\x09123456789", 1, {"max_size": 8}, "exceeds"),
        (b"\x00\0\0\x01\0\0\0\x01x", 1, {}, "not an afunix frame"),
    ],
)
def test_packet_errors_close_fds(
    newfd: Callable[[], int], packet: bytes, nfds: int, kw: dict[str, object], match: str
) -> None:
    fds = [newfd() for _ in range(nfds)]
    with pytest.raises(FrameError, match=match):
        decode_packet(packet, fds, **kw)  # type: ignore[arg-type]
    assert not any(is_open(fd) for fd in fds)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("buffered", [False, True])
def test_batch_span_counts_from_the_end_of_the_batch(
    newfd: Callable[[], int], fast: bool, buffered: bool
) -> None:
    """Linux ends a ``recvmsg`` with the part of a ``sendmsg`` that carries descriptors,
    so one read (here 253,248 bytes, within a channel's 256 KiB buffer) may bring 248 KiB
    of earlier plain frames before the batch's first header, whose last header then
    starts 308 KiB after the read's first byte. Counted from there, BATCH_SPAN refused
    this legitimate stream; counted from the end of the batch's bytes it is accepted."""
    plain = frame(b"p" * 8000) * 31  # earlier sendmsg calls, no descriptors
    batch = frame(b"d" * 4000, 1) * 16  # one sendmsg: 16 frames, 16 descriptors
    stream, cut = plain + batch, len(plain) + 5000  # the read ends inside the batch
    fds = [newfd() for _ in range(16)]
    dec = StreamDecoder()
    head = 5 if buffered else 0  # a short read before: the decoder holds bytes
    if head:
        dec.receive_data(stream[:head])
    dec.receive_data(stream[head:cut], fds)
    dec.receive_data(stream[cut:])
    got: list[RawMessage] = []
    while fast and (item := dec.next_fast()) is not None:
        body, its = (item, []) if isinstance(item, bytes) else item
        got.append(RawMessage(body, its, 0, len(body)))
    got += [m for m in drain(dec) if isinstance(m, RawMessage)]
    assert [m.fds for m in got] == [[]] * 31 + [[fd] for fd in fds]
    assert dec.held_fds == 0
