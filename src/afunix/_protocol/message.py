"""A received message and the descriptors it owns: :class:`Message` (sans-IO).

Built by :class:`afunix._protocol.machine.ChannelProtocol` (and by the lean receive of
:mod:`afunix._io`), handed out by :class:`afunix.Channel` and
:class:`afunix.AsyncChannel`. Only messages that carry descriptors get a
finalizer (:class:`_Fds`); a plain message shares one empty sequence
(:data:`NO_FDS`) and costs nothing but itself.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, Iterable
from typing import IO, Any, cast

from .._cmsg import close_fds
from .._core import MessageBase, ccore
from .._memfd import SealedPayload
from .._peer import PeerCredentials
from .framing import PLAIN_WORD, WORDS

__all__ = ["NO_FDS", "Message", "plain_message", "scan_plain"]

#: The descriptor list of every message that came without any: one shared, immutable
#: empty sequence (no list to build per message). Nothing writes a message's list
#: but through an index it has, and an empty one has none.
NO_FDS = cast("list[int]", ())


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


class Message(MessageBase):
    """A received message: ``data`` plus the descriptors that came with it.

    The message *owns* its descriptors. Take the ones you keep with
    :meth:`take_fd`, :meth:`take_fds`, :meth:`take_file` or
    :meth:`take_socket` (they are then yours to close); :meth:`close` (or
    leaving the ``with`` block) closes every descriptor not taken and
    releases a memfd payload's mapping. :attr:`fds` lists the ones still
    held, by position; a taken one shows as ``-1``.
    """

    __slots__ = ()  # the five slots are MessageBase's (in C with the compiled core)

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
        self._fds: list[int] = _Fds(fds) if fds else NO_FDS
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
    def memfd(self) -> bool:
        """Whether the payload came as a sealed memfd (:attr:`data` is then a read-only
        ``memoryview`` of its mapping, valid until the message is closed)."""
        return self._payload is not None

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


def counted_message(
    data: bytes | memoryview,
    fds: list[int],
    release: Callable[[int], None],
    *,
    address: Any = None,
    credentials: PeerCredentials | None = None,
    payload: SealedPayload | None = None,
) -> Message:
    """A message whose descriptors (*fds*, not empty) report leaving it to *release*
    (taken, closed or collected): a channel's in-flight count of descriptors."""
    msg = Message(data, fds, address=address, credentials=credentials, payload=payload)
    held = msg._fds
    assert isinstance(held, _Fds)
    held.release = release
    return msg


_unpack_words = WORDS.unpack_from
_new = object.__new__


def plain_message(data: bytes) -> Message:
    """``Message(data)`` for a message of *data* alone, without ``__init__``'s work.

    The pure-Python core's construction (the compiled core builds its own in C):
    five slot stores, the descriptors :data:`NO_FDS`.
    """
    msg: Message = _new(Message)
    msg.data = data
    msg.address = msg.credentials = msg._payload = None
    msg._fds = NO_FDS
    return msg


def scan_plain(src: bytes | bytearray | memoryview, pos: int, max_size: int, out: list[Any]) -> int:
    """The whole plain frames of *src* from offset *pos*, as messages appended to *out*.

    Plain: no flags, no descriptors, a length within *max_size*. Stops at the
    first frame that is anything else or not whole; returns its offset. The
    reference of the compiled core's ``scan_plain`` (which replaces this one
    when it runs): the stream decoder's loop over a busy ``recvmsg``.
    """
    end, new, kind, no_fds, add = len(src), _new, Message, NO_FDS, out.append
    copy = type(src) is not bytes  # (a slice of bytes is bytes already)
    while end - pos >= 8:
        word, length = _unpack_words(src, pos)
        stop = pos + 8 + length
        if word != PLAIN_WORD or length > max_size or stop > end:
            break
        msg = new(kind)  # plain_message(), inline: this is the loop of a busy stream
        msg.data = bytes(src[pos + 8 : stop]) if copy else src[pos + 8 : stop]  # type: ignore[assignment]
        msg.address = msg.credentials = msg._payload = None
        msg._fds = no_fds
        add(msg)
        pos = stop
    return pos


#: The pure-Python twin, kept for the tests that run both cores on the same bytes.
py_scan_plain = scan_plain
if ccore is not None:
    ccore.set_types(Message, _Fds)
    scan_plain = ccore.scan_plain
