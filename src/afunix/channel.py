"""Message channels that carry descriptors: :class:`Channel` and :class:`Message` (UNP 15.7).

A channel sends *messages* (bytes plus descriptors) over a Unix-domain
socket of any type, with the same semantics on each::

    import afunix

    a, b = afunix.Channel.pair()              # or Channel.connect(path), Listener.accept()
    with open("/etc/hostname", "rb") as f:
        a.send(b"here is a file", fds=[f])    # ints, files and sockets
    with b.recv() as msg:                     # a Message owns its descriptors
        f2 = msg.take_file(0)                 # take what you keep...
    ...                                       # ...the rest is closed on exit

* stream: messages are framed (:mod:`afunix._protocol`), each message's
  descriptors travel with its header's first byte and are counted
  (``send(..., more=True)`` writes several messages and all their
  descriptors with one ``sendmsg``; each message still gets exactly its own);
* seqpacket and datagram: one packet is one message;
* payloads of :data:`~afunix._memfd.MEMFD_THRESHOLD` bytes or more (or
  with ``memfd=True``) travel as a sealed ``memfd`` mapped read-only by the
  receiver (:attr:`Message.data` is then a read-only ``memoryview``).

Errors. A malformed frame, or descriptors that do not match the header, is
a :class:`~afunix.ProtocolError`: on a stream the channel is closed (the
byte stream cannot be trusted any more), on packet sockets only that packet
is dropped; either way every descriptor that came with it is closed. A
message whose control data was truncated (``MSG_CTRUNC``: the receiver had
less room than the sender sent) raises :class:`~afunix.ControlTruncated`.
``recv`` raises :class:`EOFError` when the peer closed between messages.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Literal

from ._address import AddressLike
from ._cmsg import (
    SCM_MAX_FD,
    ControlError,
    Credentials,
    FdLike,
    close_fds,
    control_space,
    fd_numbers,
    fds_in,
    fds_only,
    rights,
)
from ._creds import PeerCredentials, message_credentials
from ._errors import AfunixError, ProtocolError, TooManyFds, UnsupportedFeature
from ._fds import Outgoing, recvmsg_items
from ._memfd import MEMFD_THRESHOLD, MemfdBuffer, SealedPayload, available, seal_bytes
from ._platform import NOSIGNAL
from ._protocol import (
    CLOSED,
    DEFAULT_MAX_SIZE,
    FLAG_MEMFD,
    HEADER,
    MAGIC,
    NEED_DATA,
    FrameError,
    RawMessage,
    StreamDecoder,
    decode_packet,
    encode_header,
)
from ._sockets import SocketTypeLike, connect, listen, pair, socket_type, type_name

__all__ = ["Channel", "Listener", "Message"]

#: Bytes asked for per stream ``recvmsg``. The stream fast path receives into one
#: buffer of this size kept by the channel (``recvmsg_into``): a fresh 256 KiB
#: ``bytes`` per call is mapped and unmapped by malloc every time, which tripled the
#: round-trip time of small messages (``afunix bench``, docs/benchmarks.md).
_RECV_BUFSIZE = 256 * 1024
#: ... but the first buffer is this small, and grows to ``recv_bufsize`` once a
#: ``recvmsg`` fills it: zeroing 256 KiB costs a short-lived connection ~5 us.
_RECV_FIRST = 16 * 1024
#: Plain stream messages up to this size are sent as one ``header + data`` buffer
#: with a single ``send`` (the fast path); larger ones use ``sendmsg`` with two buffers.
_PLAIN_MAX = 8 * 1024
_PLAIN_TYPES = (bytes, bytearray)


def _kept(fds: Iterable[FdLike]) -> list[FdLike] | tuple[FdLike, ...]:
    """*fds* read once: a list or tuple as it is, any other iterable as a new list.

    A send keeps what this returns referenced until the ``sendmsg`` that carries
    the descriptors has returned (through a memfd resend too): the caller's
    ``fds=[open(path)]`` may be the only reference to that file, and a file
    object collected before the ``sendmsg`` closes its descriptor, whose number
    another thread may already have reused for a file of its own.
    """
    if type(fds) is tuple or type(fds) is list:
        return fds
    return list(fds)


_pack_header = HEADER.pack
#: Plain payloads from this size up are received straight into a buffer of their
#: own (``recvmsg_into``) and handed out as a read-only memoryview of it: one copy
#: from the kernel instead of three.
_DIRECT_MIN = 256 * 1024
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
#: The smallest receive buffer for one seqpacket/datagram message.
_PACKET_MIN = 512 * 1024
#: ``send(..., more=True)`` holds plain frames until this many bytes are waiting.
_HOLD_MAX = 64 * 1024


class _Fds(list[int]):
    """A message's descriptor numbers, ``-1`` once taken or closed.

    It is what makes a forgotten message safe: garbage-collected with
    descriptors still open (its message was never closed), it closes them
    and says so with a :class:`ResourceWarning`. Only messages that carry
    descriptors have one, so a plain message costs no finalizer.
    """

    #: Told how many descriptors left the message (taken or closed), so that the
    #: channel can count the ones still in flight on its side (set per instance;
    #: no ``__init__``: building one is then as cheap as building a list).
    release: Callable[[int], None] | None = None

    def drop(self) -> list[int]:
        """Mark every open descriptor gone; return them (the caller takes or closes them)."""
        open_fds = [fd for fd in self if fd >= 0]
        if open_fds:
            self[:] = [-1] * len(self)
            if self.release is not None:
                self.release(len(open_fds))
        return open_fds

    def __del__(self) -> None:
        if self and max(self) >= 0:
            n = close_fds(self.drop())
            warnings.warn(
                f"afunix.Message garbage-collected with {n} descriptor(s) not taken; they "
                "were closed (use 'with channel.recv() as msg:' or msg.close())",
                ResourceWarning,
                stacklevel=1,
            )


class Message:
    """A received message: ``data`` plus the descriptors that came with it.

    The message *owns* its descriptors. Take the ones you keep with
    :meth:`take_fd`, :meth:`take_fds`, :meth:`take_file` or
    :meth:`take_socket` (they are then yours to close); :meth:`close` (or
    leaving the ``with`` block) closes every descriptor not taken and
    releases a memfd payload's mapping. :attr:`fds` lists the ones still
    held, by position; a taken one shows as ``-1``.
    """

    __slots__ = ("_fds", "_payload", "address", "credentials", "data")

    def __init__(
        self,
        data: bytes | memoryview,
        fds: Iterable[int] = (),
        *,
        address: Any = None,
        credentials: PeerCredentials | None = None,
        payload: SealedPayload | None = None,
    ) -> None:
        #: The payload: ``bytes``, or a read-only ``memoryview`` of a memfd payload
        #: (mapped, valid until the message is closed) or of a stream payload of
        #: 256 KiB or more (received in place, no extra copy).
        self.data = data
        #: The sender's address (datagram sockets), else ``None``.
        self.address = address
        #: The sender's :class:`~afunix.PeerCredentials` (``SCM_CREDENTIALS``: pid and
        #: real uid/gid at send time), on channels opened with ``credentials=True``.
        self.credentials = credentials
        self._fds: list[int] = _Fds(fds) if fds else []
        self._payload = payload

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptor numbers, in the order sent (``-1`` where already taken)."""
        return tuple(self._fds)

    def __len__(self) -> int:
        return len(self.data)

    def _take(self, index: int) -> int:
        try:
            fd = self._fds[index]
        except IndexError:
            raise IndexError(
                f"message has {len(self._fds)} descriptor(s), no index {index}"
            ) from None
        if fd < 0:
            raise ValueError(f"descriptor {index} was already taken or the message is closed")
        self._fds[index] = -1
        self._released(1)
        return fd

    def take_fd(self, index: int = 0) -> int:
        """Take descriptor *index*: it is yours now (close it with ``os.close``)."""
        fds = self._fds
        if 0 <= index < len(fds) and (fd := fds[index]) >= 0:  # the hot path, inline
            fds[index] = -1
            if isinstance(fds, _Fds) and fds.release is not None:
                fds.release(1)
            return fd
        return self._take(index)  # explains the error

    def take_fds(self) -> list[int]:
        """Take every descriptor not taken yet."""
        fds = self._fds
        return fds.drop() if isinstance(fds, _Fds) else []

    def _released(self, n: int) -> None:
        fds = self._fds
        if isinstance(fds, _Fds) and fds.release is not None:
            fds.release(n)

    def take_file(self, index: int = 0, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Take descriptor *index* as a file object (``os.fdopen``), which you close."""
        fd = self._take(index)
        try:
            return os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            raise

    def take_socket(self, index: int = 0) -> socket.socket:
        """Take descriptor *index* as a :class:`socket.socket` (family/type detected)."""
        fd = self._take(index)
        try:
            return socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def closed(self) -> bool:
        return all(fd < 0 for fd in self._fds) and self._payload is None

    def close(self) -> None:
        """Close every descriptor not taken and release a memfd payload."""
        fds = self._fds
        if isinstance(fds, _Fds):
            close_fds(fds.drop())
        payload, self._payload = self._payload, None
        if payload is not None:
            self.data = b""
            payload.close()

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "memfd " if self._payload is not None else ""
        return f"<afunix.Message {kind}{len(self.data)} bytes, fds={self._fds}>"


# socket.socket's ``family`` and ``type`` properties build an enum member on every
# read (0.4 us each, four per accepted connection); the C attributes under them
# are the same numbers as plain ints.
_family_of: Callable[[socket.socket], int] = _socket.socket.family.__get__
_type_of: Callable[[socket.socket], int] = _socket.socket.type.__get__
_SOCKET_KINDS = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
#: The C ``accept`` under ``socket.accept()``, which would read the listener's
#: family and type again (two enum conversions) for every connection.
_accept: Callable[[socket.socket], tuple[int, Any]] = _socket.socket._accept  # type: ignore[attr-defined]


def _check_socket(sock: socket.socket) -> int:
    try:
        family, kind = _family_of(sock), _type_of(sock)
    except TypeError:  # not built on the C socket type: ask it the ordinary way
        family, kind = sock.family, int(sock.type)
    if family != socket.AF_UNIX:
        raise UnsupportedFeature(
            "descriptor passing needs an AF_UNIX socket; this one is "
            f"{socket.AddressFamily(family).name}"
        )
    if kind not in _SOCKET_KINDS:
        raise UnsupportedFeature(f"unsupported socket type {kind}")
    return kind


class _Core:
    """What sync and asyncio channels share: framing state, send preparation, receive step."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_size: int,
        maxfds: int,
        memfd_threshold: int | None,
        recv_bufsize: int,
        credentials: bool,
        max_fds_in_flight: int | None = None,
    ) -> None:
        self.kind = _check_socket(sock)
        #: At most this many received descriptors may sit in messages not yet
        #: closed or taken (``None``: no limit); see :meth:`message`.
        self.max_fds_in_flight = max_fds_in_flight
        self.in_flight = 0
        self._flight_lock = threading.Lock()
        if not 0 <= maxfds <= SCM_MAX_FD:
            raise ValueError(f"maxfds must be 0..{SCM_MAX_FD}, not {maxfds}")
        self.sock = sock
        self.max_size = max_size
        self.maxfds = maxfds
        self.memfd_threshold = memfd_threshold if available() else None
        self.recv_bufsize = recv_bufsize
        self.credentials = credentials
        self.stream = self.kind == socket.SOCK_STREAM
        #: Descriptors one recvmsg makes room for. On a stream one sendmsg may carry the
        #: descriptors of several messages (``send(..., more=True)``), so always the
        #: kernel's most; ``maxfds`` is then checked per message, on its header.
        self.room = SCM_MAX_FD if self.stream else maxfds
        self.control = control_space(self.room, credentials)
        #: Read only a header next (set after a large payload was received in place).
        self.header_next = False
        #: The stream fast path's receive buffer (see _RECV_BUFSIZE), made on first use.
        self.rview: memoryview | None = None
        if credentials:
            passcred = getattr(socket, "SO_PASSCRED", None)
            if passcred is None:  # pragma: no cover - not Linux
                raise UnsupportedFeature("per-message credentials (SO_PASSCRED) need Linux")
            sock.setsockopt(socket.SOL_SOCKET, passcred, 1)
        self.decoder = StreamDecoder(max_size, maxfds) if self.stream else None
        if not self.stream:
            # A packet cannot be bigger than its sender's send buffer (at most
            # net.core.wmem_max, 208 KiB by default); bigger payloads go as memfds.
            room = max(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                _PACKET_MIN,
            )
            self.packet_bufsize = HEADER.size + min(max_size, room)
        #: Largest payload :meth:`plain_frame` takes (-1: none, not a stream).
        self.plain_limit = -1
        if self.stream:
            below_memfd = _PLAIN_MAX if self.memfd_threshold is None else self.memfd_threshold - 1
            self.plain_limit = min(_PLAIN_MAX, max_size, below_memfd)
        self.closed = False
        #: Small frames held by ``send(..., more=True)``, written together by ``take_held``,
        #: and duplicates of their descriptors (ours: closed once sent or dropped).
        self.held: list[bytes] = []
        self.held_size = 0
        self.held_fds: list[int] = []
        #: Called before the socket closes (the asyncio channel wakes its waiters).
        self.on_close: Callable[[], None] | None = None

    # -- sending -------------------------------------------------------------

    def plain_frame(self, data: bytes | bytearray | memoryview, nfds: int = 0) -> bytes | None:
        """Fast path: header + payload as one buffer for a small inline message on an
        open stream (*nfds* descriptors go with it), else ``None`` (use :meth:`outgoing`)."""
        if type(data) in _PLAIN_TYPES and len(data) <= self.plain_limit and not self.closed:
            return _pack_header(MAGIC, 0, nfds, len(data)) + data
        return None

    def plain_header(self, data: bytes | bytearray) -> bytes | None:
        """The header of a larger message sent as ``sendmsg([header, data])`` without
        copying the payload, or ``None`` (use :meth:`outgoing`)."""
        if (
            self.stream
            and not self.closed
            and len(data) <= self.max_size
            and (self.memfd_threshold is None or len(data) < self.memfd_threshold)
        ):
            return _pack_header(MAGIC, 0, 0, len(data))
        return None

    def room_for(self, nfds: int) -> bool:
        """Can a frame with *nfds* descriptors join the held ones (one ``sendmsg``
        carries at most ``SCM_MAX_FD``)?"""
        return len(self.held_fds) + nfds <= SCM_MAX_FD

    def hold(self, frame: bytes, fds: list[int] | None = None) -> bool:
        """Keep *frame* to write with the next ones; ``True`` once enough is waiting.

        The frame's descriptors (*fds*, see :meth:`room_for`) are duplicated:
        the caller may close its own at once, as after any ``send``.
        """
        if fds:  # os.dup: close-on-exec, like every afunix descriptor
            if len(fds) == 1:
                self.held_fds.append(os.dup(fds[0]))
            else:
                dups: list[int] = []
                try:
                    for fd in fds:
                        dups.append(os.dup(fd))
                except BaseException:
                    close_fds(dups)
                    raise
                self.held_fds += dups
        self.held.append(frame)
        self.held_size += len(frame)
        return self.held_size >= _HOLD_MAX or len(self.held_fds) >= SCM_MAX_FD

    def take_held(self) -> tuple[bytes, list[int]]:
        """All held frames as one buffer (one ``sendmsg`` instead of one each) and the
        descriptors to attach to it, which the caller closes once sent."""
        held, self.held, self.held_size = self.held, [], 0
        fds, self.held_fds = self.held_fds, []
        return (held[0] if len(held) == 1 else b"".join(held)), fds

    def use_memfd(self, size: int, memfd: bool | None) -> bool:
        if memfd is None:
            return self.memfd_threshold is not None and size >= self.memfd_threshold
        if memfd and not available():  # pragma: no cover - not Linux
            raise UnsupportedFeature("memfd payloads need Linux memfd_create")
        return memfd

    def outgoing(
        self,
        data: bytes | bytearray | memoryview,
        fds: Iterable[FdLike],
        memfd: bool,
        address: Any,
    ) -> tuple[Outgoing, int | None]:
        """The message to send, and the memfd we created for it (close it after sending)."""
        if self.closed:
            raise AfunixError(errno.EBADF, "the channel is closed")
        numbers = fd_numbers(fds)
        view = memoryview(data).cast("B")
        size = len(view)
        if len(numbers) + memfd > SCM_MAX_FD:
            raise TooManyFds(len(numbers) + memfd)
        if size > self.max_size:
            raise AfunixError(
                errno.EMSGSIZE,
                f"message of {size} bytes exceeds this channel's max_size of {self.max_size} bytes",
            )
        if not memfd:
            header = encode_header(size, len(numbers))
            return Outgoing([header, view], numbers, address), None
        mfd = seal_bytes(view)
        try:
            header = encode_header(size, len(numbers) + 1, FLAG_MEMFD)
            return Outgoing([header], [*numbers, mfd], address), mfd
        except BaseException:
            os.close(mfd)
            raise

    def outgoing_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike], address: Any
    ) -> tuple[Outgoing, int]:
        numbers = fd_numbers(fds)
        if len(numbers) + 1 > SCM_MAX_FD:
            raise TooManyFds(len(numbers) + 1)
        if length > self.max_size:
            raise AfunixError(
                errno.EMSGSIZE,
                f"message of {length} bytes exceeds this channel's max_size of "
                f"{self.max_size} bytes",
            )
        mfd = buf.seal(length)
        try:
            header = encode_header(length, len(numbers) + 1, FLAG_MEMFD)
            return Outgoing([header], [*numbers, mfd], address), mfd
        except BaseException:
            os.close(mfd)
            raise

    # -- receiving -----------------------------------------------------------

    def next_message(self) -> Message | None:
        """A message already decoded from received bytes, or ``None`` (stream only)."""
        assert self.decoder is not None
        try:
            event = self.decoder.next_message()
        except FrameError:
            self.fail()
            raise
        if event is NEED_DATA:
            return None
        if event is CLOSED:
            raise EOFError("the peer closed the channel")
        assert isinstance(event, RawMessage)
        return self.message(event, None)

    def receive_direct(self) -> Message | None:
        """A large plain message received straight into its own buffer, or ``None``
        (blocking sockets; the asyncio channel drives the same steps itself)."""
        started = self.direct_start()
        if started is None:
            return None
        view, got = started
        head = got
        try:
            while got < len(view):
                got += self.direct_read(view, got)
        except BaseException:
            self.fail()  # the byte stream is out of step for good
            raise
        return self.direct_done(view, head)

    def direct_start(self) -> tuple[memoryview, int] | None:
        """If the next message is a plain payload of 256 KiB or more, not yet fully
        buffered: a buffer of its own and how many of its bytes are in it already.

        Into a buffer of its own, read as it comes. (``recvmsg()`` with
        ``MSG_WAITALL`` would spare zeroing the buffer, but sleeps until the whole
        payload is there: with the two ends on two CPUs every wake-up crosses CPUs,
        and the kernel wakes it for each chunk the sender writes; measured 10-20%
        slower for 1 MiB.)
        """
        decoder = self.decoder
        assert decoder is not None
        length = decoder.start_direct(_DIRECT_MIN)
        if not length:
            return None
        view = memoryview(bytearray(length))
        head = decoder.take_buffered_bytes()
        view[: len(head)] = head
        return view, len(head)

    def direct_read(self, view: memoryview, got: int) -> int:
        """One ``recvmsg_into`` of the rest of an in-place payload: how many bytes came
        (``BlockingIOError`` on a non-blocking socket with nothing to read). Any error
        leaves the stream out of step: the caller closes the channel."""
        n, anc, flags, _ = self.sock.recvmsg_into([view[got:]], self.control, _CLOEXEC)
        if anc or flags & _MSG_CTRUNC:
            close_fds(fds_in(anc))
            raise FrameError("descriptors arrived in the middle of a message's payload")
        if not n:
            raise FrameError(
                f"peer closed the connection mid-message, after {got} of {len(view)} payload bytes"
            )
        return n

    def direct_done(self, view: memoryview, head: int) -> Message:
        """The message of a payload received in place (*head* bytes came buffered)."""
        assert self.decoder is not None
        self.decoder.skip(len(view) - head)
        # We stand on a frame boundary with nothing buffered: if large messages keep
        # coming, reading just the next header lets its payload land in place too.
        self.header_next = True
        return Message(view.toreadonly())

    def receive_once(self) -> Message | None:
        """One ``recvmsg``. Packets give a message; a stream feeds the decoder (``None``)."""
        if self.closed:
            raise AfunixError(errno.EBADF, "the channel is closed")
        if self.decoder is not None and not self.credentials:
            # Fast path: no control data (the common case) needs no decoding at all.
            rview = self.rview
            if rview is None:  # small at first: many connections never need more
                rview = self.rview = memoryview(bytearray(min(self.recv_bufsize, _RECV_FIRST)))
            into = rview[: HEADER.size] if self.header_next else rview
            self.header_next = False
            n, anc, flags, _ = self.sock.recvmsg_into([into], self.control, _CLOEXEC)
            data = into[:n]  # copied by the decoder
            if n == len(rview) < self.recv_bufsize:  # a busy stream: the full size from now on
                self.rview = memoryview(bytearray(self.recv_bufsize))
            if not anc and not flags & _MSG_CTRUNC:
                try:
                    self.decoder.receive_data(data)
                except FrameError:
                    self.fail()
                    raise
                return None
            try:  # descriptors: checked as recvmsg_items() checks them
                fds = fds_only(anc, flags, room=self.room)
            except ControlError:
                self.fail()  # a message's descriptors are gone: the stream is broken
                raise
            try:
                self.decoder.receive_data(data, fds)
            except FrameError:
                self.fail()
                raise
            return None
        bufsize = self.recv_bufsize if self.stream else self.packet_bufsize
        try:
            got = recvmsg_items(self.sock, bufsize, self.room, credentials=self.credentials)
        except ControlError:
            if self.stream:  # a message's descriptors are gone: the stream is broken
                self.fail()
            raise
        if self.decoder is not None:
            try:
                self.decoder.receive_data(got.data, got.fds, got.credentials)
            except FrameError:
                self.fail()
                raise
            return None
        if not got.data and not got.fds and self.kind == socket.SOCK_SEQPACKET:
            raise EOFError("the peer closed the channel")
        raw = decode_packet(
            got.data,
            got.fds,
            truncated=bool(got.flags & socket.MSG_TRUNC),
            max_size=self.max_size,
            tag=got.credentials,
        )
        return self.message(raw, got.address)

    def fds_message(self, item: tuple[bytes, list[int]]) -> Message:
        """The message of a simple frame with descriptors (``StreamDecoder.next_fast``)."""
        data, fds = item
        if self.max_fds_in_flight is None:
            return Message(data, fds)
        return self.message(RawMessage(data, fds, 0, len(data)), None)

    def message(self, raw: RawMessage, address: Any) -> Message:
        creds = message_credentials(raw.tag) if isinstance(raw.tag, Credentials) else None
        fds = raw.fds
        payload = None
        if raw.memfd:
            try:
                payload = SealedPayload(fds.pop(), raw.length)
            except BaseException:
                close_fds(fds)
                raise
        if self.max_fds_in_flight is None or not fds:
            data = raw.data if payload is None else payload.view
            return Message(data, fds, address=address, credentials=creds, payload=payload)
        with self._flight_lock:
            held = self.in_flight
            if held + len(fds) > self.max_fds_in_flight:
                close_fds(fds)
                if payload is not None:
                    payload.close()
                raise ProtocolError(
                    f"the peer sent {len(fds)} more descriptor(s) while {held} it sent "
                    f"earlier are still open here; at most {self.max_fds_in_flight} may be "
                    "in flight per connection (close or take messages' descriptors sooner, "
                    "or raise max_fds_in_flight)",
                    errno.ETOOMANYREFS,
                )
            self.in_flight = held + len(fds)
        data = raw.data if payload is None else payload.view
        msg = Message(data, fds, address=address, credentials=creds, payload=payload)
        assert isinstance(msg._fds, _Fds)
        msg._fds.release = self._landed
        return msg

    def _landed(self, n: int) -> None:
        """Descriptors of a message were closed or taken: no longer in flight here."""
        with self._flight_lock:
            self.in_flight -= n

    def fail(self) -> None:
        """The stream broke: drop held descriptors and the socket."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.held, self.held_size = [], 0  # frames held by more=True die with the stream
        close_fds(self.held_fds)
        self.held_fds = []
        try:
            if self.on_close is not None:
                self.on_close()
        finally:
            if self.decoder is not None:
                self.decoder.close()
            self.sock.close()


class Channel:
    """Messages with descriptors over one Unix-domain socket (blocking).

    Args:
        sock: a connected stream/seqpacket socket, or a datagram socket
            (connected, or bound and used with ``address=``). The channel
            takes ownership and closes it.
        max_size: largest payload accepted, inline or memfd (default 64 MiB);
            a larger frame from the peer is a protocol error.
        maxfds: most descriptors accepted with one message (0-253). On a
            stream a message announcing more is a :class:`~afunix.ProtocolError`
            (each ``recvmsg`` makes room for 253, as one ``sendmsg`` may carry
            the descriptors of several messages); on seqpacket and datagram
            sockets it is the room made per packet, and a peer sending more
            gets :class:`~afunix.ControlTruncated`.
        memfd_threshold: payloads this large or larger go as a sealed memfd
            (default 32 MiB, see :mod:`afunix._memfd` for why); ``None`` never.
        recv_bufsize: bytes asked for per ``recvmsg`` on a stream.
        credentials: set ``SO_PASSCRED`` and fill :attr:`Message.credentials`.
        max_fds_in_flight: at most this many received descriptors may be held
            in messages not yet closed (or their descriptors taken); one more is
            a :class:`~afunix.ProtocolError` (``ETOOMANYREFS``) and the message's
            descriptors are closed. D-Bus uses 64. ``None``: no limit.

    Thread-safe: one sender and one receiver may work at the same time, and
    concurrent senders never interleave their messages.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        maxfds: int = SCM_MAX_FD,
        memfd_threshold: int | None = MEMFD_THRESHOLD,
        recv_bufsize: int = _RECV_BUFSIZE,
        credentials: bool = False,
        max_fds_in_flight: int | None = None,
    ) -> None:
        self._core = _Core(
            sock,
            max_size=max_size,
            maxfds=maxfds,
            memfd_threshold=memfd_threshold,
            recv_bufsize=recv_bufsize,
            credentials=credentials,
            max_fds_in_flight=max_fds_in_flight,
        )
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()

    # -- opening ---------------------------------------------------------------

    @classmethod
    def from_socket(cls, sock: socket.socket, **options: Any) -> Channel:
        """Wrap *sock*, checking it is an ``AF_UNIX`` socket; the channel owns it after."""
        if sock.gettimeout() == 0.0:
            sock.setblocking(True)
        return cls(sock, **options)

    @classmethod
    def connect(
        cls,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Channel:
        """Connect to *address* with :func:`afunix.connect` and wrap the socket."""
        sock = connect(address, type, timeout=timeout)
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def pair(cls, type: SocketTypeLike = "stream", **options: Any) -> tuple[Channel, Channel]:
        """Two connected channels over :func:`afunix.pair` (parent/child, threads, tests)."""
        a, b = pair(type)
        try:
            return cls(a, **options), cls(b, **options)
        except BaseException:
            a.close()
            b.close()
            raise

    @classmethod
    def bind(cls, address: AddressLike, **options: Any) -> Channel:
        """A datagram channel bound at *address*: ``recv`` gives each sender's address,
        reply with ``send(..., address=msg.address)``."""
        sock = listen(address, "dgram")
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def listen(
        cls,
        address: AddressLike,
        type: Literal["stream", "seqpacket"] = "stream",
        **options: Any,
    ) -> Listener:
        """A :class:`Listener` on *address*; ``accept()`` returns channels."""
        return Listener(address, type, **options)

    # -- using ---------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (do not read or write it directly)."""
        return self._core.sock

    @property
    def type(self) -> str:
        return type_name(self._core.kind)

    @property
    def closed(self) -> bool:
        return self._core.closed

    def fileno(self) -> int:
        return self._core.sock.fileno()

    def send(
        self,
        data: bytes | bytearray | memoryview = b"",
        fds: Iterable[FdLike] = (),
        *,
        memfd: bool | None = None,
        address: Any = None,
        more: bool = False,
    ) -> None:
        """Send one message: *data* plus *fds* (ints, files, sockets).

        The descriptors stay yours: close them whenever you like, even right
        away; the kernel keeps what is in flight open for the receiver (UNP
        15.7 step 3). *memfd* forces (``True``) or forbids (``False``) a
        sealed-memfd payload; by default payloads from ``memfd_threshold``
        bytes up use one. *address* is the destination on an unconnected
        datagram channel.

        *more* (stream channels) says more messages follow at once, like
        ``MSG_MORE``: a small message (up to 8 KiB, inline) may then be held
        and written together with the next ones, one system call for many
        (up to 64 KiB, or 253 descriptors: ``SCM_MAX_FD``). The descriptors
        of held messages are duplicated, so yours are still free to close at
        once; all of them ride on the first byte of the one ``sendmsg``, and
        the receiver hands each message exactly its own. Held messages go
        out with the next ``send`` without *more*, a larger message,
        :meth:`flush`, :meth:`recv` or :meth:`close`. Without *more* nothing
        is ever held back.
        """
        core = self._core
        if not fds:
            if memfd is None and address is None:
                plain = core.plain_frame(data)
                if plain is not None:
                    with self._send_lock:
                        if more or core.held:
                            if core.hold(plain) or not more:
                                self._write_held()
                        else:
                            self._write(plain)
                    return
                if isinstance(data, (bytes, bytearray)):
                    header = core.plain_header(data)
                    if header is not None:
                        with self._send_lock:
                            if core.held:
                                self._write_held()
                            self._write_parts(header, data)
                        return
            numbers: list[int] = []
        else:
            # Read once, and referenced here until sent (see _kept): the files the
            # caller passed stay open however the message goes out.
            if type(fds) is not tuple and type(fds) is not list:
                fds = list(fds)  # as _kept(fds), without a call on the hot path
            numbers = fd_numbers(fds)
            nfds = len(numbers)
            if memfd is None and address is None and nfds <= SCM_MAX_FD:
                frame = core.plain_frame(data, nfds)
                if frame is not None:
                    with self._send_lock:
                        if more or core.held:
                            if not core.room_for(nfds):
                                self._write_held()
                            if core.hold(frame, numbers) or not more:
                                self._write_held()
                        else:
                            self._write_fds(frame, numbers)
                    return
        if core.held:
            self.flush()  # keep the order: held messages first
        size = memoryview(data).nbytes
        use_memfd = core.use_memfd(size, memfd)
        try:
            self._send(data, numbers, use_memfd, address)
        except OSError as exc:
            # A packet too big for the socket: retry as a memfd unless told not to,
            # with the same descriptors (an iterator was read once, above).
            if exc.errno != errno.EMSGSIZE or memfd is not None or use_memfd or core.stream:
                raise
            if not available():  # pragma: no cover - not Linux
                raise
            self._send(data, numbers, True, address)

    def _send(
        self, data: bytes | bytearray | memoryview, fds: Iterable[FdLike], memfd: bool, address: Any
    ) -> None:
        out, mfd = self._core.outgoing(data, fds, memfd, address)
        try:
            self._push(out)
        finally:
            if mfd is not None:
                os.close(mfd)

    def send_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike] = (), *, address: Any = None
    ) -> None:
        """Seal a filled :class:`~afunix._memfd.MemfdBuffer` and send it as the payload.

        The zero-copy path: write into ``buf.view`` in place, then send its
        first *length* bytes. The buffer is consumed (sealed and closed).
        """
        fds = _kept(fds)  # referenced until sent (see _kept)
        out, mfd = self._core.outgoing_buffer(buf, length, fds, address)
        try:
            self._push(out)
        finally:
            os.close(mfd)

    def _write(self, frame: bytes) -> None:
        """Write whole frames (the send lock is held)."""
        sock, sent = self._core.sock, 0
        try:
            sent = sock.send(frame, NOSIGNAL)
            while sent < len(frame):
                sent += sock.send(frame[sent:], NOSIGNAL)
        except BaseException:
            if sent:  # half a message went out: the peer's framing is lost for good
                self._core.fail()
            raise

    def _write_fds(self, frame: bytes, fds: list[int]) -> None:
        """Write a frame with its descriptors attached to its first byte (UNP 15.7)."""
        sock, sent = self._core.sock, 0
        try:
            sent = sock.sendmsg([frame], [rights(fds)], NOSIGNAL)
            while sent < len(frame):  # the descriptors went with the first byte
                sent += sock.send(frame[sent:], NOSIGNAL)
        except BaseException:
            if sent:
                self._core.fail()
            raise

    def _write_parts(self, header: bytes, data: bytes | bytearray) -> None:
        """Write a header and its payload with ``sendmsg``, the payload not copied."""
        sock, sent, total = self._core.sock, 0, len(header) + len(data)
        try:
            sent = sock.sendmsg([header, data], (), NOSIGNAL)
            if sent < total:  # a signal cut it short: finish the message
                with memoryview(data) as view:
                    while sent < total:
                        if sent < len(header):
                            sent += sock.sendmsg([header[sent:], view], (), NOSIGNAL)
                        else:
                            sent += sock.send(view[sent - len(header) :], NOSIGNAL)
        except BaseException:
            if sent:  # half a message went out: the peer's framing is lost for good
                self._core.fail()
            raise

    def _write_held(self) -> None:
        """Write what ``send(..., more=True)`` held, with one ``sendmsg`` (the send
        lock is held); the descriptors of every held message ride on its first byte."""
        frames, fds = self._core.take_held()
        try:
            if fds:
                self._write_fds(frames, fds)
            else:
                self._write(frames)
        finally:
            close_fds(fds)  # our duplicates: the kernel holds what is in flight

    def flush(self) -> None:
        """Write the messages held by ``send(..., more=True)`` now."""
        with self._send_lock:
            if self._core.held:
                self._write_held()

    def _push(self, out: Outgoing) -> None:
        with self._send_lock:
            try:
                while not out.send_some(self._core.sock):
                    pass
            except BaseException:
                if out.sent and self._core.stream:
                    # Half a message went out: the peer's framing is lost for good.
                    self._core.fail()
                raise

    def recv(self) -> Message:
        """Receive one message (blocking). ``EOFError`` when the peer has closed."""
        core = self._core
        if core.held:
            self.flush()  # a reply may depend on what we hold
        with self._recv_lock:
            while True:
                decoder = core.decoder
                if decoder is not None:
                    item = decoder.next_fast()  # fast path: no memfd, no credentials
                    if item is not None:
                        if isinstance(item, bytes):
                            return Message(item)
                        if core.max_fds_in_flight is None:  # core.fds_message(), inline
                            return Message(*item)
                        return core.fds_message(item)
                    if not decoder.quiet():
                        msg = core.receive_direct() or core.next_message()
                        if msg is not None:
                            return msg
                msg = core.receive_once()
                if msg is not None:
                    return msg

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer closes."""
        while True:
            try:
                yield self.recv()
            except EOFError:
                return

    def close(self) -> None:
        """Close the socket and any descriptors received but not yet handed out.

        Messages held by ``send(..., more=True)`` are written first.
        """
        try:
            if self._core.held and not self._core.closed:
                with contextlib.suppress(OSError):  # the peer is gone: nobody to tell
                    self.flush()
        finally:
            self._core.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<afunix.Channel {self.type} {state}>"


class Listener:
    """A listening stream or seqpacket socket whose :meth:`accept` returns :class:`Channel` s."""

    def __init__(
        self,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        backlog: int = 128,
        mode: int | None = None,
        **options: Any,
    ) -> None:
        self._kind = socket_type(type)
        if self._kind == socket.SOCK_DGRAM:
            raise ValueError("a datagram socket does not listen: use Channel.bind(address)")
        self.sock = listen(address, type, backlog=backlog, mode=mode)
        self._family = _family_of(self.sock)
        self._options = options

    @property
    def address(self) -> Any:
        return self.sock.address

    def accept(self) -> Channel:
        """Wait for a client; return a channel on the new connection."""
        fd, _ = _accept(self.sock)
        try:
            conn = socket.socket(self._family, self._kind, 0, fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            # Blocking whatever the listener's timeout or socket.setdefaulttimeout()
            # (a BSD accept also passes O_NONBLOCK on to the new descriptor).
            conn.setblocking(True)
            return Channel(conn, **self._options)
        except BaseException:
            conn.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
