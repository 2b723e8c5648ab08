"""The broker's wire protocol, version 1 (sans-IO: bytes in, events out).

The full description, for writing a client in another language, is in
``docs/broker.md``. In short: every message is an afunix frame
(:mod:`afunix._protocol`: an 8-byte header ``0xAF, flags, nfds, length``,
network byte order, then ``length`` bytes of body), over a stream socket.

Request body (client -> broker)::

    offset size field
    0      1    version   1
    1      1    kind      1 = OPEN
    2      2    reserved  0
    4      4    id        chosen by the client, echoed in the reply
    8      4    flags     wire flags (afunix.broker.flags.Wire)
    12     4    mode      creation mode (0 unless CREATE), at most 0o777
    16     ...  path      the absolute path, raw bytes (no NUL, at most 4095)

A request carries no descriptors (``nfds`` = 0).

Reply body (broker -> client)::

    offset size field
    0      1    version   1
    1      1    kind      0x81 = OPEN reply, 0xFF = ERROR (request not understood)
    2      2    rflags    bit 0: CLOSING, the broker closes the connection after this
    4      4    id        the request's id (0 if the request could not be read)
    8      4    errno     0: success, exactly one descriptor attached (nfds = 1);
                          else the errno, and no descriptor
    12     ...  message   UTF-8 text for humans (why), at most 1024 bytes

errno values are the host's (Linux) numbers: client and broker share a kernel.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .. import ProtocolError
from .._protocol import HEADER, Event, RawMessage, StreamDecoder, encode_header
from ..lowlevel import close_fds

__all__ = [
    "BODY",
    "CLOSING",
    "KIND_ERROR",
    "KIND_OPEN",
    "KIND_OPEN_REPLY",
    "MAX_MESSAGE",
    "MAX_PATH",
    "VERSION",
    "BadRequest",
    "Connection",
    "OpenRequest",
    "Reply",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

VERSION: Final = 1
KIND_OPEN: Final = 0x01
KIND_OPEN_REPLY: Final = 0x81
KIND_ERROR: Final = 0xFF
#: Reply flag: the broker closes the connection after this reply.
CLOSING: Final = 0x0001
#: Fixed part of request and reply bodies.
REQUEST: Final = struct.Struct("!BBHIII")
REPLY: Final = struct.Struct("!BBHIi")
BODY: Final = REQUEST.size
#: ``PATH_MAX`` (4096) less the NUL the kernel needs.
MAX_PATH: Final = 4095
#: Longest reply message, in bytes.
MAX_MESSAGE: Final = 1024
#: Largest frame a broker needs to accept for a request by default.
DEFAULT_MAX_REQUEST: Final = HEADER.size + BODY + MAX_PATH + 1


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """``OPEN``: open *path* with wire *flags* (and *mode* when creating)."""

    id: int
    path: bytes
    flags: int
    mode: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """The broker's answer. ``errno == 0`` means the descriptor came with it."""

    id: int
    errno: int
    message: str = ""
    kind: int = KIND_OPEN_REPLY
    closing: bool = False


class BadRequest(ProtocolError):
    """A well-framed request that cannot be served as sent (the connection may go on).

    ``id`` is the request's id when it could be read (else 0); ``version``
    the version the peer spoke; ``closing`` whether the broker must hang up.
    """

    def __init__(
        self, err: int, message: str, id: int = 0, *, version: int = VERSION, closing: bool = False
    ) -> None:
        super().__init__(message, err)
        self.id = id
        self.version = version
        self.closing = closing


def encode_request(req: OpenRequest) -> bytes:
    """The frame (header + body) of *req*."""
    if not 0 <= req.id <= 0xFFFFFFFF:
        raise ValueError(f"request id {req.id} does not fit 32 bits")
    body = REQUEST.pack(VERSION, KIND_OPEN, 0, req.id, req.flags, req.mode) + req.path
    return encode_header(len(body)) + body


def decode_request(msg: RawMessage) -> OpenRequest:
    """One received frame -> :class:`OpenRequest`, or :class:`BadRequest`.

    Any descriptor that came with the frame is closed first: requests carry none.
    """
    if msg.fds:
        n = len(msg.fds)
        close_fds(msg.fds)
        msg.fds.clear()
        raise BadRequest(
            errno.EINVAL,
            f"requests carry no descriptors; the {n} that came with this one were closed "
            "unused (the broker never resolves paths relative to a client's descriptor)",
            _peek_id(msg.data),
        )
    if msg.memfd:
        raise BadRequest(errno.EINVAL, "requests are never sent as memfd payloads", closing=True)
    data = msg.data
    if len(data) < BODY:
        raise BadRequest(
            errno.EBADMSG,
            f"request body of {len(data)} bytes is shorter than the {BODY}-byte fixed part",
            closing=True,
        )
    version, kind, reserved, rid, flags, mode = REQUEST.unpack_from(data)
    if version != VERSION:
        raise BadRequest(
            errno.EPROTONOSUPPORT,
            f"protocol version {version} is not spoken here; this broker speaks version {VERSION}",
            rid,
            version=version,
            closing=True,
        )
    if kind != KIND_OPEN:
        raise BadRequest(errno.ENOSYS, f"unknown request kind {kind:#04x}", rid)
    if reserved:
        raise BadRequest(errno.EINVAL, f"reserved field is {reserved:#06x}, must be 0", rid)
    return OpenRequest(rid, bytes(data[BODY:]), flags, mode)


def _peek_id(data: bytes) -> int:
    return int(struct.unpack_from("!I", data, 4)[0]) if len(data) >= 8 else 0


def encode_reply(reply: Reply, *, with_fd: bool = False) -> bytes:
    """The frame of *reply*; *with_fd* announces the one descriptor that goes with it."""
    if with_fd != (reply.errno == 0):
        raise ValueError("a reply carries a descriptor exactly when errno is 0")
    text = reply.message.encode("utf-8", "replace")
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + b"..."
    body = (
        REPLY.pack(
            VERSION, reply.kind, CLOSING if reply.closing else 0, reply.id & 0xFFFFFFFF, reply.errno
        )
        + text
    )
    return encode_header(len(body), 1 if with_fd else 0) + body


def decode_reply(msg: RawMessage) -> tuple[Reply, int | None]:
    """One received frame -> ``(Reply, fd or None)``; the caller owns the fd.

    Raises :class:`afunix.ProtocolError` (closing any descriptor) if the frame
    is not a valid reply.
    """
    fds = list(msg.fds)
    msg.fds.clear()

    def bad(why: str) -> ProtocolError:
        n = close_fds(fds)
        extra = f"; {n} descriptor(s) that came with it were closed" if n else ""
        return ProtocolError(f"broker sent an invalid reply: {why}{extra}")

    data = msg.data
    if len(data) < REPLY.size:
        raise bad(f"{len(data)} bytes, shorter than the {REPLY.size}-byte fixed part")
    version, kind, rflags, rid, err = REPLY.unpack_from(data)
    if version != VERSION:
        raise bad(f"version {version}, expected {VERSION}")
    if kind not in (KIND_OPEN_REPLY, KIND_ERROR):
        raise bad(f"unknown reply kind {kind:#04x}")
    if err < 0:
        raise bad(f"negative errno {err}")
    want = 1 if err == 0 and kind == KIND_OPEN_REPLY else 0
    if len(fds) != want:
        raise bad(f"errno {err} with {len(fds)} descriptor(s), expected {want}")
    message = bytes(data[REPLY.size :]).decode("utf-8", "replace")
    reply = Reply(rid, err, message, kind, bool(rflags & CLOSING))
    return reply, (fds[0] if fds else None)


class Connection:
    """Per-connection protocol state: a :class:`StreamDecoder` and the next request id.

    Both sides use it. Feed each ``recvmsg`` result to :meth:`receive_data`;
    take frames with :meth:`next_frame` (a :class:`RawMessage`,
    :data:`~afunix._protocol.NEED_DATA` or :data:`~afunix._protocol.CLOSED`). Framing errors raise
    :class:`~afunix._protocol.FrameError` with every descriptor closed.
    """

    def __init__(self, max_size: int, max_fds: int) -> None:
        self.decoder = StreamDecoder(max_size=max_size, max_fds=max_fds)
        self._next_id = 1

    def new_id(self) -> int:
        rid = self._next_id
        self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
        return rid

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.decoder.receive_data(data, fds)

    def next_frame(self) -> RawMessage | Event:
        return self.decoder.next_message()

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def close(self) -> None:
        self.decoder.close()
