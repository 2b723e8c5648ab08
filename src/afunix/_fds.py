"""Passing descriptors over a socket: ``send_fds`` / ``recv_fds`` done defensively (UNP 15.7).

These are the book's ``write_fd``/``read_fd`` for Python. Compared with
``socket.send_fds``/``socket.recv_fds`` of the standard library they:

* accept ``int`` descriptors, files and sockets (anything with ``fileno()``);
* refuse more than ``SCM_MAX_FD`` (253, Linux's per-message limit) with a
  clear error before any byte is sent, and refuse descriptors with an empty
  payload (a stream would not carry them);
* size the control buffer with ``CMSG_SPACE``, receive with
  ``MSG_CMSG_CLOEXEC`` so a received descriptor never leaks into a program
  we ``exec``, raise on ``MSG_CTRUNC`` (the peer sent more than there was
  room for, or we made no room at all: the book's "descriptors lost") and on
  unexpected control messages, and close every received descriptor on any
  error path;
* never use ``MSG_PEEK`` together with descriptors (the book: "the results
  are unpredictable");
* keep partial writes honest: :class:`Outgoing` remembers that the
  descriptors went with the first byte, so retrying after ``EAGAIN``,
  ``EINTR`` or a short write never sends them twice or drops them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._cmsg import (
    SCM_MAX_FD,
    ControlItem,
    Credentials,
    FdLike,
    Rights,
    control_space,
    decode,
    encode,
    fd_numbers,
    fileno_of,
)
from ._errors import AfunixError, TooManyFds
from ._platform import NOSIGNAL

__all__ = [
    "SCM_MAX_FD",
    "FdInfo",
    "FdLike",
    "Outgoing",
    "Received",
    "TooManyFds",
    "describe_fd",
    "fileno_of",
    "recv_fds",
    "recvmsg_items",
    "send_fds",
    "sendall_fds",
]


def _is_stream(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM


class Outgoing:
    """One message on its way out: buffers plus descriptors attached to the first byte.

    :meth:`send_some` makes one ``sendmsg`` and returns whether the message is
    complete. The descriptors go with the first call that sends any byte;
    once that call returned, they are never attached again, whatever happens
    to the rest (short writes on a stream, ``EAGAIN`` on a non-blocking socket,
    ``EINTR``). If a call fails before any byte went, nothing (descriptors
    included) was sent and the same call can be retried.

    On seqpacket and datagram sockets a ``sendmsg`` is all-or-nothing, so one
    successful call completes the message. Every call passes ``MSG_NOSIGNAL``: a
    peer that has gone is a ``BrokenPipeError``, never a ``SIGPIPE``.

    *fds* is read once, and the objects in it (files, sockets) stay referenced
    by the message until it is dropped: a file whose only reference was the
    caller's argument (``fds=[open(path)]``, or a generator of files) is not
    closed, its number perhaps reused by another thread, before it is sent.
    """

    __slots__ = ("_address", "_ancdata", "_buffers", "_refs", "fds_sent", "sent", "total")

    def __init__(
        self,
        buffers: Sequence[bytes | bytearray | memoryview],
        fds: Iterable[FdLike] = (),
        address: Any = None,
        *,
        credentials: Credentials | None = None,
    ) -> None:
        refs = fds if type(fds) is tuple or type(fds) is list else list(fds)
        numbers = fd_numbers(refs)
        self._refs = refs
        self._buffers = [memoryview(b).cast("B") for b in buffers if len(b)]
        self.total = sum(len(b) for b in self._buffers)
        if numbers and not self.total:
            raise ValueError(
                "descriptors need at least one byte of data to travel with (UNP 15.7); "
                "an empty message cannot carry them"
            )
        items: list[ControlItem] = [Rights(tuple(numbers))] if numbers else []
        if credentials is not None:
            items.append(credentials)
        self._ancdata = encode(items)
        self._address = address
        self.sent = 0
        self.fds_sent = not numbers

    @property
    def done(self) -> bool:
        return self.sent >= self.total and self.fds_sent

    def send_some(self, sock: socket.socket) -> bool:
        """One ``sendmsg``; returns whether the whole message has gone.

        Raises ``BlockingIOError`` (nothing sent this time) on a non-blocking
        socket that is full; ``InterruptedError`` is retried here.
        """
        if self.done:
            return True
        anc = [] if self.fds_sent else self._ancdata
        while True:
            try:
                if self._address is not None:
                    n = sock.sendmsg(self._buffers, anc, NOSIGNAL, self._address)
                else:
                    n = sock.sendmsg(self._buffers, anc, NOSIGNAL)
            except InterruptedError:
                continue  # nothing was sent; same call again
            break
        # From here on the descriptors are in flight: never attach them again.
        self.fds_sent = True
        self.sent += n
        self._advance(n)
        if self.sent < self.total and not _is_stream(sock):
            raise AfunixError(  # pragma: no cover - the kernel never does this
                errno.EMSGSIZE, f"short send of a {self.total}-byte packet ({n} bytes)"
            )
        return self.done

    def _advance(self, n: int) -> None:
        while n and self._buffers:
            first = self._buffers[0]
            if n >= len(first):
                n -= len(first)
                self._buffers.pop(0)
            else:
                self._buffers[0] = first[n:]
                n = 0


def send_fds(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    fds: Iterable[FdLike],
    *,
    address: Any = None,
) -> int:
    """One ``sendmsg`` of *data* with *fds* attached; returns the bytes sent.

    On a stream socket fewer bytes than ``len(data)`` may go; the descriptors
    went with them all the same. Send the rest *without* descriptors, or use
    :func:`sendall_fds`. The caller keeps its own descriptors: close them
    when you like, the ones in flight stay open for the receiver (UNP 15.7
    step 3).
    """
    out = Outgoing([data], fds, address)
    out.send_some(sock)
    return out.sent


def sendall_fds(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    fds: Iterable[FdLike] = (),
    *,
    address: Any = None,
) -> None:
    """Send all of *data* with *fds* attached to its first byte (blocking sockets)."""
    out = Outgoing([data], fds, address)
    while not out.send_some(sock):
        pass


class Received(NamedTuple):
    """What :func:`recv_fds` returns; the caller owns ``fds``."""

    data: bytes
    fds: list[int]
    flags: int
    address: Any


@dataclass(slots=True)
class _Items:
    data: bytes
    items: list[ControlItem]
    flags: int
    address: Any

    @property
    def fds(self) -> list[int]:
        return [fd for item in self.items if isinstance(item, Rights) for fd in item.fds]

    @property
    def credentials(self) -> Credentials | None:
        for item in self.items:
            if isinstance(item, Credentials):
                return item
        return None


# Plain ints: arithmetic on the socket module's enum flags costs microseconds per call.
_MSG_PEEK = int(socket.MSG_PEEK)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))


def _check_flags(flags: int) -> int:
    if flags & _MSG_PEEK:
        raise ValueError(
            "MSG_PEEK is never used with descriptors (UNP 15.7: the results are "
            "unpredictable); receive the message for real"
        )
    return flags | _MSG_CMSG_CLOEXEC


def recvmsg_items(
    sock: socket.socket,
    bufsize: int,
    maxfds: int = SCM_MAX_FD,
    *,
    credentials: bool = False,
    flags: int = 0,
) -> _Items:
    """One ``recvmsg`` with room for *maxfds* descriptors (and credentials); checked items.

    The low-level form of :func:`recv_fds` that also returns ``SCM_CREDENTIALS``.
    """
    if not 0 <= maxfds <= SCM_MAX_FD:
        raise ValueError(f"maxfds must be 0..{SCM_MAX_FD}, not {maxfds}")
    data, anc, msg_flags, address = sock.recvmsg(
        bufsize, control_space(maxfds, credentials), _check_flags(flags)
    )
    items = decode(anc, msg_flags, room=maxfds) if anc or msg_flags & _MSG_CTRUNC else []
    # Linux echoes MSG_CMSG_CLOEXEC back in msg_flags; it says nothing about the message.
    return _Items(data, items, msg_flags & ~_MSG_CMSG_CLOEXEC, address)


def recv_fds(
    sock: socket.socket, bufsize: int, maxfds: int = SCM_MAX_FD, *, flags: int = 0
) -> Received:
    """One ``recvmsg``: up to *bufsize* bytes and up to *maxfds* descriptors.

    Received descriptors are close-on-exec and owned by the caller. If the
    peer sent more descriptors than *maxfds* (``maxfds=0``: a receiver with no
    room at all) the kernel discards them; this raises
    :class:`~afunix.ControlTruncated` instead of letting that pass silently,
    after closing the ones that did arrive. ``data == b""`` with no
    descriptors is end of file on a stream.
    """
    got = recvmsg_items(sock, bufsize, maxfds, flags=flags)
    return Received(got.data, got.fds, got.flags, got.address)


# ---------------------------------------------------------------------------
# Describing a descriptor (for `afunix serve --show-fds` and the tour)


@dataclass(frozen=True, slots=True)
class FdInfo:
    """What a descriptor refers to."""

    fd: int
    kind: str
    target: str | None
    inode: int
    mode: str
    offset: int | None

    def describe(self) -> str:
        where = self.target if self.target is not None else "?"
        offset = "" if self.offset is None else f", offset {self.offset}"
        return f"fd {self.fd}: {self.kind} {where} (inode {self.inode}, open {self.mode}{offset})"


_KINDS = [
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISLNK, "symbolic link"),
]


def _open_mode(flags: int) -> str:
    acc = flags & os.O_ACCMODE
    mode = {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only", os.O_RDWR: "read-write"}.get(
        acc, f"access {acc}"
    )
    extra = [
        name
        for name in ("O_APPEND", "O_NONBLOCK", "O_PATH", "O_DIRECT", "O_SYNC")
        if getattr(os, name, 0) and (flags & getattr(os, name)) == getattr(os, name)
    ]
    return " ".join([mode, *extra])


def _target(fd: int) -> str | None:
    # Linux names every descriptor under /proc/self/fd; elsewhere we do without.
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def describe_fd(fd: int) -> FdInfo:
    """Kind, target path, inode, open mode and offset of descriptor *fd*."""
    st = os.fstat(fd)
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "other")
    target = _target(fd)
    if kind == "regular file" and target is not None and target.startswith("/memfd:"):
        kind = "memfd"
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        offset: int | None = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        offset = None  # pipes and sockets have no offset
    return FdInfo(fd, kind, target, st.st_ino, _open_mode(flags), offset)
