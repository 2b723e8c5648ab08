"""Sans-IO framing of messages that carry descriptors (the afunix channel protocol).

No I/O here: bytes and descriptor numbers go in, messages come out (h11's
style). :mod:`afunix.channel` and :mod:`afunix.aio` do the ``sendmsg`` and
``recvmsg`` around it.

Wire format. Every message starts with an 8-byte header, network byte order::

    offset  size  field
    0       1     magic   0xAF
    1       1     flags   bit 0: MEMFD (the payload is in a sealed memfd, the last descriptor)
    2       2     nfds    how many descriptors travel with the message (0-253)
    4       4     length  payload length in bytes

followed by ``length`` payload bytes (none when ``MEMFD`` is set: the
payload is the memfd's content and ``length`` its size). The descriptors are
attached, with ``SCM_RIGHTS``, to the ``sendmsg`` that carries the header's
first byte, so they never travel with an empty payload.

Batches. A sender may write several whole frames with one ``sendmsg`` and
attach the descriptors of all of them, in order, to that one ``sendmsg``
(at most 253, ``SCM_MAX_FD``): one system call instead of one per message.
A ``sendmsg`` always starts on a frame boundary, so its descriptors ride
on the first byte of a header, as for a single message.

Over a byte stream the kernel delivers the descriptors of a ``sendmsg``
with the ``recvmsg`` that returns its first byte, and the rest of its bytes
may come with later ``recvmsg`` calls. :class:`StreamDecoder` therefore
queues descriptors in arrival order and gives each header, in stream order,
the ``nfds`` it announces from the oldest batch, checking that:

* the batch arrived with (or before) the header's bytes, never after;
* a header starts in the bytes that came with the batch (descriptors
  attached to the middle of a payload are an error);
* a batch is used up by the time the bytes that came with the next batch
  have all gone by (its ``sendmsg`` ended before the next one began), and
  nothing is left over at end of file;
* the headers that take a batch's descriptors start within
  :data:`BATCH_SPAN` (256 KiB) of the batch's first byte, and no more than
  two batches' worth of descriptors (``2 * SCM_MAX_FD``) wait for their
  headers: a peer cannot park descriptors in the receiver.

Over seqpacket and datagram sockets one packet is one message
(:func:`decode_packet`).

A frame that is malformed (bad magic, unknown flag), oversized (``length``
above the configured maximum) or whose descriptors do not match its header
raises :class:`~afunix.ProtocolError`. Before raising, the decoder closes
every descriptor it holds; the caller should then close the connection.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, NoReturn

from ._cmsg import SCM_MAX_FD, close_fds
from ._errors import ProtocolError

__all__ = [
    "BATCH_SPAN",
    "CLOSED",
    "DEFAULT_MAX_SIZE",
    "FLAG_MEMFD",
    "HEADER",
    "KNOWN_FLAGS",
    "MAGIC",
    "NEED_DATA",
    "SCM_MAX_FD",
    "Event",
    "FrameError",
    "RawMessage",
    "StreamDecoder",
    "decode_header",
    "decode_packet",
    "encode_header",
]

MAGIC: Final = 0xAF
FLAG_MEMFD: Final = 0x01
KNOWN_FLAGS: Final = FLAG_MEMFD
HEADER: Final = struct.Struct("!BBHI")
#: The headers that take a batch's descriptors start within this many bytes of
#: the batch's first byte. (afunix holds at most 64 KiB of frames per batch.) A
#: peer cannot park descriptors in the receiver while other traffic flows.
BATCH_SPAN: Final = 256 * 1024
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
    """A frame broke the protocol; the descriptors it held have been closed.

    ``fds_closed`` says how many.
    """

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


def decode_header(header: bytes, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int, int]:
    """Check 8 header bytes; return ``(flags, nfds, length)`` or raise :class:`FrameError`."""
    magic, flags, nfds, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(
            f"not an afunix frame: first byte {magic:#04x}, expected {MAGIC:#04x} "
            "(is the peer speaking another protocol, or did it lose count of bytes?)"
        )
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"frame has unknown flags {flags:#04x} (a newer peer?)")
    if nfds > SCM_MAX_FD:
        raise FrameError(
            f"frame announces {nfds} descriptors, more than the {SCM_MAX_FD} one message can carry"
        )
    if flags & FLAG_MEMFD and nfds == 0:
        raise FrameError("frame says its payload is in a memfd but carries no descriptor")
    if length > max_size:
        raise FrameError(
            f"frame of {length} bytes exceeds the maximum message size of {max_size} "
            "bytes (raise max_size on the receiver if this is legitimate)",
            errno.EMSGSIZE,
        )
    return flags, nfds, length


def _fail(message: str, fds: list[int], err: int = errno.EPROTO) -> FrameError:
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
    """One seqpacket/datagram packet -> one message, or :class:`FrameError`.

    Args:
        packet: the bytes of the packet.
        fds: the descriptors that came with it (taken: closed on error).
        truncated: ``MSG_TRUNC`` was set (the packet did not fit the buffer).
    """
    owned = list(fds)
    if truncated:
        raise _fail(
            f"packet truncated (MSG_TRUNC) at {len(packet)} bytes: it is larger than "
            "the receive buffer (max_size)",
            owned,
            errno.EMSGSIZE,
        )
    if len(packet) < HEADER.size:
        raise _fail(
            f"packet of {len(packet)} bytes is shorter than the {HEADER.size}-byte header",
            owned,
        )
    try:
        flags, nfds, length = decode_header(packet[: HEADER.size], max_size)
    except FrameError as exc:
        raise _fail(exc.strerror or "bad header", owned, exc.errno or errno.EPROTO) from None
    body = 0 if flags & FLAG_MEMFD else length
    if len(packet) - HEADER.size != body:
        raise _fail(
            f"packet holds {len(packet) - HEADER.size} payload bytes but its header "
            f"announces {body}",
            owned,
        )
    if len(owned) != nfds:
        raise _fail(
            f"header announces {nfds} descriptor(s) but {len(owned)} arrived with the packet",
            owned,
        )
    return RawMessage(bytes(packet[HEADER.size :]), owned, flags, length, tag)


@dataclass(slots=True)
class _Batch:
    """Descriptors that came with the bytes at stream offsets [start, end).

    Headers take them in order from ``fds[taken:]``; ``started`` says a header
    began within [start, end), as one must for the descriptors to be legitimate.
    """

    start: int
    end: int
    fds: list[int]
    taken: int = 0
    started: bool = False

    @property
    def left(self) -> list[int]:
        return self.fds[self.taken :]


@dataclass(slots=True)
class _Tag:
    """A caller's tag for the bytes at stream offsets [start, end)."""

    start: int
    end: int
    tag: object


@dataclass(slots=True)
class _Pending:
    flags: int
    length: int
    body: int
    fds: list[int]
    tag: object


class StreamDecoder:
    """Turns a byte stream plus descriptors into messages (sans-IO, one per connection).

    Feed what each ``recvmsg`` returned with :meth:`receive_data` (``b""`` at
    end of file), then call :meth:`next_message` until it returns
    :data:`NEED_DATA` (feed more) or :data:`CLOSED` (clean end). Messages
    come out as :class:`RawMessage`, owning their descriptors.

    On a protocol violation :meth:`next_message` raises :class:`FrameError`
    after closing every descriptor the decoder holds, and keeps raising it:
    the stream cannot be resynchronised, close the connection.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE, max_fds: int = SCM_MAX_FD) -> None:
        self.max_size = max_size
        self.max_fds = max_fds
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._end = 0  # stream offset just past the last byte received
        self._batches: deque[_Batch] = deque()
        self._tags: deque[_Tag] = deque()
        self._pending: _Pending | None = None
        #: Simple frames decoded ahead by next_fast(): payloads of plain ones, the rest.
        self._ready: deque[bytes | tuple[bytes, list[int]]] = deque()
        self._eof = False
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf) + sum(
            HEADER.size + len(d if isinstance(d, bytes) else d[0]) for d in self._ready
        )

    @property
    def held_fds(self) -> int:
        """Descriptors received but not yet returned in a message."""
        n = sum(len(b.fds) - b.taken for b in self._batches)
        n += sum(len(r[1]) for r in self._ready if type(r) is tuple)
        return n + (len(self._pending.fds) if self._pending else 0)

    @property
    def eof(self) -> bool:
        return self._eof

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), tag: object = None
    ) -> None:
        """Feed the bytes and descriptors of one ``recvmsg``; ``b""`` means end of file.

        The decoder owns *fds* from now on (it closes them on error or
        :meth:`close`, or hands them out in a message). *tag*, if given, is
        handed out as :attr:`RawMessage.tag` of the message whose header
        starts in *data* (credentials of that ``recvmsg``, for instance).
        """
        if self._error is not None or self._eof:
            close_fds(fds)
            if self._error is not None:
                raise self._error
            raise RuntimeError("receive_data() after end of file")
        if not data:
            self._eof = True
            if fds:
                self._raise(
                    f"{len(fds)} descriptor(s) arrived with no data at all (impossible on "
                    "a stream socket unless the peer is not speaking this protocol)",
                    list(fds),
                )
            return
        start = self._end
        self._end += len(data)
        if (
            tag is None
            and not self._buf
            and self._pending is None
            and not self._batches
            and not self._tags
        ):
            # Nothing half-decoded, so *data* starts with a header: take the complete
            # simple frames straight from it, each with its descriptors, and buffer
            # only the rest (no copy into the buffer and out, no batch to keep).
            left = list(fds)
            used = self._decode_simple(data, left)
            self._pos += used
            if used < len(data):
                self._buf += data[used:]
            if left:  # for headers still to come: a header did start in these bytes
                self._batches.append(_Batch(self._pos, self._end, left, 0, used > 0))
            return
        self._buf += data
        if fds:
            self._batches.append(_Batch(start, self._end, list(fds)))
            # (one recvmsg brings at most SCM_MAX_FD: only a third batch can overflow)
            waiting = 0 if len(self._batches) < 3 else self.held_fds
            if waiting > 2 * SCM_MAX_FD:
                self._raise(
                    f"{waiting} descriptors arrived ahead of the headers that should claim "
                    f"them (at most {2 * SCM_MAX_FD}, two sendmsg calls' worth, may wait)"
                )
        if tag is not None:
            self._tags.append(_Tag(start, self._end, tag))

    def _decode_simple(self, data: bytes | bytearray | memoryview, fds: list[int]) -> int:
        """Queue the complete simple frames at the start of *data* (see
        :meth:`next_fast`), taking their descriptors from the front of *fds*, which
        arrived with *data*; return how many bytes they took."""
        unpack, hsize, limit, end, ready = (
            HEADER.unpack_from,
            HEADER.size,
            self.max_size,
            len(data),
            self._ready,
        )
        if end < hsize:
            return 0
        if type(data) is not bytes and end >= 128 and end >= 4 * (hsize + unpack(data)[3]):
            data = bytes(data)  # many small frames: slicing bytes is cheaper than a view
        max_fds, pos, taken = self.max_fds, 0, 0
        while end - pos >= hsize:
            magic, flags, nfds, length = unpack(data, pos)
            stop = pos + hsize + length
            if magic != MAGIC or flags or length > limit or stop > end:
                break
            if nfds:
                if nfds > max_fds or len(fds) - taken < nfds:
                    break  # next_message() explains
                ready.append(
                    (bytes(data[pos + hsize : stop]) if length else b"", fds[taken : taken + nfds])
                )
                taken += nfds
            else:
                ready.append(bytes(data[pos + hsize : stop]) if length else b"")
            pos = stop
        del fds[:taken]
        return pos

    def quiet(self) -> bool:
        """Nothing buffered, pending or held: the next message needs more data."""
        return not (
            self._ready
            or self._buf
            or self._batches
            or self._pending is not None
            or self._eof
            or self._error is not None
        )

    def next_fast(self) -> bytes | tuple[bytes, list[int]] | None:
        """Fast path: the next message if it is a complete *simple* frame, else ``None``.

        Simple: a valid header without flags (no memfd), whose descriptors, if
        it announces any, are the next ones of a batch that arrived with or
        before it, on a stream without tags. A plain frame (no descriptors)
        comes out as its payload ``bytes``, others as ``(payload, fds)``.
        All the simple frames buffered are decoded in one go (a ``recvmsg``
        of a busy stream holds hundreds). Anything else, or anything the
        rules of :meth:`next_message` might object to, returns ``None`` and
        leaves the rest to :meth:`next_message`, which decides (and reports
        any error) as usual.
        """
        ready = self._ready
        if ready:
            return ready.popleft()
        buf = self._buf
        if len(buf) < HEADER.size or self._pending is not None or self._tags:
            return None
        unpack, hsize, limit, end = HEADER.unpack_from, HEADER.size, self.max_size, len(buf)
        batches, max_fds, base = self._batches, self.max_fds, self._pos
        batch = batches[0] if batches else None
        pos = 0
        with memoryview(buf) as view:
            while end - pos >= hsize:
                magic, flags, nfds, length = unpack(view, pos)
                stop = pos + hsize + length
                if magic != MAGIC or flags or length > limit or stop > end:
                    break
                payload = bytes(view[pos + hsize : stop]) if length else b""
                if batch is None:
                    if nfds:
                        break  # no descriptors arrived for it
                    ready.append(payload)
                    pos = stop
                    continue
                # The checks of _claim(); anything unusual is left to next_message().
                at = base + pos
                if batch.start > at:
                    if nfds:
                        break  # its descriptors have not arrived
                elif at < batch.end:
                    batch.started = True
                elif (
                    not batch.started
                    or (len(batches) > 1 and batches[1].start <= at)
                    or batch.start + BATCH_SPAN <= at
                ):
                    break
                if not nfds:
                    ready.append(payload)
                    pos = stop
                    continue
                taken = batch.taken
                left = len(batch.fds) - taken
                if nfds > max_fds or left < nfds:
                    break
                if left == nfds:  # used up
                    ready.append((payload, batch.fds[taken:] if taken else batch.fds))
                    batches.popleft()
                    batch = batches[0] if batches else None
                else:
                    batch.taken = taken + nfds
                    ready.append((payload, batch.fds[taken : taken + nfds]))
                pos = stop
        if not pos:
            return None
        del buf[:pos]
        self._pos += pos
        return ready.popleft()

    def start_direct(self, minimum: int) -> int:
        """Let the caller receive a large plain payload straight into its own buffer.

        If the next message is a plain frame (no flags, no descriptors) of at
        least *minimum* payload bytes, not yet fully buffered, its header is
        consumed and its length returned: the caller then takes the buffered
        part with :meth:`take_buffered_bytes`, receives the rest itself and reports
        it with :meth:`skip`. Otherwise returns 0 and changes nothing.
        """
        buf = self._buf
        if (
            self._ready
            or self._pending is not None
            or self._batches
            or self._tags
            or len(buf) < HEADER.size
        ):
            return 0
        magic, flags, nfds, length = HEADER.unpack_from(buf)
        if (
            magic != MAGIC
            or flags
            or nfds
            or length > self.max_size
            or length < max(minimum, 1)
            or len(buf) >= HEADER.size + length
        ):
            return 0
        self._consume(HEADER.size)
        return int(length)

    def take_buffered_bytes(self) -> bytes:
        """The payload bytes already buffered (after :meth:`start_direct`): fewer than
        its length, the caller receives the rest itself."""
        data = bytes(self._buf)
        self._consume(len(data))
        return data

    def skip(self, n: int) -> None:
        """Account for *n* stream bytes the caller received itself (after :meth:`start_direct`)."""
        self._pos += n
        self._end += n

    def next_message(self) -> RawMessage | Event:
        """The next complete message, :data:`NEED_DATA` or :data:`CLOSED`."""
        if self._ready:
            item = self._ready.popleft()
            data, fds = (item, []) if isinstance(item, bytes) else item
            return RawMessage(data, fds, 0, len(data))
        if self._error is not None:
            raise self._error
        if self._pending is None:
            if len(self._buf) < HEADER.size:
                if self._eof:
                    if self._buf:
                        self._raise(
                            f"peer closed the connection mid-message, after {len(self._buf)}"
                            f" of the {HEADER.size} header bytes"
                        )
                    if self._batches:
                        self._raise(
                            f"{self.held_fds} descriptor(s) arrived that no message header "
                            "announced"
                        )
                    return CLOSED
                return NEED_DATA
            self._start_message()
        pending = self._pending
        assert pending is not None
        if len(self._buf) < pending.body:
            if self._eof:
                self._raise(
                    f"peer closed the connection mid-message, after {len(self._buf)} of "
                    f"{pending.body} payload bytes"
                )
            return NEED_DATA
        with memoryview(self._buf) as view:
            data = bytes(view[: pending.body])  # one copy, not two
        self._consume(pending.body)
        self._pending = None
        return RawMessage(data, pending.fds, pending.flags, pending.length, pending.tag)

    def close(self) -> None:
        """Close every descriptor held (the connection is going away)."""
        fds = [fd for b in self._batches for fd in b.left]
        self._batches.clear()
        fds += [fd for r in self._ready if type(r) is tuple for fd in r[1]]
        self._ready.clear()
        if self._pending is not None:
            fds += self._pending.fds
            self._pending.fds = []
        close_fds(fds)

    # -- internals ---------------------------------------------------------

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _start_message(self) -> None:
        header_at = self._pos
        try:
            flags, nfds, length = decode_header(bytes(self._buf[: HEADER.size]), self.max_size)
        except FrameError as exc:
            self._raise(exc.strerror or "bad header", err=exc.errno or errno.EPROTO)
        if nfds > self.max_fds:
            self._raise(f"frame announces {nfds} descriptors, more than max_fds={self.max_fds}")
        fds = self._claim(header_at, nfds) if self._batches or nfds else []
        while self._tags and self._tags[0].end <= header_at:
            self._tags.popleft()
        tag = self._tags[0].tag if self._tags and self._tags[0].start <= header_at else None
        self._consume(HEADER.size)
        self._pending = _Pending(flags, length, 0 if flags & FLAG_MEMFD else length, fds, tag)

    def _claim(self, header_at: int, nfds: int) -> list[int]:
        """The *nfds* descriptors of the header at stream offset *header_at* (see the
        module docstring for the rules), checking the batches it passes."""
        batches = self._batches
        if batches and batches[0].end <= header_at and not batches[0].started:
            # The sendmsg's first byte, a header, came with its descriptors.
            self._raise(
                "descriptors arrived with bytes where no message starts (the peer "
                "attached them to the middle of a message)"
            )
        if batches and (
            (len(batches) > 1 and batches[1].end <= header_at)
            or batches[0].start + BATCH_SPAN <= header_at
        ):
            # The oldest batch still holds descriptors (a used-up batch is dropped as
            # soon as it is used up), yet the next sendmsg began within the bytes of
            # the next batch, all behind this header, or its headers are long past.
            self._raise(
                f"{len(batches[0].left)} descriptor(s) arrived that no message header announced"
            )
        for each in batches:  # the one whose bytes hold this header's first byte
            if each.start > header_at:
                break
            if header_at < each.end:
                each.started = True
        batch = batches[0] if batches and batches[0].start <= header_at else None
        if not nfds:
            return []
        if batch is None:
            self._raise(
                f"header announces {nfds} descriptor(s) but none arrived with it (did "
                "the sender attach them, or did something receive without room for them?)"
            )
        left = len(batch.fds) - batch.taken
        if left < nfds:
            self._raise(f"header announces {nfds} descriptor(s) but {left} arrived with it")
        fds = batch.fds[batch.taken : batch.taken + nfds]
        batch.taken += nfds
        if batch.taken == len(batch.fds):
            batches.popleft()  # used up: nothing left to check
        return fds

    def _raise(
        self, message: str, extra: list[int] | None = None, err: int = errno.EPROTO
    ) -> NoReturn:
        held = list(extra or [])
        held += [fd for b in self._batches for fd in b.left]
        self._batches.clear()
        if self._pending is not None:
            held += self._pending.fds
            self._pending.fds = []
        self._error = _fail(message, held, err)
        self._buf.clear()
        raise self._error
