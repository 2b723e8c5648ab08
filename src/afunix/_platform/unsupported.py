"""Credentials on a system afunix does not know: every call says so clearly."""

from __future__ import annotations

import socket
import sys

from .._credstructs import DecodedCredentials
from .._errors import UnsupportedFeature

NAME = sys.platform
PEER_MECHANISM = "none"
MESSAGE_MECHANISM: str | None = None
CREDENTIALS_SPACE = 0


def _unsupported(what: str) -> UnsupportedFeature:
    return UnsupportedFeature(
        f"{what} is not supported on this system ({sys.platform}): afunix knows Linux, "
        "FreeBSD, DragonFly, NetBSD, OpenBSD and macOS. Authorize clients with the socket "
        "file's permissions instead (listen(..., mode=0o660, group=...))"
    )


def peer(sock: socket.socket, want_pidfd: bool) -> tuple[DecodedCredentials, int | None]:
    raise _unsupported("reading a peer's credentials")


def has_pidfd() -> bool | None:
    return False


def pidfd_exited(pidfd: int, timeout: float | None = 0.0) -> bool:
    raise _unsupported("pidfd")


def pidfd_pid(pidfd: int) -> int | None:
    raise _unsupported("pidfd")


def process_facts(
    pid: int, pidfd: int | None
) -> tuple[str | None, tuple[str, ...] | None, str | None, bool]:
    return None, None, None, False


def enable_passcred(sock: socket.socket, on: bool, pidfd: bool) -> None:
    raise _unsupported("receiving per-message credentials")


def credentials_item(pid: int | None, uid: int | None, gid: int | None) -> tuple[int, int, bytes]:
    raise _unsupported("sending credentials")


def decode_cmsg(level: int, kind: int, data: bytes) -> DecodedCredentials | None:
    return None


def is_pidfd_cmsg(level: int, kind: int) -> bool:
    return False


def find_socket_holder(path: bytes) -> str | None:  # pragma: no cover - not Linux
    """Nothing is known about who holds a socket here."""
    return None


def peer_uid(sock: socket.socket) -> int:
    """The peer's effective uid (through :func:`peer`: this system has no cheaper call)."""
    return peer(sock, False)[0].uid
