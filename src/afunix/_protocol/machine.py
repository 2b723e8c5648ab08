"""Every decision of a channel, in both directions: :class:`ChannelProtocol` (sans-IO).

In h11's shape: bytes and descriptor numbers in, values out, no socket, lock,
thread or event loop. :class:`afunix.Channel` and :class:`afunix.AsyncChannel`
are shells around one of these: they lock, wait and make the system calls of
:mod:`afunix._io`; every rule of the wire lives here once.

Sending: :meth:`ChannelProtocol.send` reads the caller's descriptors exactly
once (:func:`~afunix._cmsg.fd_numbers`, the only conversion) and answers with

* ``bytes``: one whole small plain frame, for one ``send()``;
* a :class:`Write`: one message (or a batch of held ones) for ``sendmsg()``; it
  keeps the caller's objects referenced until :meth:`~ChannelProtocol.write_done`,
  so ``fds=[open(path)]`` sends that file and never a number reused meanwhile;
* ``None``: held by ``more=True``, to go with the next ones (64 KiB or
  :data:`~afunix._cmsg.SCM_MAX_FD` descriptors per ``sendmsg``).

When :attr:`~ChannelProtocol.queued` is set after a write, more writes wait in
order behind it (:meth:`~ChannelProtocol.next_write`). A failed write goes to
:meth:`~ChannelProtocol.write_failed`: ``EMSGSIZE`` on a packet sent inline by
default gives the memfd resend (same descriptors); a stream frame cut short
makes the channel :attr:`State.BROKEN`.

Receiving: write the next ``recvmsg_into`` at :meth:`~ChannelProtocol.recv_into`,
report it with :meth:`~ChannelProtocol.received`, take :class:`Message` s from
:meth:`~ChannelProtocol.next_event` until it says
:data:`~afunix._protocol.NEED_DATA` (read again) or
:data:`~afunix._protocol.CLOSED` (the peer closed between messages).

Over a transport that carries no descriptors (``carries_fds=False``: TCP, an
``ssh://`` stream) descriptors, ``memfd=True`` and ``send_buffer`` are refused
with :class:`~afunix.UnsupportedFeature` before anything is held or queued (the
channel stays usable), ``credentials=True`` at construction; payloads of any
size go inline, and no control data is asked for on receive.
"""

from __future__ import annotations

import errno
import os
import socket as _constants  # constants only; no I/O here
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from .._cmsg import (
    MSG_CTRUNC,
    SCM_MAX_FD,
    ControlError,
    FdLike,
    Triple,
    close_fds,
    control_space,
    fd_numbers,
    fds_and_credentials,
    fds_in,
    fds_only,
)
from .._errors import AfunixError, ProtocolError, TooManyFds, UnsupportedFeature
from .._memfd import MEMFD_THRESHOLD, MemfdBuffer, SealedPayload, available, seal_bytes
from .._peer import PeerCredentials
from .decoder import StreamDecoder
from .framing import (
    CLOSED,
    DEFAULT_MAX_SIZE,
    FLAG_MEMFD,
    HEADER,
    MAGIC,
    NEED_DATA,
    Event,
    FrameError,
    RawMessage,
    decode_packet,
    encode_header,
)
from .message import Message, counted_message, plain_message
from .write import BROKEN, CLOSED_STATE, OPEN, Write

__all__ = ["HOLD_MAX", "RECV_BUFSIZE", "ChannelProtocol"]

#: Bytes asked for per stream ``recvmsg``, into one buffer kept by the channel: a
#: fresh 256 KiB ``bytes`` per call is mapped and unmapped by malloc every time,
#: which tripled the round-trip time of small messages (docs/benchmarks.md).
RECV_BUFSIZE = 256 * 1024
#: ... but the first buffer is this small, and grows to ``recv_bufsize`` once a
#: ``recvmsg`` fills it: zeroing 256 KiB costs a short-lived connection ~5 us.
RECV_FIRST = 16 * 1024
#: Plain stream messages up to this size are sent as one ``header + data`` buffer
#: with a single ``send``; larger ones as two buffers, the payload not copied.
PLAIN_MAX = 8 * 1024
#: Plain payloads from this size up are received straight into a buffer of their
#: own and handed out as a read-only memoryview of it: one copy instead of three.
DIRECT_MIN = 256 * 1024
#: The smallest receive buffer for one seqpacket/datagram message.
PACKET_MIN = 512 * 1024
#: ``send(..., more=True)`` holds plain frames until this many bytes are waiting.
HOLD_MAX = 64 * 1024

_PLAIN_TYPES = (bytes, bytearray)
_pack_header = HEADER.pack
_HEADER_SIZE = HEADER.size
_STREAM = int(_constants.SOCK_STREAM)
_SEQPACKET = int(_constants.SOCK_SEQPACKET)
_MSG_TRUNC = int(_constants.MSG_TRUNC)
_MEMFD = available()  # read once: asked per channel, it cost two hasattr calls


class ChannelProtocol:
    """The state of one channel, both directions; see the module docstring.

    One sender and one receiver may use it at the same time (the shells lock
    each side); the descriptors of received messages may be taken or closed in
    any thread (the in-flight count is kept without a lock: releases are
    appended to a deque, which only the receiver drains).

    Cheap to make, as a short connection uses little of it: slots (36 names, more than
    CPython 3.11 shares between the dicts of a class), a stream's decoder made by its
    first bytes (end of file before any is ``CLOSED`` without one).
    """

    # fmt: off
    __slots__ = (
        "_direct", "_direct_got", "_eof", "_header_next", "_in_flight", "_into", "_lean", "_queue",
        "_released", "accept_memfd", "carries_fds", "control_space", "credentials", "decoder",
        "discard_fds", "held", "held_fds", "holding", "idle", "kind", "max_fds_in_flight",
        "max_size", "maxfds", "memfd_threshold", "packet_bufsize", "plain_limit", "queued",
        "ready", "receiving", "recv_bufsize", "room", "rview", "state", "stream", "transport",
    )
    # fmt: on

    def __init__(
        self,
        kind: int,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        maxfds: int = SCM_MAX_FD,
        memfd_threshold: int | None = MEMFD_THRESHOLD,
        accept_memfd: bool = True,
        credentials: bool = False,
        max_fds_in_flight: int | None = None,
        recv_bufsize: int = RECV_BUFSIZE,
        packet_bufsize: int = PACKET_MIN,
        fd_room: int | None = None,
        discard_fds: bool = False,
        carries_fds: bool = True,
        transport: str = "this transport",
    ) -> None:
        if not 0 <= maxfds <= SCM_MAX_FD:
            raise ValueError(f"maxfds must be 0..{SCM_MAX_FD}, not {maxfds}")
        if fd_room is not None and not 0 <= fd_room <= SCM_MAX_FD:
            raise ValueError(f"fd_room must be 0..{SCM_MAX_FD} or None, not {fd_room}")
        if not carries_fds:
            if credentials:
                raise UnsupportedFeature(
                    f"cannot receive per-message credentials (credentials=True) over "
                    f"{transport}: credentials are the kernel's word about a process of "
                    "this host, and no network transport carries them; use "
                    "credentials=False (over ssh:// the far server sees the SSH login "
                    "user as its peer; on one host use a Unix socket)"
                )
            maxfds, memfd_threshold = 0, None  # a header announcing descriptors is an error
        elif not _MEMFD:
            memfd_threshold = None
        stream = kind == _STREAM
        #: ``False`` over TCP and ``ssh://``: no descriptors, memfds or credentials
        #: (refused before anything is queued); large payloads go inline.
        self.carries_fds = carries_fds
        #: The transport as error messages name it, e.g. ``TCP (tcp://10.0.0.2:7000)``.
        self.transport = transport
        self.kind = kind
        self.state = OPEN
        self.stream = stream
        self.max_size = max_size
        self.maxfds = maxfds
        self.memfd_threshold = memfd_threshold
        self.accept_memfd = accept_memfd and not discard_fds  # (a memfd closed is no payload)
        self.credentials = credentials
        self.max_fds_in_flight = max_fds_in_flight
        self.recv_bufsize = recv_bufsize
        # On a stream one sendmsg may carry the descriptors of several messages
        # (more=True): room for the kernel's most unless told (fd_room); maxfds is
        # checked per header.
        if fd_room is not None and carries_fds:
            room = fd_room
        else:
            room = SCM_MAX_FD if stream and carries_fds else maxfds
        self.room = room
        self.control_space = control_space(room, credentials)
        #: Close received descriptors at once; messages show them as -1 (already closed).
        self.discard_fds = discard_fds
        if stream:
            self.packet_bufsize = 0  # (packets only)
            #: The largest payload sent as one plain frame (-1: none, packets).
            below = PLAIN_MAX if memfd_threshold is None else memfd_threshold - 1
            self.plain_limit = min(PLAIN_MAX, max_size, below)
        else:
            self.packet_bufsize = _HEADER_SIZE + min(max_size, max(packet_bufsize, PACKET_MIN))
            self.plain_limit = -1
        #: Finished messages, in order, ahead of anything the decoder holds: a shell
        #: may pop the first without asking (plain ones come straight from the decoder).
        self.ready: deque[Message] = deque()
        #: A stream's decoder, made by its first bytes (None: none came yet, or packets).
        self.decoder: StreamDecoder | None = None
        #: Messages held by more=True, and duplicates of their descriptors (ours).
        #: (The shells append small plain frames with the core's hold_frame, then set holding.)
        self.held = bytearray()
        self.held_fds: list[int] = []
        self.holding = False
        self._queue: deque[Write] = deque()
        self.queued = False
        #: Nothing buffered, a stream without credentials or in-flight limit: the
        #: lean receive of _io may read the next message itself.
        self.idle = self._lean = (
            stream and not credentials and max_fds_in_flight is None and not discard_fds
        )
        #: A message has begun (its first bytes came): message vs idle timeout.
        self.receiving = False
        #: The kept stream receive buffer (made small on first use, see RECV_FIRST).
        self.rview: memoryview | None = None
        self._into: memoryview | None = None
        self._header_next = False
        self._direct: memoryview | None = None
        self._direct_got = 0
        self._eof = False
        #: Descriptor counts released by messages (with max_fds_in_flight only).
        self._released: deque[int] | None = None if max_fds_in_flight is None else deque()
        self._in_flight = 0

    # -- sending ---------------------------------------------------------------

    def send(
        self,
        data: bytes | bytearray | memoryview = b"",
        fds: Iterable[FdLike] = (),
        *,
        memfd: bool | None = None,
        address: Any = None,
        more: bool = False,
    ) -> bytes | Write | None:
        """One message: a whole plain frame, a :class:`Write`, or ``None`` (held)."""
        if self.state is not OPEN:
            raise self._unusable()
        refs: Sequence[FdLike] = ()
        numbers: list[int] = []
        if fds:
            # Read once; the objects stay referenced by the Write until it went.
            refs = fds if type(fds) is tuple or type(fds) is list else list(fds)
            if refs and not self.carries_fds:
                raise self._refuse(f"{len(refs)} descriptor(s)")
            numbers = fd_numbers(refs)
        if (
            memfd is None
            and address is None
            and type(data) in _PLAIN_TYPES
            and len(data) <= self.plain_limit
        ):
            frame = _pack_header(MAGIC, 0, len(numbers), len(data)) + data
            if not more and not self.holding:
                return Write([frame], numbers, refs) if numbers else frame
            return self._hold(frame, numbers, more)
        out = self._message(data, numbers, refs, memfd, address)
        if not self.holding:
            return out
        first = self.flush()
        self._queue.append(out)
        self.queued = True
        return first

    def send_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike] = (), *, address: Any = None
    ) -> Write:
        """Seal a filled memfd buffer (consumed) and send it as the payload."""
        if self.state is not OPEN:
            raise self._unusable()
        if not self.carries_fds:  # the buffer stays the caller's, unsealed
            raise self._refuse(
                "a memfd payload (send_buffer)",
                "Send bytes(buf.view[:length]) with send() instead (the buffer is still yours)",
            )
        refs = fds if type(fds) is tuple or type(fds) is list else list(fds)
        numbers = fd_numbers(refs)
        self._check_size(length, len(numbers) + 1)
        mfd = buf.seal(length)
        out = self._memfd_write(mfd, length, numbers, refs, address)
        if not self.holding:
            return out
        first = self.flush()
        assert first is not None
        self._queue.append(out)
        self.queued = True
        return first

    def flush(self) -> Write | None:
        """The held messages as one :class:`Write` (``None`` if nothing is held)."""
        if not self.holding:
            return None
        held, self.held, self.holding = self.held, bytearray(), False
        fds, self.held_fds = self.held_fds, []
        return Write([held], fds, owned=fds)

    def next_write(self) -> Write | None:
        """The next write queued behind the last one, in order."""
        queue = self._queue
        out = queue.popleft() if queue else None
        self.queued = bool(queue)
        return out

    def rest_of(self, frame: Any, sent: int, nfds: int = -1) -> Write:
        """What is left of a whole frame after ``send()`` wrote *sent* bytes of it (with
        *nfds* >= 0, *frame* is the payload of a plain frame the core's ``send_frame``
        sent part of, descriptors included)."""
        if nfds >= 0:
            frame = encode_header(len(frame), nfds) + bytes(frame)
        return Write([memoryview(frame)[sent:]], sent=sent)

    def write_done(self, out: Write) -> None:
        """*out* went (or is given up): close what the protocol made, drop the refs."""
        if out.owned:
            close_fds(out.owned)
            out.owned = ()
        out.refs = ()

    def write_failed(self, out: Write, exc: BaseException) -> Write | None:
        """*out* failed with *exc*: the memfd resend, or ``None`` (re-raise *exc*).

        ``EMSGSIZE`` on a packet sent inline by default: the same message as a
        sealed memfd, with the same descriptors. A stream frame partly sent: the
        peer's framing is lost for good, the state is :attr:`State.BROKEN`.
        """
        if (
            isinstance(exc, OSError)
            and exc.errno == errno.EMSGSIZE
            and out.inline_default
            and not out.sent
            and out.payload is not None
        ):
            payload, numbers, refs, to = out.payload, list(out.fds), out.refs, out.to
            self.write_done(out)
            try:
                self._check_size(len(payload), len(numbers) + 1)
            except TooManyFds:
                return None
            mfd = seal_bytes(payload)
            return self._memfd_write(mfd, len(payload), numbers, refs, to[0] if to else None)
        if self.stream and 0 < out.sent < out.total:
            self.state = BROKEN
        self.write_done(out)
        self._drop_queue()
        return None

    def _hold(self, frame: bytes, numbers: list[int], more: bool) -> Write | None:
        dups: list[int] = []
        try:
            for fd in numbers:  # os.dup: close-on-exec, like every afunix descriptor
                dups.append(os.dup(fd))
        except BaseException:
            close_fds(dups)
            raise
        first = None
        if len(self.held_fds) + len(dups) > SCM_MAX_FD:
            first = self.flush()  # one sendmsg carries at most SCM_MAX_FD
        self.held += frame
        self.held_fds += dups
        self.holding = True
        if len(self.held) < HOLD_MAX and len(self.held_fds) < SCM_MAX_FD and more:
            return first
        out = self.flush()
        if first is None:
            return out
        assert out is not None
        self._queue.append(out)
        self.queued = True
        return first

    def _message(
        self,
        data: bytes | bytearray | memoryview,
        numbers: list[int],
        refs: Sequence[object],
        memfd: bool | None,
        address: Any,
    ) -> Write:
        view = memoryview(data).cast("B")
        size = len(view)
        if memfd is None:
            use = self.memfd_threshold is not None and size >= self.memfd_threshold
        elif memfd and not self.carries_fds:
            raise self._refuse(
                "a memfd payload (memfd=True)", "Leave memfd unset: large payloads go inline here"
            )
        elif memfd and not available():  # pragma: no cover - not Linux
            raise UnsupportedFeature("memfd payloads need Linux memfd_create")
        else:
            use = memfd
        self._check_size(size, len(numbers) + use)
        if use:
            return self._memfd_write(seal_bytes(view), size, numbers, refs, address)
        header = encode_header(size, len(numbers))
        out = Write([header, view] if size else [header], numbers, refs)
        if address is not None:
            out.to = (address,)
        if memfd is None and not self.stream and available():
            out.inline_default = True
            out.payload = view
        return out

    def _memfd_write(
        self, mfd: int, size: int, numbers: list[int], refs: Sequence[object], address: Any
    ) -> Write:
        try:
            header = encode_header(size, len(numbers) + 1, FLAG_MEMFD)
        except BaseException:
            os.close(mfd)
            raise
        out = Write([header], [*numbers, mfd], refs, owned=[mfd])
        if address is not None:
            out.to = (address,)
        return out

    def _check_size(self, size: int, nfds: int) -> None:
        if nfds > SCM_MAX_FD:
            raise TooManyFds(nfds)
        if size > self.max_size:
            raise AfunixError(
                errno.EMSGSIZE,
                f"message of {size} bytes exceeds this channel's max_size of {self.max_size} bytes",
            )

    def _drop_queue(self) -> None:
        while self._queue:
            self.write_done(self._queue.popleft())
        self.queued = False

    # -- receiving -------------------------------------------------------------

    def recv_into(self) -> memoryview:
        """Where the next ``recvmsg_into`` writes (then call :meth:`received`)."""
        if self.state is not OPEN:
            raise self._unusable()
        if self._direct is not None:
            into = self._direct[self._direct_got :]
        elif self.stream:
            rview = self.rview
            if rview is None:  # small at first: many connections never need more
                rview = self.rview = memoryview(bytearray(min(self.recv_bufsize, RECV_FIRST)))
            into = rview[: HEADER.size] if self._header_next else rview
            self._header_next = False
        else:
            rview = self.rview
            if rview is None:
                rview = self.rview = memoryview(bytearray(self.packet_bufsize))
            into = rview
        self._into = into
        self.idle = False
        return into

    def received(self, n: int, ancdata: list[Triple], msg_flags: int, address: Any) -> None:
        """Report the ``recvmsg_into`` made at :meth:`recv_into`: *n* bytes and control data.

        Control data is checked first (an error closes every descriptor that
        came); a stream error makes the state :attr:`State.BROKEN` and is raised
        (close the channel); a bad packet is dropped and its error raised.
        """
        into, self._into = self._into, None
        if into is None:  # the lean receive of _io read into the kept buffer
            into = self.rview
        self.idle = False
        if self._direct is not None:
            self._direct_read(n, ancdata, msg_flags)
            return
        try:
            if ancdata or msg_flags & MSG_CTRUNC:
                fds, tag = self._control(ancdata, msg_flags)
            else:
                fds, tag = [], None
        except ControlError:
            if self.stream:
                self.state = BROKEN
            raise
        if fds and self.discard_fds:  # closed now; still counted against the headers
            close_fds(fds)
            fds = [-1] * len(fds)
        assert into is not None
        if not self.stream:
            self._packet(bytes(into[:n]), fds, msg_flags, address, tag)
            return
        decoder = self.decoder
        if decoder is None:
            if not n and not fds and not self._eof:
                self._eof = True  # end of file before any byte: nothing to decode
                return
            decoder = self.decoder = StreamDecoder(self.max_size, self.maxfds, done=self.ready)
            if self._eof:
                decoder.receive_data(b"")  # it saw the end of file too (and refuses more)
        try:
            decoder.receive_data(into[:n], fds, tag)
        except FrameError:
            self.state = BROKEN
            raise
        rview = self.rview
        if n == len(rview or b"") < self.recv_bufsize:  # a busy stream: full size from now on
            self.rview = memoryview(bytearray(self.recv_bufsize))

    def next_event(self) -> Message | Event:
        """The next whole message, :data:`NEED_DATA` or :data:`CLOSED`."""
        if self.ready:
            return self.ready.popleft()
        if self.state is not OPEN:
            raise self._unusable()
        decoder = self.decoder
        if decoder is None:  # packets, or a stream that brought no byte yet
            if self._eof:
                return CLOSED
            if self._lean:  # (streams only) as a quiet decoder: the lean receive may read
                self.idle = True
                self._into = None
            return NEED_DATA
        item = decoder.next_fast()  # simple frames: no memfd, no credentials
        if item is not None:
            if type(item) is tuple:
                return self._deliver(item[0], item[1], None, None, None)
            return plain_message(item) if type(item) is bytes else item  # type: ignore[return-value]
        if not decoder.quiet():
            if self._direct is None:
                length = decoder.start_direct(DIRECT_MIN)
                if length:
                    head = decoder.take_buffered_bytes()
                    view = self._direct = memoryview(bytearray(length))
                    view[: len(head)] = head
                    self._direct_got = len(head)
                    self.receiving = True
                    return NEED_DATA
            try:
                event = decoder.next_message()
            except FrameError:
                self.state = BROKEN
                raise
            if isinstance(event, RawMessage):
                return self._raw(event, None)
            if event is CLOSED:
                return CLOSED
            self.receiving = True
            return NEED_DATA
        self.receiving = self._direct is not None
        if self._lean and not self.receiving and not self._header_next:
            self.idle = True
            self._into = None  # the lean receive reads into rview itself
        return NEED_DATA

    def push_back(self, msg: Message) -> None:
        """Make *msg* the next message again (its receiver was cancelled before it ran)."""
        self.ready.appendleft(msg)
        self.idle = False

    @property
    def in_flight(self) -> int:
        """Received descriptors still held in messages (counted with ``max_fds_in_flight``)."""
        self._drain()
        return self._in_flight

    def close(self) -> int:
        """Close every descriptor the protocol holds; the state becomes CLOSED.

        Returns how many descriptors were closed.
        """
        if self.state is CLOSED_STATE:
            return 0
        self.state = CLOSED_STATE
        self.idle = False
        self.holding = False
        if self.held:
            self.held = bytearray()  # frames held by more=True die with it
        n = 0
        if self.held_fds:
            n = close_fds(self.held_fds)
            self.held_fds = []
        if self._queue:
            self._drop_queue()
        self._direct = None
        while self.ready:
            self.ready.popleft().close()
        decoder = self.decoder
        if decoder is not None and not decoder.quiet():  # quiet: it holds nothing
            decoder.close()
        return n

    # -- internals -------------------------------------------------------------

    def _unusable(self) -> OSError:
        if self.state is BROKEN:
            return AfunixError(
                errno.EPIPE, "the channel's byte stream broke (a message was cut short); close it"
            )
        return AfunixError(errno.EBADF, "the channel is closed")

    def _refuse(self, what: str, instead: str = "") -> UnsupportedFeature:
        """Refuse to send *what* here; nothing was queued, the channel stays usable."""
        return UnsupportedFeature(
            f"cannot send {what} over {self.transport}: descriptors and memfds are kernel "
            "objects of one host, and no network transport carries them; nothing was sent "
            "and the channel is still usable. "
            + (
                instead
                or "Send the data they give access to as bytes instead, or use a Unix "
                "socket between processes of one host"
            )
        )

    def _control(
        self, ancdata: list[Triple], msg_flags: int
    ) -> tuple[list[int], PeerCredentials | None]:
        if not self.credentials:
            return fds_only(ancdata, msg_flags, room=self.room), None
        return fds_and_credentials(ancdata, msg_flags, self.room)

    def _packet(
        self, data: bytes, fds: list[int], msg_flags: int, address: Any, tag: object
    ) -> None:
        if not data and not fds and self.kind == _SEQPACKET:  # end of file
            self._eof = True
            return
        truncated = bool(msg_flags & _MSG_TRUNC)
        raw = decode_packet(data, fds, truncated=truncated, max_size=self.max_size, tag=tag)
        self.ready.append(self._raw(raw, address))

    def _direct_read(self, n: int, ancdata: list[Triple], msg_flags: int) -> None:
        view = self._direct
        assert view is not None
        if ancdata or msg_flags & MSG_CTRUNC or not n:
            self.state = BROKEN
            close_fds(fds_in(ancdata))
            if n:
                raise FrameError("descriptors arrived in the middle of a message's payload")
            raise FrameError(
                f"peer closed the connection mid-message, after {self._direct_got} of "
                f"{len(view)} payload bytes"
            )
        self._direct_got += n
        if self._direct_got < len(view):
            return
        assert self.decoder is not None
        self.decoder.skip(len(view))
        self._direct = None
        # On a frame boundary with nothing buffered: if large messages keep coming,
        # reading just the next header lets its payload land in place too.
        self._header_next = True
        self.ready.append(Message(view.toreadonly()))

    def _raw(self, raw: RawMessage, address: Any) -> Message:
        fds = raw.fds
        creds = raw.tag if isinstance(raw.tag, PeerCredentials) else None
        if not raw.memfd:
            return self._deliver(raw.data, fds, address, creds, None)
        if not self.accept_memfd:
            n = close_fds(fds)
            raise ProtocolError(
                f"the peer sent a memfd payload of {raw.length} bytes, which this channel "
                f"does not accept (accept_memfd=False); its {n} descriptor(s) were closed",
                errno.EINVAL,
            )
        try:
            payload = SealedPayload(fds.pop(), raw.length)
        except BaseException:
            close_fds(fds)
            raise
        return self._deliver(payload.view, fds, address, creds, payload)

    def _deliver(
        self,
        data: bytes | memoryview,
        fds: list[int],
        address: Any,
        creds: PeerCredentials | None,
        payload: SealedPayload | None,
    ) -> Message:
        limit = self.max_fds_in_flight
        if limit is None or not fds:
            return Message(data, fds, address=address, credentials=creds, payload=payload)
        self._drain()
        held = self._in_flight
        if held + len(fds) > limit:
            close_fds(fds)
            if payload is not None:
                payload.close()
            raise ProtocolError(
                f"the peer sent {len(fds)} more descriptor(s) while {held} it sent "
                f"earlier are still open here; at most {limit} may be in flight per "
                "connection (close or take messages' descriptors sooner, or raise "
                "max_fds_in_flight)",
                errno.ETOOMANYREFS,
            )
        self._in_flight = held + len(fds)
        assert self._released is not None  # (made with the limit)
        return counted_message(
            data,
            fds,
            self._released.append,
            address=address,
            credentials=creds,
            payload=payload,
        )

    def _drain(self) -> None:
        released = self._released
        while released:  # (None without a limit)
            self._in_flight -= released.popleft()
