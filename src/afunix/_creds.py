"""Who is on the other end: peer and per-message credentials (UNP 15.8).

Two ways to learn a peer's identity, both vouched for by the kernel:

*Peer credentials* (:func:`peer_credentials`): on a connected stream or
seqpacket socket (or a ``socketpair``), the kernel records who connected.
One function, with one implementation per system chosen once at import (by
feature test): Linux ``SO_PEERCRED`` + ``SO_PEERGROUPS`` + ``SO_PEERPIDFD``,
FreeBSD/DragonFly ``LOCAL_PEERCRED``, macOS ``LOCAL_PEERCRED`` +
``LOCAL_PEERPID``, NetBSD ``LOCAL_PEEREID``, OpenBSD ``SO_PEERCRED``;
anywhere else a clear :class:`~afunix.UnsupportedFeature`.

*Per-message credentials* (:func:`enable_credentials`,
:func:`recv_credentials`, :func:`send_credentials`): the kernel attaches the
sender's identity to each message. This is the only way for datagram
sockets, which have no connection. On Linux (``SO_PASSCRED`` +
``SCM_CREDENTIALS``) a sender may claim other ids only with privilege; an
unprivileged forgery is refused by the kernel and raised here as
:class:`CredentialsRefused`.

On Linux a :class:`PeerCredentials` can hold a *pidfd*: a handle on the peer
process that, unlike its pid number, is never recycled. With it afunix can
tell when the peer has exited and read ``/proc`` facts about it
(:meth:`PeerCredentials.facts`: executable, command line, cgroup) knowing they
belong to the peer and not to a process that inherited its pid.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from ._address import Address, AddressLike
from ._cmsg import close_fds, credentials, fds_in, split_credentials
from ._errors import AfunixError, ProtocolError, UnsupportedFeature
from ._peer import PeerCredentials as PeerCredentials
from ._peer import PeerGone as PeerGone
from ._peer import ProcessFacts as ProcessFacts
from ._platform import NOSIGNAL, PLATFORM, Backend

__all__ = [
    "CredentialsMessage",
    "CredentialsRefused",
    "PeerCredentials",
    "PeerGone",
    "ProcessFacts",
    "credential_mechanisms",
    "credentials_from_ancillary",
    "enable_credentials",
    "message_credentials",
    "peer_credentials",
    "recv_credentials",
    "send_credentials",
]


#: This system's backend, chosen once by :func:`afunix._platform.detect` (the same
#: choice the address and bind code see).
_backend: Backend = PLATFORM.backend


# ------------------------------------------------------------------ errors
class CredentialsRefused(AfunixError):
    """The kernel refused the credentials this process tried to send.

    ``errno`` is ``EPERM`` when the sender claimed ids (or a pid) that are not
    its own without the privilege to do so, ``ESRCH`` when the claimed pid
    names no process. The message was *not* sent.
    """


# ------------------------------------------------------ peer credentials
def peer_credentials(sock: socket.socket, *, pidfd: bool = True) -> PeerCredentials:
    """The credentials of the peer of a connected Unix-domain socket.

    Works on accepted and connected stream and seqpacket sockets and on both
    ends of a ``socketpair``. The identity is the one the peer had when the
    connection was made. On Linux 6.5+ the result carries a pidfd (pass
    ``pidfd=False`` not to take one); close it with
    :meth:`PeerCredentials.close` or a ``with`` block.

    Raises :class:`~afunix.UnsupportedFeature` for TCP sockets and on
    systems without peer credentials, and ``ENOTCONN`` (an
    :class:`~afunix.AfunixError`) for a socket with no connection, such as
    a datagram socket: use per-message credentials there
    (:func:`recv_credentials`).
    """
    if sock.family != socket.AF_UNIX:
        raise UnsupportedFeature(
            "peer credentials exist only for Unix-domain sockets, not "
            f"{socket.AddressFamily(sock.family).name}: a TCP peer cannot be identified"
        )
    try:
        dec, fd = _backend.peer(sock, pidfd)
    except OSError as exc:
        if isinstance(exc, AfunixError):
            raise
        if exc.errno in (errno.ENOTCONN, errno.ENODATA, errno.EINVAL):
            kind = "datagram " if sock.type == socket.SOCK_DGRAM else ""
            raise AfunixError(
                errno.ENOTCONN,
                f"this {kind}socket has no connected peer, so the kernel has no peer "
                "credentials for it; "
                + (
                    "datagram sockets carry credentials per message: use "
                    "afunix.lowlevel.enable_credentials() and recv_credentials()"
                    if kind
                    else "call peer_credentials() on an accepted or connected socket"
                ),
            ) from exc
        raise
    return PeerCredentials._from_decoded(dec, fd, _backend.PEER_MECHANISM)


# --------------------------------------------------- per-message credentials
def enable_credentials(sock: socket.socket, enable: bool = True, *, pidfd: bool = False) -> None:
    """Ask the kernel to attach the sender's credentials to every message received.

    Linux: ``SO_PASSCRED`` (and ``SO_PASSPIDFD`` with *pidfd*, Linux 6.5+,
    for a pidfd of each sender). Set it on the *receiving* socket before the
    messages arrive. FreeBSD: ``LOCAL_CREDS_PERSISTENT``; NetBSD:
    ``LOCAL_CREDS``.
    """
    if sock.family != socket.AF_UNIX:
        raise UnsupportedFeature("per-message credentials exist only on Unix-domain sockets")
    try:
        _backend.enable_passcred(sock, enable, pidfd)
    except OSError as exc:
        if isinstance(exc, AfunixError) or exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        raise UnsupportedFeature(
            "this kernel cannot attach a pidfd to each message (SO_PASSPIDFD needs Linux "
            "6.5+); call enable_credentials() without pidfd=True"
        ) from exc


@dataclass
class CredentialsMessage:
    """A message received with :func:`recv_credentials`.

    ``credentials`` is ``None`` when the message came without any (the
    receiving socket did not :func:`enable_credentials` in time, or the
    system sends credentials only when the sender asks). Close the message
    (or its credentials) if they may hold a pidfd.
    """

    data: bytes
    credentials: PeerCredentials | None
    sender: Address

    def close(self) -> None:
        """Close the sender's pidfd, if one came with the message."""
        if self.credentials is not None:
            self.credentials.close()

    def __enter__(self) -> CredentialsMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Ucred(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


def message_credentials(item: _Ucred) -> PeerCredentials:
    """A :class:`PeerCredentials` from a decoded ``SCM_CREDENTIALS`` item (pid, uid, gid).

    Used by message channels (:attr:`afunix.Message.credentials`): the same
    public type as peer credentials, with no groups and no pidfd.
    """
    return PeerCredentials(
        item.pid if item.pid > 0 else None,
        item.uid,
        item.gid,
        mechanism=_backend.MESSAGE_MECHANISM or "",
    )


def credentials_from_ancillary(
    ancdata: list[tuple[int, int, bytes]],
) -> tuple[PeerCredentials | None, list[tuple[int, int, bytes]]]:
    """Take the credential items out of ``recvmsg`` ancillary data.

    Returns the credentials (with the sender's pidfd when an ``SCM_PIDFD``
    came along; the caller owns it) and the items that are not about
    credentials, untouched. Used by :func:`recv_credentials` and by message
    channels that receive descriptors and credentials together.
    """
    decoded, pidfd, rest = split_credentials(ancdata, backend=_backend)
    if decoded is None:
        return None, rest
    return PeerCredentials._from_decoded(decoded, pidfd, _backend.MESSAGE_MECHANISM or ""), rest


def recv_credentials(
    sock: socket.socket, bufsize: int = 65536, flags: int = 0
) -> CredentialsMessage:
    """Receive one message (one datagram) with the credentials the kernel attached.

    The socket must have :func:`enable_credentials` set (before the message
    arrived). Descriptors that a sender slipped in are closed at once, and a
    truncated control buffer (``MSG_CTRUNC``) is a :class:`~afunix.ProtocolError`:
    this call expects credentials only; use a message channel for descriptors.
    """
    space = max(_backend.CREDENTIALS_SPACE, 64) + socket.CMSG_SPACE(4 * 8)
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    data, ancdata, msg_flags, raw = sock.recvmsg(bufsize, space, flags | cloexec)
    creds, rest = credentials_from_ancillary(ancdata)
    stray = fds_in(rest)  # descriptors where none were expected: closed at once
    close_fds(stray)
    dropped = len(stray)
    if msg_flags & socket.MSG_CTRUNC or dropped:
        if creds is not None:
            creds.close()
        raise ProtocolError(
            "a message came with descriptors or more control data than credentials "
            f"({'truncated, ' if msg_flags & socket.MSG_CTRUNC else ''}{dropped} descriptor(s) "
            "closed); the peer sent descriptors where none were expected",
            errno.EMSGSIZE if msg_flags & socket.MSG_CTRUNC else errno.EPROTO,
        )
    sender = Address.from_sockaddr(sock.family, raw) if raw else Address.unnamed()
    return CredentialsMessage(data, creds, sender)


def send_credentials(
    sock: socket.socket,
    data: bytes,
    address: AddressLike | None = None,
    *,
    pid: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> int:
    """Send *data* with explicit credentials attached (``SCM_CREDENTIALS`` / ``SCM_CREDS``).

    Without *pid*/*uid*/*gid* this attaches this process's own identity
    (Linux: its pid and real ids; FreeBSD: the kernel fills in the truth).
    On Linux a sender may also claim its effective or saved ids; claiming
    anything else (another user, another pid) needs ``CAP_SETUID``,
    ``CAP_SETGID`` or ``CAP_SYS_ADMIN``, and is otherwise refused by the
    kernel: :class:`CredentialsRefused` (``EPERM``), or ``ESRCH`` for a pid
    that names no process. Returns the number of bytes sent.
    """
    if sock.family != socket.AF_UNIX:
        raise UnsupportedFeature("credentials can only be sent over Unix-domain sockets")
    item = credentials(pid, uid, gid, backend=_backend)
    dest = None if address is None else Address.parse(address).sockaddr
    try:
        if dest is None:
            return sock.sendmsg([data], [item], NOSIGNAL)
        return sock.sendmsg([data], [item], NOSIGNAL, dest)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ESRCH):
            raise
        claim = (
            f"pid={pid if pid is not None else os.getpid()}, "
            f"uid={uid if uid is not None else os.getuid()}, "
            f"gid={gid if gid is not None else os.getgid()}"
        )
        me = f"pid {os.getpid()}, uid {os.getuid()}, gid {os.getgid()}"
        if exc.errno == errno.ESRCH:
            why = f"no process has pid {pid}"
        else:
            why = (
                "an unprivileged process may send only its own pid and its real, "
                "effective or saved uid/gid; claiming another identity needs "
                "CAP_SYS_ADMIN (pid), CAP_SETUID (uid) or CAP_SETGID (gid)"
            )
        raise CredentialsRefused(
            exc.errno,
            f"the kernel refused to send credentials ({claim}) from {me}: {why}; the "
            "message was not sent. Omit pid/uid/gid to send your own identity",
        ) from exc


def credential_mechanisms() -> dict[str, Any]:
    """What this system offers, for docs, logs and ``afunix creds``."""
    return {
        "system": _backend.NAME,
        "peer": _backend.PEER_MECHANISM,
        "message": _backend.MESSAGE_MECHANISM,
        "pidfd": _backend.has_pidfd(),
    }
