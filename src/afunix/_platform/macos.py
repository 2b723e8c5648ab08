"""macOS credentials: ``LOCAL_PEERCRED`` (``struct xucred``) plus ``LOCAL_PEERPID``.

Not exercised on the Linux CI machine; the ``xucred`` layout is decoded by
:mod:`afunix._credstructs` and tested there on byte tables. macOS's
``xucred`` has no pid, so a second call, ``LOCAL_PEERPID``, gets it. Both
are recorded at connect time. macOS has no per-message credentials for
Unix-domain sockets (it defines ``SCM_CREDS`` but does not deliver it).
"""

from __future__ import annotations

import socket
from dataclasses import replace

from .._credstructs import MACOS_XUCRED_SIZE, DecodedCredentials, parse_macos_xucred, parse_pid
from .._errors import UnsupportedFeature
from ._nopidfd import find_socket_holder as find_socket_holder
from ._nopidfd import has_pidfd as has_pidfd
from ._nopidfd import pidfd_exited as pidfd_exited
from ._nopidfd import pidfd_pid as pidfd_pid
from ._nopidfd import process_facts as process_facts

NAME = "macos"
PEER_MECHANISM = "LOCAL_PEERCRED (struct xucred) + LOCAL_PEERPID"
MESSAGE_MECHANISM: str | None = None

SOL_LOCAL = 0
LOCAL_PEERCRED: int = getattr(socket, "LOCAL_PEERCRED", 0x001)
LOCAL_PEERPID: int = getattr(socket, "LOCAL_PEERPID", 0x002)
CREDENTIALS_SPACE = 0


def peer(
    sock: socket.socket, want_pidfd: bool
) -> tuple[DecodedCredentials, int | None]:  # pragma: no cover - not Linux
    """``LOCAL_PEERCRED`` then ``LOCAL_PEERPID`` (macOS has no pidfd)."""
    creds = parse_macos_xucred(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, MACOS_XUCRED_SIZE))
    pid = parse_pid(sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID, 4))
    return replace(creds, pid=pid), None


def _no_messages() -> UnsupportedFeature:
    return UnsupportedFeature(
        "macOS has no per-message credentials on Unix-domain sockets; use a stream "
        "socket and peer credentials (LOCAL_PEERCRED) instead"
    )


def enable_passcred(sock: socket.socket, on: bool, pidfd: bool) -> None:  # pragma: no cover
    raise _no_messages()


def credentials_item(
    pid: int | None, uid: int | None, gid: int | None
) -> tuple[int, int, bytes]:  # pragma: no cover
    raise _no_messages()


def decode_cmsg(level: int, kind: int, data: bytes) -> DecodedCredentials | None:
    return None


def is_pidfd_cmsg(level: int, kind: int) -> bool:
    return False


def peer_uid(sock: socket.socket) -> int:
    """The peer's effective uid (through :func:`peer`: this system has no cheaper call)."""
    return peer(sock, False)[0].uid
