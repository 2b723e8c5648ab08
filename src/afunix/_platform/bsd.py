"""BSD credentials: FreeBSD/DragonFly ``LOCAL_PEERCRED``, NetBSD ``LOCAL_PEEREID``, OpenBSD.

Not exercised on the Linux CI machine: the structure layouts are decoded by
:mod:`afunix._credstructs`, which *is* tested (on byte tables). This module
only makes the calls:

* FreeBSD and DragonFly: ``getsockopt(s, SOL_LOCAL, LOCAL_PEERCRED)`` returns
  a ``struct xucred`` (what ``getpeereid(3)`` uses): effective uid, up to 16
  groups (the first is the effective gid) and, on FreeBSD 13+, the pid.
  Per-message credentials are the seed's ``SCM_CREDS``: the *sender*
  attaches an empty ``struct cmsgcred`` and the kernel fills it in; with
  ``LOCAL_CREDS_PERSISTENT`` set on the receiver (FreeBSD 13+) every message
  carries a ``struct sockcred2`` (``SCM_CREDS2``) instead. Explicit ids cannot
  be claimed: the kernel always writes the truth.
* NetBSD: ``LOCAL_PEEREID`` returns a ``struct unpcbid`` (pid, effective
  uid and gid); ``LOCAL_CREDS`` makes messages carry a ``struct sockcred``.
* OpenBSD: ``SO_PEERCRED`` returns a ``struct sockpeercred`` (uid, gid, pid);
  no per-message credentials.
"""

from __future__ import annotations

import socket
import sys

from .._credstructs import (
    CMSGCRED_SIZE,
    DecodedCredentials,
    parse_cmsgcred,
    parse_freebsd_sockcred,
    parse_freebsd_sockcred2,
    parse_freebsd_xucred,
    parse_netbsd_sockcred,
    parse_openbsd_sockpeercred,
    parse_unpcbid,
)
from .._errors import UnsupportedFeature
from ._nopidfd import find_socket_holder as find_socket_holder
from ._nopidfd import has_pidfd as has_pidfd
from ._nopidfd import pidfd_exited as pidfd_exited
from ._nopidfd import pidfd_pid as pidfd_pid
from ._nopidfd import process_facts as process_facts

SOL_LOCAL = 0
SOL_SOCKET = socket.SOL_SOCKET
_PTR = 8 if sys.maxsize > 2**32 else 4

NAME: str
PEER_MECHANISM: str
MESSAGE_MECHANISM: str | None
_PEER_OPT: tuple[int, int, int]
_CREDS_OPT: int | None
SCM_CREDS: int
SCM_CREDS2: int | None

if sys.platform.startswith("netbsd"):  # pragma: no cover - not this machine
    NAME = "netbsd"
    PEER_MECHANISM = "LOCAL_PEEREID"
    MESSAGE_MECHANISM = "LOCAL_CREDS (struct sockcred)"
    _PEER_OPT = (SOL_LOCAL, 0x0003, 12)
    _CREDS_OPT = 0x0004  # LOCAL_CREDS
    SCM_CREDS = 0x10
    SCM_CREDS2 = None
elif sys.platform.startswith("openbsd"):  # pragma: no cover - not this machine
    NAME = "openbsd"
    PEER_MECHANISM = "SO_PEERCRED (struct sockpeercred)"
    MESSAGE_MECHANISM = None
    _PEER_OPT = (SOL_SOCKET, getattr(socket, "SO_PEERCRED", 0x1022), 12)
    _CREDS_OPT = None
    SCM_CREDS = 0
    SCM_CREDS2 = None
else:  # FreeBSD, DragonFly
    NAME = "freebsd" if sys.platform.startswith("freebsd") else "dragonfly"
    PEER_MECHANISM = "LOCAL_PEERCRED (struct xucred)"
    MESSAGE_MECHANISM = "SCM_CREDS (struct cmsgcred)"
    # sizeof(struct xucred): the trailing union is pointer-sized.
    _PEER_OPT = (SOL_LOCAL, getattr(socket, "LOCAL_PEERCRED", 1), 76 + 2 * _PTR - 4)
    _CREDS_OPT = 3 if NAME == "freebsd" else None  # LOCAL_CREDS_PERSISTENT
    SCM_CREDS = getattr(socket, "SCM_CREDS", 0x03)
    SCM_CREDS2 = 0x08 if NAME == "freebsd" else None

#: Room for one credentials item with up to 16 groups (sockcred2 is the largest).
CREDENTIALS_SPACE = socket.CMSG_SPACE(28 + 4 * 16) if hasattr(socket, "CMSG_SPACE") else 256


def peer(
    sock: socket.socket, want_pidfd: bool
) -> tuple[DecodedCredentials, int | None]:  # pragma: no cover - not Linux
    """The peer's credentials (this platform has no pidfd)."""
    level, opt, size = _PEER_OPT
    raw = sock.getsockopt(level, opt, size)
    if NAME == "netbsd":
        return parse_unpcbid(raw), None
    if NAME == "openbsd":
        return parse_openbsd_sockpeercred(raw), None
    return parse_freebsd_xucred(raw, pointer_size=_PTR), None


def enable_passcred(sock: socket.socket, on: bool, pidfd: bool) -> None:  # pragma: no cover
    if pidfd:
        raise UnsupportedFeature("per-message pidfds (SCM_PIDFD) exist only on Linux 6.5+")
    if _CREDS_OPT is None:
        if NAME == "openbsd":
            raise UnsupportedFeature("OpenBSD has no per-message credentials")
        return  # DragonFly: the sender attaches SCM_CREDS itself
    sock.setsockopt(SOL_LOCAL, _CREDS_OPT, int(on))


def credentials_item(
    pid: int | None, uid: int | None, gid: int | None
) -> tuple[int, int, bytes]:  # pragma: no cover
    """An empty ``struct cmsgcred`` for the kernel to fill in (FreeBSD/DragonFly)."""
    if MESSAGE_MECHANISM is None or NAME == "netbsd":
        raise UnsupportedFeature(f"{NAME} has no sender-attached credentials")
    if pid is not None or uid is not None or gid is not None:
        raise UnsupportedFeature(
            f"{NAME} fills SCM_CREDS in itself: a sender cannot claim other ids"
        )
    return (SOL_SOCKET, SCM_CREDS, bytes(CMSGCRED_SIZE))


def decode_cmsg(
    level: int, kind: int, data: bytes
) -> DecodedCredentials | None:  # pragma: no cover
    if level != SOL_SOCKET:
        return None
    if SCM_CREDS2 is not None and kind == SCM_CREDS2:
        return parse_freebsd_sockcred2(data)
    if kind != SCM_CREDS or MESSAGE_MECHANISM is None:
        return None
    if NAME == "netbsd":
        return parse_netbsd_sockcred(data)
    if len(data) == CMSGCRED_SIZE:
        return parse_cmsgcred(data)
    return parse_freebsd_sockcred(data)


def is_pidfd_cmsg(level: int, kind: int) -> bool:
    return False


def peer_uid(sock: socket.socket) -> int:
    """The peer's effective uid (through :func:`peer`: this system has no cheaper call)."""
    return peer(sock, False)[0].uid
