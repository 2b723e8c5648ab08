"""The afunix exception hierarchy.

Every error is an :class:`OSError` subclass and keeps the ``errno`` of the
system call that failed (or the errno that best describes a check afunix made
itself), so code written for plain sockets keeps working::

    try:
        afunix.connect("/run/app.sock")
    except afunix.NothingListening as exc:   # a stale socket file
        ...
    except OSError as exc:                    # anything else, errno intact
        ...

Messages say what happened, to which address, and what to do about it.
Errors raised because a *peer* misbehaved derive from :class:`PeerError`;
errors caused by the caller's own input derive from :class:`UsageError`-like
classes such as :class:`AddressError`.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AddressError",
    "AddressInUse",
    "AfunixError",
    "ListenQueueFull",
    "NoReplyAddress",
    "NoSuchSocket",
    "NotASocket",
    "NothingListening",
    "PeerError",
    "PeerTimeout",
    "ProtocolError",
    "TooManyFds",
    "UnsupportedFeature",
    "WrongSocketType",
]


class AfunixError(OSError):
    """Base class of every afunix error. An ``OSError`` with errno kept."""

    def __init__(self, err: int, message: str, filename: object = None) -> None:
        if filename is None:
            super().__init__(err, message)
        else:
            super().__init__(err, message, filename)

    def __str__(self) -> str:
        # OSError's default rendering repeats the filename as "[Errno N] msg: 'path'".
        # Our messages already name the path, so render "msg [errno NAME]".
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"{self.strerror} [{name}]"


class AddressError(AfunixError, ValueError):
    """An address could not be parsed or cannot be used on this system.

    Also a ``ValueError``, because the caller's input is at fault. ``errno`` is
    ``EINVAL`` or ``ENAMETOOLONG``.
    """


class AddressInUse(AfunixError):
    """Something else is already bound at this address (``EADDRINUSE``).

    ``holder`` is a description of the process that holds it (``"pid 123
    (python3 server.py)"``) when the system lets afunix find out, else ``None``.
    """

    holder: str | None

    def __init__(self, message: str, filename: object = None, holder: str | None = None) -> None:
        super().__init__(_errno.EADDRINUSE, message, filename)
        self.holder = holder


class NoSuchSocket(AfunixError):
    """Nothing exists at the pathname (``ENOENT``)."""


class NotASocket(AfunixError):
    """The pathname exists but is not a socket (a file, directory or symlink)."""


class NothingListening(AfunixError):
    """A socket file exists but no process listens on it (``ECONNREFUSED`` on Linux).

    This is a *stale* socket file, left behind by a server that exited
    without removing it. On BSD/macOS ``ECONNREFUSED`` can also mean a full
    listen queue; afunix says which it is where it can tell.
    """


class ListenQueueFull(AfunixError):
    """The server's listen queue is full (``EAGAIN`` on Linux, or a timeout).

    On Linux a blocking connect waits for room in the queue; with a timeout
    the wait ends in this error. The server is alive but not accepting fast
    enough: retry later, or raise the server's backlog.
    """


class WrongSocketType(AfunixError):
    """The peer socket is of another type (``EPROTOTYPE``), e.g. datagram vs stream."""


class NoReplyAddress(AfunixError):
    """A datagram was sent from an unbound socket and a reply was awaited.

    An unbound Unix datagram socket has no address, so the server cannot reply
    (UNP 15.4, point 8). Bind the client socket (``afunix.connect(...,
    type="dgram")`` does this for you) before expecting replies.
    """


class UnsupportedFeature(AfunixError):
    """The feature is not available on this system or over this transport.

    For example descriptor passing or credentials over TCP, or abstract names
    on a system without an abstract namespace. ``errno`` is ``EOPNOTSUPP``.
    """

    def __init__(self, message: str, filename: object = None) -> None:
        super().__init__(_errno.EOPNOTSUPP, message, filename)


class TooManyFds(AfunixError, ValueError):
    """More descriptors than one message can carry (``SCM_MAX_FD``, 253). Nothing was sent."""

    def __init__(self, count: int, limit: int = 253) -> None:
        super().__init__(
            _errno.EINVAL,
            f"cannot send {count} descriptors in one message: the kernel's limit is "
            f"{limit} (SCM_MAX_FD); send them in several messages",
        )
        self.count = count


class PeerError(AfunixError):
    """The peer broke the rules of the conversation (not the caller's fault)."""


class PeerTimeout(PeerError, TimeoutError):
    """The peer stayed silent, or stopped reading, for longer than allowed (``ETIMEDOUT``).

    Raised by server connections with ``idle_timeout`` / ``send_timeout``; the
    server closes that connection and logs why, and no other client notices.

    :attr:`expired` says which limit ran out, where the raiser knows, so a
    program can answer each differently (the broker closes an idle client
    silently, and tells one that stalled mid-request why):

    * ``"idle"``: no message began within a channel's ``idle_timeout`` (the
      channel is still usable);
    * ``"message"``: a message began and was not whole within ``message_timeout``
      (a stream is then mid-message: close it);
    * ``"call"``: ``recv(timeout=...)`` ran out, before or during a message;
    * ``"send"``: the peer left no room to write for ``send_timeout``;
    * ``None``: not said (a server connection's ``recv``/``send``).
    """

    def __init__(self, message: str, expired: str | None = None) -> None:
        super().__init__(_errno.ETIMEDOUT, message)
        #: Which timeout expired: ``"idle"``, ``"message"``, ``"call"``, ``"send"`` or ``None``.
        self.expired = expired


class ProtocolError(PeerError):
    """A malformed or oversized frame, or descriptors that do not match the header.

    ``errno`` is ``EPROTO`` unless a more precise one applies (``EMSGSIZE``).
    The connection that produced it should be closed; any descriptors that came
    with the bad frame have already been closed.
    """

    def __init__(self, message: str, err: int = _errno.EPROTO) -> None:
        super().__init__(err, message)


def strerror(err: int) -> str:
    """``os.strerror`` that never raises."""
    try:
        return os.strerror(err)
    except ValueError:  # pragma: no cover - unknown errno
        return f"errno {err}"
