"""The broker's wire protocol: bodies <-> bytes, both directions, with no socket (tables).

The byte tables are whole frames as they travel: the 8-byte afunix header (the
channel's) and the body (:mod:`afunix.broker.protocol`'s). The frames are cut
with the channels' own stream decoder, as a broker or client receives them.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from afunix._errors import ProtocolError
from afunix._protocol import NEED_DATA, FrameError, RawMessage, StreamDecoder
from afunix.broker.protocol import (
    KIND_ERROR,
    BadRequest,
    OpenRequest,
    Reply,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    frame,
    next_id,
)

# Each request with its exact bytes on the wire (afunix header + body).
REQUESTS = [
    (
        OpenRequest(1, b"/etc/hostname", 0x1, 0),
        bytes.fromhex("af0000000000001d01010000000000010000000100000000") + b"/etc/hostname",
    ),
    (
        OpenRequest(0xFFFFFFFF, b"/srv/x", 0x1A, 0o640),
        bytes.fromhex("af0000000000001601010000ffffffff0000001a000001a0") + b"/srv/x",
    ),
    (
        OpenRequest(5, b"/\xff", 0x1, 0),
        bytes.fromhex("af0000000000001201010000000000050000000100000000") + b"/\xff",
    ),
]

REPLIES = [
    (
        Reply(1, 0, "granted"),
        True,
        bytes.fromhex("af00000100000013018100000000000100000000") + b"granted",
    ),
    (
        Reply(2, errno.EACCES, "no"),
        False,
        bytes.fromhex("af0000000000000e01810000000000020000000d") + b"no",
    ),
    (
        Reply(0, errno.EMSGSIZE, "", KIND_ERROR, closing=True),
        False,
        bytes.fromhex("af0000000000000c01ff0001000000000000005a"),
    ),
]


@pytest.mark.parametrize(("req", "wire"), REQUESTS)
def test_request_round_trip(req: OpenRequest, wire: bytes) -> None:
    assert encode_request(req) == wire[8:]
    assert frame(encode_request(req)) == wire
    decoder = StreamDecoder(max_size=8192, max_fds=4)
    decoder.receive_data(wire)
    msg = decoder.next_message()
    assert isinstance(msg, RawMessage)
    assert decode_request(msg.data, msg.fds) == req
    assert decoder.next_message() is NEED_DATA


@pytest.mark.parametrize(("reply", "with_fd", "wire"), REPLIES)
def test_reply_round_trip(reply: Reply, with_fd: bool, wire: bytes) -> None:
    assert encode_reply(reply, with_fd=with_fd) == wire[8:]
    assert frame(encode_reply(reply, with_fd=with_fd), int(with_fd)) == wire
    fds = [os.open("/dev/null", os.O_RDONLY)] if with_fd else []
    got, fd = decode_reply(wire[8:], list(fds))
    assert got == reply
    if with_fd:
        assert fd == fds[0]
        os.close(fd)
    else:
        assert fd is None


def test_request_split_byte_by_byte() -> None:
    wire = b"".join(w for _, w in REQUESTS)
    decoder = StreamDecoder(max_size=8192, max_fds=4)
    got = []
    for i in range(len(wire)):
        decoder.receive_data(wire[i : i + 1])
        while isinstance(msg := decoder.next_message(), RawMessage):
            got.append(decode_request(msg.data, msg.fds))
    assert got == [r for r, _ in REQUESTS]


def _body(version: int = 1, kind: int = 1, reserved: int = 0, rid: int = 9) -> bytes:
    return struct.pack("!BBHIII", version, kind, reserved, rid, 1, 0) + b"/x"


BAD_REQUESTS = [
    (b"\x01\x01", errno.EBADMSG, True, 0),
    (_body(version=2), errno.EPROTONOSUPPORT, True, 9),
    (_body(kind=7), errno.ENOSYS, False, 9),
    (_body(reserved=1), errno.EINVAL, False, 9),
]


@pytest.mark.parametrize(("body", "err", "closing", "rid"), BAD_REQUESTS)
def test_bad_requests(body: bytes, err: int, closing: bool, rid: int) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(body)
    assert (info.value.errno, info.value.closing, info.value.id) == (err, closing, rid)


def test_descriptors_with_a_request_refuse_it() -> None:
    """Two descriptors came (the broker's channel closed them as they arrived:
    ``discard_fds``, tested in tests/integration/test_channel_options.py)."""
    with pytest.raises(BadRequest, match="2 that came") as info:
        decode_request(_body(), 2)
    assert info.value.errno == errno.EINVAL and info.value.id == 9
    assert not info.value.closing  # the connection goes on


def test_oversized_request_is_a_frame_error() -> None:
    """The broker's channel has ``max_size=max_request_bytes``: a longer body is refused
    from its header (EMSGSIZE), before any of it is buffered."""
    decoder = StreamDecoder(max_size=100, max_fds=1)
    decoder.receive_data(frame(encode_request(OpenRequest(1, b"/" + b"a" * 200, 1))))
    with pytest.raises(FrameError) as info:
        decoder.next_message()
    assert info.value.errno == errno.EMSGSIZE


BAD_REPLIES = [
    (b"\x01\x81", 0, "shorter"),
    (struct.pack("!BBHIi", 2, 0x81, 0, 1, 0), 1, "version 2"),
    (struct.pack("!BBHIi", 1, 0x42, 0, 1, 0), 0, "unknown reply kind"),
    (struct.pack("!BBHIi", 1, 0x81, 0, 1, -5), 0, "negative errno"),
    (struct.pack("!BBHIi", 1, 0x81, 0, 1, 0), 0, "expected 1"),  # success without fd
    (struct.pack("!BBHIi", 1, 0x81, 0, 1, 13), 1, "expected 0"),  # error with an fd
    (struct.pack("!BBHIi", 1, 0xFF, 0, 1, 0), 1, "expected 0"),
]


@pytest.mark.parametrize(("body", "nfds", "why"), BAD_REPLIES)
def test_bad_replies_close_their_descriptors(body: bytes, nfds: int, why: str) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    with pytest.raises(ProtocolError, match=why):
        decode_reply(body, list(fds))
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_reply_needs_fd_exactly_on_success() -> None:
    with pytest.raises(ValueError):
        encode_reply(Reply(1, 0), with_fd=False)
    with pytest.raises(ValueError):
        encode_reply(Reply(1, errno.EACCES), with_fd=True)


def test_long_messages_are_cut() -> None:
    wire = encode_reply(Reply(1, errno.EACCES, "x" * 5000))
    assert len(wire) == 12 + 1024
    assert wire.endswith(b"...")


def test_request_ids_wrap_and_skip_zero() -> None:
    assert next_id(0) == 1  # a new client's first id
    assert next_id(1) == 2
    assert next_id(0xFFFFFFFE) == 0xFFFFFFFF
    assert next_id(0xFFFFFFFF) == 1
