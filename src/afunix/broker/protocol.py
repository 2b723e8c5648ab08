"""The broker's wire protocol, version 1: request and reply *bodies* (sans-IO).

The full description, for writing a client in another language, is in
``docs/broker.md``. In short: every message is an afunix frame over a stream
socket, an 8-byte header (``0xAF, flags, nfds, length``, network byte order)
and ``length`` bytes of body. The header is the channel's business: the
broker and its clients talk through :class:`afunix.Channel` /
:class:`afunix.AsyncChannel`, which add it, check it and carry the
descriptors; this module encodes and decodes the bodies.

Request body (client -> broker)::

    offset size field
    0      1    version   1
    1      1    kind      1 = OPEN
    2      2    reserved  0
    4      4    id        chosen by the client, echoed in the reply
    8      4    flags     wire flags (afunix.broker.flags.Wire)
    12     4    mode      creation mode (0 unless CREATE), at most 0o777
    16     ...  path      the absolute path, raw bytes (no NUL, at most 4095)

A request carries no descriptors (``nfds`` = 0) and is never a memfd payload.

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
from ..lowlevel import close_fds

__all__ = [
    "BODY",
    "CLOSING",
    "KIND_ERROR",
    "KIND_OPEN",
    "KIND_OPEN_REPLY",
    "MAX_MESSAGE",
    "MAX_PATH",
    "MAX_REPLY",
    "VERSION",
    "BadRequest",
    "OpenRequest",
    "Reply",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "frame",
    "next_id",
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
#: The afunix frame header (see :func:`frame`): magic, flags, nfds, length.
_HEADER: Final = struct.Struct("!BBHI")
_MAGIC: Final = 0xAF
#: Longest reply body: the fixed part and the longest message.
MAX_REPLY: Final = REPLY.size + MAX_MESSAGE


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


def frame(body: bytes, nfds: int = 0) -> bytes:
    """*body* as a whole afunix frame (header ``0xAF, 0, nfds, len(body)``, then the body).

    For bytes written without a channel: the error frame the
    :class:`afunix.Server` sends a connection it refuses right after
    ``accept`` (``refuse_with``), and clients written against raw sockets
    (tests, other languages). A channel frames what it sends itself.
    """
    return _HEADER.pack(_MAGIC, 0, nfds, len(body)) + body


def next_id(rid: int) -> int:
    """The request id after *rid*: ids count 1, 2, ... 0xFFFFFFFF, then 1 again (0 never:
    it is the id of a reply to a request that could not be read)."""
    return rid + 1 if 0 < rid < 0xFFFFFFFF else 1


def encode_request(req: OpenRequest) -> bytes:
    """The body of *req* (the channel frames it)."""
    if not 0 <= req.id <= 0xFFFFFFFF:
        raise ValueError(f"request id {req.id} does not fit 32 bits")
    return REQUEST.pack(VERSION, KIND_OPEN, 0, req.id, req.flags, req.mode) + req.path


def decode_request(body: bytes | memoryview, nfds: int = 0) -> OpenRequest:
    """One received request body -> :class:`OpenRequest`, or :class:`BadRequest`.

    *nfds* is how many descriptors came with it. Requests carry none: the
    broker's channel closes any as they arrive (``discard_fds``), and such a
    request is refused (``EINVAL``, the connection goes on).
    """
    if nfds:
        n = nfds
        raise BadRequest(
            errno.EINVAL,
            f"requests carry no descriptors; the {n} that came with this one were closed "
            "unused (the broker never resolves paths relative to a client's descriptor)",
            _peek_id(body),
        )
    data = bytes(body)
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
    return OpenRequest(rid, data[BODY:], flags, mode)


def _peek_id(data: bytes | memoryview) -> int:
    return int(struct.unpack_from("!I", data, 4)[0]) if len(data) >= 8 else 0


def encode_reply(reply: Reply, *, with_fd: bool = False) -> bytes:
    """The body of *reply*; *with_fd* says the one descriptor goes with it (the
    caller attaches it: ``chan.send(body, [fd])``)."""
    if with_fd != (reply.errno == 0):
        raise ValueError("a reply carries a descriptor exactly when errno is 0")
    text = reply.message.encode("utf-8", "replace")
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + b"..."
    rflags = CLOSING if reply.closing else 0
    return REPLY.pack(VERSION, reply.kind, rflags, reply.id & 0xFFFFFFFF, reply.errno) + text


def decode_reply(body: bytes | memoryview, fds: Sequence[int] = ()) -> tuple[Reply, int | None]:
    """One received reply body and its descriptors -> ``(Reply, fd or None)``; the
    caller owns the fd.

    Raises :class:`afunix.ProtocolError` (closing every descriptor in *fds*) if
    the body is not a valid reply.
    """
    fds = list(fds)

    def bad(why: str) -> ProtocolError:
        n = close_fds(fds)
        extra = f"; {n} descriptor(s) that came with it were closed" if n else ""
        return ProtocolError(f"broker sent an invalid reply: {why}{extra}")

    data = bytes(body)
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
    message = data[REPLY.size :].decode("utf-8", "replace")
    reply = Reply(rid, err, message, kind, bool(rflags & CLOSING))
    return reply, (fds[0] if fds else None)
