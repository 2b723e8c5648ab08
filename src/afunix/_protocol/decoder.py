"""Stream decoding (sans-IO): a byte stream plus descriptors in, messages out.

Batches. A sender may write several whole frames with one ``sendmsg`` and
attach the descriptors of all of them, in order, to that one ``sendmsg`` (at
most 253, ``SCM_MAX_FD``): one system call instead of one per message. A
``sendmsg`` always starts on a frame boundary, so its descriptors ride on the
first byte of a header, as for a single message.

Over a byte stream the kernel delivers the descriptors of a ``sendmsg`` with
the ``recvmsg`` that returns its first byte, and the rest of its bytes may
come with later ``recvmsg`` calls. :class:`StreamDecoder` therefore queues
descriptors in arrival order, one *batch* per ``recvmsg`` that brought some,
and gives each header, in stream order, the ``nfds`` it announces from the
oldest batch. :meth:`StreamDecoder._claim` is the only place that hands
descriptors out, and it holds every rule:

* the batch arrived with (or before) the header's bytes, never after;
* a header starts in the bytes that came with the batch (descriptors
  attached to the middle of a payload are an error);
* a batch is used up by the time the bytes that came with the next batch
  have all gone by (its ``sendmsg`` ended before the next one began), and
  nothing is left over at end of file;
* the headers that take a batch's descriptors start within
  :data:`BATCH_SPAN` (256 KiB) of the end of the batch's bytes. (Not of its
  first byte: Linux ends a ``recvmsg`` with the part of a ``sendmsg`` that
  carries descriptors, so that ``sendmsg`` may begin late in a long read.)

One more limit holds when descriptors arrive: no more than two batches' worth
(``2 * SCM_MAX_FD``) wait for their headers. A peer cannot park descriptors
in the receiver.

A frame that is malformed (bad magic, unknown flag), oversized (``length``
above the configured maximum) or whose descriptors do not match its header
raises :class:`~afunix._protocol.framing.FrameError` when the decoder reaches
it, after the messages before it. Before raising, the decoder closes every
descriptor it holds; the caller should then close the connection.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, TypeAlias

from .._cmsg import SCM_MAX_FD, close_fds
from .._core import ccore
from .framing import (
    CLOSED,
    DEFAULT_MAX_SIZE,
    FLAG_MEMFD,
    HEADER,
    NEED_DATA,
    PLAIN_WORD,
    WORDS,
    Event,
    FrameError,
    RawMessage,
    frame_error,
    header_problem,
)
from .message import Message, scan_plain

#: The headers that take a batch's descriptors start within this many bytes of the
#: end of the batch's bytes. (afunix holds at most 64 KiB of frames per batch.) A
#: peer cannot park descriptors in the receiver while other traffic flows.
BATCH_SPAN: Final = 256 * 1024

#: Builds each message :meth:`StreamDecoder.next_message` returns, from
#: ``(data, fds, flags, length, tag)``; :class:`RawMessage` by default.
MessageFactory: TypeAlias = Callable[[bytes, list[int], int, int, object], RawMessage]

#: A batch: ``[start, end, fds, taken, started]``, the descriptors that came with
#: the stream bytes ``[start, end)``, how many of them headers took, and whether a
#: header began in those bytes. A list: one is made per ``recvmsg`` with descriptors.
_Batch: TypeAlias = list[Any]
_START, _END, _FDS, _TAKEN, _STARTED = 0, 1, 2, 3, 4


#: Stands for "no batch" in _claim(): it starts after every header.
_NO_BATCH: Final[_Batch] = [1 << 62, 1 << 62, [], 0, False]


class _Refused(Exception):
    """:meth:`StreamDecoder._claim` refuses a header; the message says why."""


#: A simple frame, decoded ahead: a plain one as a :class:`Message` (made by
#: :func:`~afunix._protocol.message.scan_plain`) or its payload, else ``(payload, fds)``.
Simple: TypeAlias = Message | bytes | tuple[bytes, list[int]]

#: Many small frames in a view: decode them from a copy (slicing ``bytes`` is cheaper
#: than slicing a view in Python); the compiled core reads the view in place.
_COPY_RUNS = ccore is None


class StreamDecoder:
    """Turns a byte stream plus descriptors into messages (sans-IO, one per connection).

    Feed what each ``recvmsg`` returned with :meth:`receive_data` (``b""`` at
    end of file), then call :meth:`next_message` until it returns
    :data:`NEED_DATA` (feed more) or :data:`CLOSED` (clean end). Messages
    come out as built by *factory* (:class:`RawMessage`), owning their
    descriptors. :meth:`next_fast` is the fast path for simple frames.

    On a protocol violation :meth:`next_message` raises :class:`FrameError`
    after closing every descriptor the decoder holds, and keeps raising it:
    the stream cannot be resynchronised, close the connection.
    """

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        max_fds: int = SCM_MAX_FD,
        *,
        factory: MessageFactory = RawMessage,
        done: deque[Any] | None = None,
    ) -> None:
        self.max_size = max_size
        #: Where plain messages go when nothing is queued before them (their owner's
        #: queue of finished messages); ``None``: the decoder's own queue.
        self._done = done
        self.max_fds = max_fds
        self._high = PLAIN_WORD | min(max_fds, SCM_MAX_FD)  # the highest simple first word
        self._make = factory
        self._buf = bytearray()  # bytes received, not yet decoded
        self._pos = 0  # stream offset of _buf[0]
        self._end = 0  # stream offset just past the last byte received
        self._batches: deque[_Batch] = deque()
        self._tags: deque[tuple[int, int, object]] = deque()  # (start, end, tag)
        #: Simple frames decoded ahead, in order (see next_fast()).
        self._ready: deque[Simple] = deque()
        #: (offset, payload length) of the last plain frame found incomplete.
        self._direct = (-1, 0)
        self._eof = False
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf) + sum(
            HEADER.size + len(d if type(d) is not tuple else d[0]) for d in self._ready
        )

    @property
    def held_fds(self) -> int:
        """Descriptors received but not yet returned in a message."""
        n: int = sum(len(b[_FDS]) - b[_TAKEN] for b in self._batches)
        return n + sum(len(r[1]) for r in self._ready if type(r) is tuple)

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
        Every simple frame that *data* completes is decoded at once, so
        *data* may be reused as soon as this returns.
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
        end = self._end = start + len(data)
        if fds:
            batches = self._batches
            batches.append([start, end, list(fds), 0, False])
            # (one recvmsg brings at most SCM_MAX_FD: only a third batch can overflow)
            if len(batches) > 2 and (waiting := self.held_fds) > 2 * SCM_MAX_FD:
                self._raise(
                    f"{waiting} descriptors arrived ahead of the headers that should claim "
                    f"them (at most {2 * SCM_MAX_FD}, two sendmsg calls' worth, may wait)"
                )
        if tag is not None:
            self._tags.append((start, end, tag))
        self._scan(data, False)

    def quiet(self) -> bool:
        """Nothing buffered or held: the next message needs more data."""
        return not (
            self._ready or self._buf or self._batches or self._eof or self._error is not None
        )

    def next_fast(self) -> Simple | None:
        """Fast path: the next message if it is a *simple* frame, else ``None``.

        Simple: a valid header without flags (no memfd), on a stream without
        tags, whose descriptors, if it announces any, passed :meth:`_claim`.
        A plain frame (no descriptors) comes out as its payload ``bytes``,
        others as ``(payload, fds)``. :meth:`receive_data` decodes every
        simple frame it completes, in one pass over the bytes of a
        ``recvmsg`` (a busy stream brings hundreds). ``None`` leaves the
        rest to :meth:`next_message`, which decides (and reports any error)
        as usual.
        """
        ready = self._ready
        return ready.popleft() if ready else None

    def start_direct(self, minimum: int) -> int:
        """Let the caller receive a large plain payload straight into its own buffer.

        If the next message is a plain frame (no flags, no descriptors) of at
        least *minimum* payload bytes, not yet fully buffered, its header is
        consumed and its length returned: the caller then takes the buffered
        part with :meth:`take_buffered_bytes`, receives the rest itself and reports
        it with :meth:`skip`. Otherwise returns 0 and changes nothing.
        """
        at, length = self._direct  # checked by _scan(): the frame _buf begins with?
        if at != self._pos or length < max(minimum, 1) or self._ready or self._batches:
            return 0
        self._consume(HEADER.size)
        return length

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
        ready = self._ready
        if not ready:
            if self._error is not None:
                raise self._error
            if self._buf and (got := self._scan(b"", True)) is not None:
                return got
            if not ready:
                return self._at_end() if self._eof else NEED_DATA
        item = ready.popleft()
        if isinstance(item, tuple):
            data, fds = item
            return self._make(data, fds, 0, len(data), None)
        data = item if isinstance(item, bytes) else bytes(item.data)
        return self._make(data, [], 0, len(data), None)

    def close(self) -> None:
        """Close every descriptor held (the connection is going away)."""
        fds = [fd for b in self._batches for fd in b[_FDS][b[_TAKEN] :]]
        self._batches.clear()
        fds += [fd for r in self._ready if type(r) is tuple for fd in r[1]]
        self._ready.clear()
        close_fds(fds)

    # -- internals ---------------------------------------------------------

    def _scan(self, data: bytes | bytearray | memoryview, full: bool) -> RawMessage | None:
        """The decoding loop: decode the frames at the start of the undecoded bytes.

        *data*, new bytes, are appended (or, with nothing buffered, decoded in
        place and only their rest kept). Simple frames are queued for
        :meth:`next_fast`. The loop stops at an incomplete frame, or at any
        other frame unless *full* and nothing is queued: then that one frame is
        decoded (returned) or its error raised. So errors and unusual frames
        wait, in stream order, for :meth:`next_message`.
        """
        buf = self._buf
        view = None
        src: bytes | bytearray | memoryview
        if buf:
            buf += data
            src = view = memoryview(buf)
        elif (
            _COPY_RUNS
            and type(data) is not bytes
            and len(data) >= 128
            and len(data) >= 4 * (HEADER.size + WORDS.unpack_from(data)[1])
        ):
            src = bytes(data)  # many small frames: slicing bytes is cheaper than a view
        else:
            src = data
        unpack, limit, end, pos, base = WORDS.unpack_from, self.max_size, len(src), 0, self._pos
        ready, batches, tags, low, size = self._ready, self._batches, self._tags, PLAIN_WORD, 8
        high = -1 if tags else self._high  # a tagged stream has no simple frames
        got: RawMessage | None = None
        problem: tuple[str, int] | None = None
        try:
            while end - pos >= size:
                word, length = unpack(src, pos)
                if low <= word <= high and length <= limit:  # the header test: simple and valid
                    stop = pos + size + length
                    if stop > end:
                        if word == low:
                            self._direct = (base + pos, length)
                        break
                    if word == low and not batches:  # a run of plain frames: the core's loop
                        made: list[Message] = []
                        pos = scan_plain(src, pos, limit, made)
                        (ready if ready or self._done is None else self._done).extend(made)
                        continue
                    payload = bytes(src[pos + size : stop]) if length else b""
                    if word == low:
                        if batches:
                            self._claim(base + pos, 0)  # the batch rules, as the header passes
                        ready.append(payload)
                    else:
                        ready.append((payload, self._claim(base + pos, word - low)))
                    pos = stop
                    continue
                if not full or ready:  # next_message() will come to it
                    break
                flags, nfds = word >> 16 & 0xFF, word & 0xFFFF
                problem = header_problem(word, length, limit, self.max_fds)
                stop = pos + size + (0 if flags & FLAG_MEMFD else length)
                if problem is not None or stop > end:
                    break
                at = base + pos
                fds = self._claim(at, nfds) if nfds or batches else []
                while tags and tags[0][1] <= at:
                    tags.popleft()
                tag = tags[0][2] if tags and tags[0][0] <= at else None
                got = self._make(bytes(src[pos + size : stop]), fds, flags, length, tag)
                full = False  # one such frame per call
                pos = stop
        except _Refused as refused:
            if full and not ready:  # its turn has come
                problem = str(refused), errno.EPROTO
        finally:
            if view is not None:
                view.release()
        if view is not None:
            del buf[:pos]
        elif pos < end:
            buf += src[pos:]
        self._pos = base + pos
        if problem is not None:
            self._raise(problem[0], err=problem[1])
        return got

    def _claim(self, at: int, nfds: int) -> list[int]:
        """The *nfds* descriptors of the header at stream offset *at*, or :class:`_Refused`.

        Every header passes here while batches wait, so that each batch rule
        (module docstring) is checked as headers go by; a header that
        announces descriptors always does. A refusal changes nothing but
        ``started``, so a header may be checked again.
        """
        batches = self._batches
        first = batches[0] if batches else _NO_BATCH
        start, end, fds, taken, started = first
        if at < start:  # none came with or before this header
            if nfds:
                raise _Refused(
                    f"header announces {nfds} descriptor(s) but none arrived with it (did the "
                    "sender attach them, or did something receive without room for them?)"
                )
            return []
        if at < end:  # the header starts in the oldest batch's bytes
            if not started:
                first[_STARTED] = True
        elif not started:  # a sendmsg's first byte, a header, came with its descriptors
            raise _Refused(
                "descriptors arrived with bytes where no message starts (the peer "
                "attached them to the middle of a message)"
            )
        elif at - end >= BATCH_SPAN or (len(batches) > 1 and batches[1][_END] <= at):
            # The oldest batch still holds descriptors (a used-up batch is dropped), yet
            # its headers are long past, or the next sendmsg began within the bytes of
            # the next batch, all behind this header.
            raise _Refused(self._unclaimed(first))
        elif len(batches) > 1 and batches[1][_START] <= at:
            batches[1][_STARTED] = True  # the header starts in the next batch's bytes
        if not nfds:
            return []
        left = len(fds) - taken
        if left > nfds:
            first[_TAKEN] = taken + nfds
            return fds[taken : taken + nfds]  # type: ignore[no-any-return]
        if left < nfds:
            raise _Refused(f"header announces {nfds} descriptor(s) but {left} arrived with it")
        batches.popleft()  # used up: nothing left to check
        return fds[taken:] if taken else fds  # type: ignore[no-any-return]

    @staticmethod
    def _unclaimed(batch: _Batch) -> str:
        left = len(batch[_FDS]) - batch[_TAKEN]
        return f"{left} descriptor(s) arrived that no message header announced"

    def _at_end(self) -> Event:
        """End of file and nothing more to decode: :data:`CLOSED`, unless a message or
        descriptors were cut off."""
        buf = self._buf
        if len(buf) >= HEADER.size:
            self._raise(
                f"peer closed the connection mid-message, after {len(buf) - HEADER.size} of "
                f"{WORDS.unpack_from(buf)[1]} payload bytes"
            )
        if buf:
            self._raise(
                f"peer closed the connection mid-message, after {len(buf)} of the "
                f"{HEADER.size} header bytes"
            )
        if self._batches:
            self._raise(f"{self.held_fds} descriptor(s) arrived that no message header announced")
        return CLOSED

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _raise(
        self, message: str, extra: list[int] | None = None, err: int = errno.EPROTO
    ) -> NoReturn:
        held = list(extra or [])
        held += [fd for b in self._batches for fd in b[_FDS][b[_TAKEN] :]]
        self._batches.clear()
        self._error = frame_error(message, held, err)
        self._buf.clear()
        raise self._error
