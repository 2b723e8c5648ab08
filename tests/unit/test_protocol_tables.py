"""Byte tables for ``afunix._protocol``: the one header check, each batch rule, the factory.

Every header row goes through the three readers of a header (``decode_header``,
``decode_packet`` and ``StreamDecoder``) and must get the same verdict from each:
there is one check (``framing.header_problem``). Every batch row is fed as the
chunks ``recvmsg`` would return, read through ``next_message`` alone and through
``next_fast`` first (as channels do), and must give the same messages or error,
with every descriptor either handed out or closed. Descriptors are real (dups of
/dev/null), so "closed" is checked against the kernel's table.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Callable

import pytest

from afunix._protocol import (
    CLOSED,
    FLAG_MEMFD,
    NEED_DATA,
    FrameError,
    RawMessage,
    StreamDecoder,
    decode_header,
    decode_packet,
    encode_header,
)
from afunix._protocol.framing import WORDS, header_problem

from ..conftest import is_open, simple_payload


def raw(magic: int = 0xAF, flags: int = 0, nfds: int = 0, length: int = 0) -> bytes:
    return struct.pack("!BBHI", magic, flags, nfds, length)


def frame(payload: bytes, nfds: int = 0) -> bytes:
    return encode_header(len(payload), nfds) + payload


# ------------------------------------------------------------------ the header check
# (header bytes, max_size, max_fds) -> None (valid) or (what the error says, errno)
HEADERS: list[tuple[str, bytes, int, int, tuple[str, int] | None]] = [
    ("plain", raw(length=3), 64, 253, None),
    ("two descriptors", raw(nfds=2, length=3), 64, 253, None),
    ("length at the maximum", raw(length=64), 64, 253, None),
    ("memfd", raw(flags=FLAG_MEMFD, nfds=1, length=1 << 20), 1 << 20, 253, None),
    ("253 descriptors", raw(nfds=253, length=1), 64, 253, None),
    ("bad magic", raw(magic=0x47, length=3), 64, 253, ("not an afunix frame", errno.EPROTO)),
    ("unknown flag 0x80", raw(flags=0x80, length=3), 64, 253, ("unknown flags", errno.EPROTO)),
    ("unknown flag 0x02", raw(flags=0x02, length=3), 64, 253, ("unknown flags", errno.EPROTO)),
    ("memfd, no descriptor", raw(flags=FLAG_MEMFD, length=3), 64, 253, ("memfd", errno.EPROTO)),
    ("254 descriptors", raw(nfds=254, length=1), 64, 253, ("254 descriptors", errno.EPROTO)),
    ("nfds > max_fds", raw(nfds=2, length=1), 64, 1, ("max_fds=1", errno.EPROTO)),
    ("length > max_size", raw(length=65), 64, 253, ("65 bytes exceeds", errno.EMSGSIZE)),
]


@pytest.mark.parametrize(
    ("header", "max_size", "max_fds", "verdict"),
    [row[1:] for row in HEADERS],
    ids=[row[0] for row in HEADERS],
)
def test_one_header_check_everywhere(
    newfd: Callable[[], int],
    header: bytes,
    max_size: int,
    max_fds: int,
    verdict: tuple[str, int] | None,
) -> None:
    word, length = WORDS.unpack(header)
    nfds, memfd = word & 0xFFFF, bool(word >> 16 & FLAG_MEMFD)
    body = b"" if memfd else b"b" * min(length, 100)
    problem = header_problem(word, length, max_size, max_fds)
    if verdict is None:
        assert problem is None
    else:
        assert problem is not None
        assert verdict[0] in problem[0]
        assert problem[1] == verdict[1]

    readers: list[Callable[[list[int]], object]] = [
        lambda fds: stream_one(header + body, fds, max_size, max_fds),
    ]
    if max_fds == 253:  # packets and decode_header know only the kernel's limit
        readers.append(lambda fds: decode_packet(header + body, fds, max_size=max_size))
        readers.append(lambda fds: decode_header(header, max_size))
    for read in readers:
        fds = [newfd() for _ in range(min(nfds, 3))] if nfds <= 3 else []
        if verdict is None:
            if nfds > 3:
                continue  # (253 real descriptors are not worth it here)
            got = read(fds)
            assert not isinstance(got, BaseException)
            for fd in fds:
                os.close(fd)
        else:
            with pytest.raises(FrameError) as info:
                read(fds)
            assert verdict[0] in str(info.value)
            assert info.value.errno == verdict[1]
            assert not any(is_open(fd) for fd in fds)


def stream_one(data: bytes, fds: list[int], max_size: int, max_fds: int) -> object:
    dec = StreamDecoder(max_size, max_fds)
    dec.receive_data(data, fds)
    got = dec.next_message()
    assert isinstance(got, RawMessage)
    return got


@pytest.mark.parametrize("cut", range(1, 8))
def test_truncated_header(newfd: Callable[[], int], cut: int) -> None:
    """Fewer than 8 header bytes: a short packet, or a stream that ends there."""
    fd = newfd()
    with pytest.raises(FrameError, match=f"packet of {cut} bytes is shorter than the 8-byte"):
        decode_packet(raw(nfds=1, length=1)[:cut], [fd])
    assert not is_open(fd)
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(raw(nfds=1, length=1)[:cut], [fd])
    assert dec.next_message() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(FrameError, match=f"mid-message, after {cut} of the 8 header bytes"):
        dec.next_message()
    assert not is_open(fd)


# ------------------------------------------------------------------- the batch rules
P1, P2, P3 = frame(b"one"), frame(b"two!"), frame(b"three")
F1, F2 = frame(b"fd-1", 1), frame(b"fds-2", 2)
# name -> (chunks as [(bytes, how many descriptors came with them)], then either the
# messages as [(payload, indexes of the descriptors it gets)] or the error's words)
RULES: dict[str, tuple[list[tuple[bytes, int]], list[tuple[bytes, list[int]]] | str]] = {
    "each frame with its own": (
        [(F1, 1), (P1, 0), (F2, 2)],
        [(b"fd-1", [0]), (b"one", []), (b"fds-2", [1, 2])],
    ),
    "two frames' descriptors in one batch": (
        [(F1 + P1 + F2, 3)],
        [(b"fd-1", [0]), (b"one", []), (b"fds-2", [1, 2])],
    ),
    "batch before its frame (with the end of the one before)": (
        [(P1 + F1[:3], 1), (F1[3:], 0)],
        [(b"one", []), (b"fd-1", [0])],
    ),
    "batch cut anywhere, its descriptors with the first bytes": (
        [(F1[:1], 3), (F1[1:] + F2[:9], 0), (F2[9:], 0)],
        [(b"fd-1", [0]), (b"fds-2", [1, 2])],
    ),
    "descriptors after their frame's header began": (
        [(F1[:3], 0), (F1[3:], 1)],
        "announces 1 descriptor(s) but none arrived",
    ),
    "descriptors with the middle of a payload": (
        [(P1[:9], 0), (P1[9:], 1), (P2, 0)],
        "no message starts",
    ),
    "a cut control message: fewer than announced": (
        [(F2, 1)],
        "announces 2 descriptor(s) but 1 arrived",
    ),
    "a cut control message: the second frame's are missing": (
        [(F1 + F1, 1)],
        "announces 1 descriptor(s) but none arrived",
    ),
    "leftover once the next batch's bytes have passed": (
        [(F1, 2), (P1, 1), (P2, 0)],
        "1 descriptor(s) arrived that no message header announced",
    ),
    "leftover at end of file": (
        [(F1 + P1, 2)],
        "1 descriptor(s) arrived that no message header announced",
    ),
    "descriptors on the bytes after the last header, at end of file": (
        [(P1[:9], 0), (P1[9:], 1)],
        "no message header announced",
    ),
    "bad frame after good ones": (
        [(P1 + F1 + raw(magic=0) + b"junk", 1)],
        "not an afunix frame",
    ),
}


def run_rules(
    dec: StreamDecoder, chunks: list[tuple[bytes, list[int]]], fast: bool
) -> list[RawMessage]:
    got: list[RawMessage] = []

    def take() -> None:
        while True:
            item = dec.next_fast() if fast else None
            if item is not None:
                body, fds = item if type(item) is tuple else (simple_payload(item), [])
                got.append(RawMessage(body, fds, 0, len(body)))
                continue
            msg = dec.next_message()
            if not isinstance(msg, RawMessage):
                return
            got.append(msg)

    try:
        for data, fds in chunks:
            dec.receive_data(data, fds)
            take()
        dec.receive_data(b"")
        take()
        assert dec.next_message() is CLOSED
    except FrameError:
        for m in got:  # handed out before the error: the caller's
            for fd in m.fds:
                os.close(fd)
        raise
    return got


@pytest.mark.parametrize("fast", [False, True], ids=["next_message", "next_fast"])
@pytest.mark.parametrize(("chunks", "expected"), list(RULES.values()), ids=list(RULES))
def test_batch_rules(
    newfd: Callable[[], int],
    chunks: list[tuple[bytes, int]],
    expected: list[tuple[bytes, list[int]]] | str,
    fast: bool,
) -> None:
    sent = [[newfd() for _ in range(n)] for _, n in chunks]
    every = [fd for fds in sent for fd in fds]
    dec = StreamDecoder()
    fed = [(data, fds) for (data, _), fds in zip(chunks, sent, strict=True)]
    if isinstance(expected, str):
        with pytest.raises(FrameError, match=re.escape(expected)) as info:
            run_rules(dec, fed, fast)
        assert info.value.errno == errno.EPROTO
        assert not any(is_open(fd) for fd in every)
        with pytest.raises(FrameError):  # and it stays broken
            dec.next_message()
        return
    got = run_rules(dec, fed, fast)
    assert [(m.data, m.fds) for m in got] == [(p, [every[i] for i in ix]) for p, ix in expected]
    assert dec.held_fds == 0
    assert dec.buffered == 0


def test_errors_wait_for_the_messages_before_them(newfd: Callable[[], int]) -> None:
    fd = newfd()
    dec = StreamDecoder()
    dec.receive_data(P1 + F1 + raw(magic=0) + b"junk", [fd])
    assert simple_payload(dec.next_fast()) == b"one"
    assert dec.next_fast() == (b"fd-1", [fd])  # handed out: the caller's now
    assert dec.next_fast() is None
    with pytest.raises(FrameError, match="not an afunix frame"):
        dec.next_message()
    assert is_open(fd)
    os.close(fd)


# --------------------------------------------------------------------- the factory
def test_results_come_from_the_factory(newfd: Callable[[], int]) -> None:
    """Simple frames and the others (memfd, tagged) all come out built by the factory."""
    made: list[tuple[bytes, list[int], int, int, object]] = []

    def factory(data: bytes, fds: list[int], flags: int, length: int, tag: object) -> RawMessage:
        made.append((data, fds, flags, length, tag))
        return RawMessage(data, fds, flags, length, tag)

    a, m = newfd(), newfd()
    dec = StreamDecoder(factory=factory)
    dec.receive_data(P1 + F1 + encode_header(99, 1, FLAG_MEMFD), [a, m])
    for _ in range(3):
        assert isinstance(dec.next_message(), RawMessage)
    dec.receive_data(P2, tag="creds")
    assert isinstance(dec.next_message(), RawMessage)
    assert made == [
        (b"one", [], 0, 3, None),
        (b"fd-1", [a], 0, 4, None),
        (b"", [m], FLAG_MEMFD, 99, None),
        (b"two!", [], 0, 4, "creds"),
    ]
    os.close(a)
    os.close(m)


# ---------------------------------------------------------------------- direct mode
def test_direct_mode_only_for_the_incomplete_plain_frame_in_front(newfd: Callable[[], int]) -> None:
    big = frame(b"x" * 100_000)
    dec = StreamDecoder()
    dec.receive_data(P1 + big[:500])
    assert dec.start_direct(1000) == 0  # a message comes first
    assert simple_payload(dec.next_fast()) == b"one"
    assert dec.start_direct(200_000) == 0  # smaller than asked for
    fd, fd2, fd3 = newfd(), newfd(), newfd()
    dec.receive_data(big[500:] + F1[:6], [fd])  # complete now; F1 begins, with its descriptor
    assert dec.start_direct(1000) == 0  # (the note was for the frame now decoded)
    assert simple_payload(dec.next_fast()) == b"x" * 100_000
    dec.receive_data(F1[6:] + frame(b"y" * 5000)[:100])
    assert dec.start_direct(4096) == 0  # F1 comes first
    assert dec.next_message() == RawMessage(b"fd-1", [fd], 0, 4)
    assert dec.start_direct(4096) == 5000
    assert dec.take_buffered_bytes() == b"y" * 92
    dec.skip(5000 - 92)
    dec.receive_data(F2[:10], [fd2, fd3])
    assert dec.start_direct(1) == 0  # not a plain frame
    dec.receive_data(F2[10:] + P2)
    assert dec.next_fast() == (b"fds-2", [fd2, fd3])
    assert simple_payload(dec.next_fast()) == b"two!"
