"""The afunix frame (sans-IO): its header, its one check, packets, events, errors.

Every message starts with an 8-byte header, network byte order::

    offset  size  field
    0       1     magic   0xAF
    1       1     flags   bit 0: MEMFD (the payload is in a sealed memfd, the last descriptor)
    2       2     nfds    how many descriptors travel with the message (0-253)
    4       4     length  payload length in bytes

followed by ``length`` payload bytes (none when ``MEMFD`` is set: the payload
is the memfd's content and ``length`` its size). The descriptors ride, with
``SCM_RIGHTS``, on the ``sendmsg`` that carries the header's first byte, so
they never travel with an empty payload.

:func:`header_problem` is the one check of a header: :func:`decode_header`,
:func:`decode_packet` (one seqpacket or datagram packet, one message) and the
stream decoder (:mod:`.decoder`) all use it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from .._cmsg import SCM_MAX_FD, close_fds
from .._core import ccore
from .._errors import ProtocolError

MAGIC: Final = 0xAF
FLAG_MEMFD: Final = 0x01
KNOWN_FLAGS: Final = FLAG_MEMFD
HEADER: Final = struct.Struct("!BBHI")
#: The header as two words: ``magic << 24 | flags << 16 | nfds`` and ``length``.
WORDS: Final = struct.Struct("!II")
#: The first word of a header without flags and without descriptors.
PLAIN_WORD: Final = MAGIC << 24
#: Default largest payload accepted (inline or memfd): 64 MiB.
DEFAULT_MAX_SIZE: Final = 64 * 1024 * 1024


class Event(Enum):
    """Sentinels returned by :meth:`StreamDecoder.next_message`."""

    NEED_DATA = "need data"
    CLOSED = "closed"


#: More bytes are needed before the next message is complete.
NEED_DATA: Final = Event.NEED_DATA
#: The peer closed the stream cleanly, between two messages.
CLOSED: Final = Event.CLOSED


class FrameError(ProtocolError):
    """A frame broke the protocol; the descriptors it held (``fds_closed``) were closed."""

    fds_closed: int = 0


@dataclass(slots=True)
class RawMessage:
    """One decoded frame. Its descriptors are owned by whoever holds it.

    For a ``MEMFD`` frame ``data`` is empty, ``length`` is the memfd's size
    and the memfd is the last of ``fds``.
    """

    data: bytes
    fds: list[int] = field(default_factory=list)
    flags: int = 0
    length: int = 0
    #: What the caller attached to the bytes holding the header (e.g. credentials).
    tag: object = None

    @property
    def memfd(self) -> bool:
        return bool(self.flags & FLAG_MEMFD)


def encode_header(length: int, nfds: int = 0, flags: int = 0) -> bytes:
    """The 8 header bytes of a message of *length* payload bytes and *nfds* descriptors."""
    if not 0 <= length <= 0xFFFFFFFF:
        raise ValueError(f"payload length {length} does not fit the 32-bit length field")
    if not 0 <= nfds <= SCM_MAX_FD:
        raise ValueError(
            f"cannot send {nfds} descriptors in one message: the kernel's limit is "
            f"{SCM_MAX_FD} (SCM_MAX_FD); send them in several messages"
        )
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flags {flags:#x}")
    if flags & FLAG_MEMFD and nfds == 0:
        raise ValueError("a MEMFD message carries its memfd as a descriptor, so nfds >= 1")
    return HEADER.pack(MAGIC, flags, nfds, length)


_pack_words = WORDS.pack


def py_hold_frame(held: bytearray, data: Any, limit: int) -> int:
    """Append the plain frame of *data* to *held*: its new length, or ``-1`` (nothing done)
    unless *data* is ``bytes`` or ``bytearray`` of at most *limit* bytes.

    What ``send(..., more=True)`` does with a small message (the channel then
    holds *held*). The reference of the compiled core's ``hold_frame``.
    """
    kind = type(data)
    if (kind is not bytes and kind is not bytearray) or len(data) > limit:
        return -1
    held += _pack_words(PLAIN_WORD, len(data))
    held += data
    return len(held)


#: The compiled core's twin where it runs (see :mod:`afunix._core`).
hold_frame = py_hold_frame if ccore is None else ccore.hold_frame
#: Whether :func:`hold_frame` is compiled: ``Channel.send`` does the pure one's work inline.
HOLD_IN_C: Final = ccore is not None


def header_problem(
    word: int, length: int, max_size: int, max_fds: int = SCM_MAX_FD
) -> tuple[str, int] | None:
    """What is wrong with a header (its :data:`WORDS`), as ``(message, errno)``, or ``None``."""
    magic, flags, nfds = word >> 24, word >> 16 & 0xFF, word & 0xFFFF
    if magic != MAGIC:
        why = "is the peer speaking another protocol, or did it lose count of bytes?"
        return f"not an afunix frame: first byte {magic:#04x}, expected 0xaf ({why})", errno.EPROTO
    if flags & ~KNOWN_FLAGS:
        return f"frame has unknown flags {flags:#04x} (a newer peer?)", errno.EPROTO
    if nfds > max_fds or nfds > SCM_MAX_FD:
        limit = f"max_fds={max_fds}" if max_fds < SCM_MAX_FD else "the 253 one message can carry"
        return f"frame announces {nfds} descriptors, more than {limit}", errno.EPROTO
    if flags & FLAG_MEMFD and nfds == 0:
        return "frame says its payload is in a memfd but carries no descriptor", errno.EPROTO
    if length > max_size:
        why = f"the maximum message size of {max_size} bytes (raise max_size on the receiver"
        return f"frame of {length} bytes exceeds {why} if this is legitimate)", errno.EMSGSIZE
    return None


def decode_header(header: bytes, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int, int]:
    """Check 8 header bytes; return ``(flags, nfds, length)`` or raise :class:`FrameError`."""
    word, length = WORDS.unpack(header)
    problem = header_problem(word, length, max_size)
    if problem is not None:
        raise FrameError(*problem)
    return word >> 16 & 0xFF, word & 0xFFFF, length


def frame_error(message: str, fds: list[int], err: int = errno.EPROTO) -> FrameError:
    """A :class:`FrameError`, after closing *fds* (emptied) and saying how many."""
    exc = FrameError(message, err)
    exc.fds_closed = close_fds(fds)
    if exc.fds_closed:
        exc.strerror = f"{message}; {exc.fds_closed} descriptor(s) that came with it were closed"
        exc.args = (exc.errno, exc.strerror)
    fds.clear()
    return exc


def decode_packet(
    packet: bytes,
    fds: Sequence[int] = (),
    *,
    truncated: bool = False,
    max_size: int = DEFAULT_MAX_SIZE,
    tag: object = None,
) -> RawMessage:
    """One seqpacket/datagram *packet* -> one message, or :class:`FrameError`.

    *fds* came with it (taken: closed on error); *truncated*: ``MSG_TRUNC`` was set.
    """
    owned, held = list(fds), len(packet) - HEADER.size
    word, length = WORDS.unpack_from(packet) if held >= 0 else (0, 0)
    flags, nfds = word >> 16 & 0xFF, word & 0xFFFF
    body = 0 if flags & FLAG_MEMFD else length
    problem = None if truncated or held < 0 else header_problem(word, length, max_size)
    if truncated:
        why = f"packet truncated (MSG_TRUNC) at {len(packet)} bytes: it is larger than the"
        problem = f"{why} receive buffer (max_size)", errno.EMSGSIZE
    elif held < 0:
        problem = f"packet of {len(packet)} bytes is shorter than the 8-byte header", errno.EPROTO
    elif problem is None and held != body:
        problem = f"packet holds {held} payload bytes but its header announces {body}", errno.EPROTO
    elif problem is None and len(owned) != nfds:
        why = f"header announces {nfds} descriptor(s) but {len(owned)} arrived with the packet"
        problem = why, errno.EPROTO
    if problem is not None:
        raise frame_error(problem[0], owned, problem[1])
    return RawMessage(bytes(packet[HEADER.size :]), owned, flags, length, tag)
