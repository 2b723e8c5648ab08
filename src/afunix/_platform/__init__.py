"""What the running system can do, decided once at import: :data:`PLATFORM`.

The rest of afunix never tests ``sys.platform``: it asks this package.
:func:`detect` is the only OS test. It picks one backend module, which does
everything that differs between systems (peer and per-message credentials,
pidfds, ``/proc``, who holds a socket path):

* :mod:`~afunix._platform.linux`: ``SO_PEERCRED``, ``SCM_CREDENTIALS``, pidfds;
* :mod:`~afunix._platform.bsd`: FreeBSD, DragonFly, NetBSD, OpenBSD;
* :mod:`~afunix._platform.macos`;
* :mod:`~afunix._platform.unsupported`: every call says clearly it cannot.

Credentials and sockets ask the same object, so they cannot disagree (before,
OpenBSD, which has ``SO_PEERCRED``, was "linux" for addresses and BSD for
credentials). Each backend is checked against :class:`Backend` by mypy.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from .._credstructs import DecodedCredentials

#: Flags for every send of the library: ``MSG_NOSIGNAL``, so that writing to a
#: peer that has gone raises ``BrokenPipeError`` instead of killing a process
#: whose ``SIGPIPE`` is at its default. (0 where the flag does not exist; macOS
#: would need ``SO_NOSIGPIPE`` on the socket instead.)
NOSIGNAL: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))


class Backend(Protocol):
    """What each backend module provides."""

    NAME: str
    PEER_MECHANISM: str
    MESSAGE_MECHANISM: str | None
    CREDENTIALS_SPACE: int

    def peer(
        self, sock: socket.socket, want_pidfd: bool
    ) -> tuple[DecodedCredentials, int | None]: ...
    def peer_uid(self, sock: socket.socket) -> int: ...
    def has_pidfd(self) -> bool | None: ...
    def pidfd_exited(self, pidfd: int, timeout: float | None = 0.0) -> bool: ...
    def pidfd_pid(self, pidfd: int) -> int | None: ...
    def process_facts(
        self, pid: int, pidfd: int | None
    ) -> tuple[str | None, tuple[str, ...] | None, str | None, bool]: ...
    def enable_passcred(self, sock: socket.socket, on: bool, pidfd: bool) -> None: ...
    def credentials_item(
        self, pid: int | None, uid: int | None, gid: int | None
    ) -> tuple[int, int, bytes]: ...
    def decode_cmsg(self, level: int, kind: int, data: bytes) -> DecodedCredentials | None: ...
    def is_pidfd_cmsg(self, level: int, kind: int) -> bool: ...
    def find_socket_holder(self, path: bytes) -> str | None: ...


if TYPE_CHECKING:  # mypy checks every backend against Backend, whatever runs here
    from . import bsd as _bsd
    from . import linux as _linux
    from . import macos as _macos
    from . import unsupported as _unsupported

    _checked: tuple[Backend, ...] = (_linux, _bsd, _macos, _unsupported)


@dataclass(frozen=True)
class Platform:
    """Facts about Unix-domain sockets on this system, and its backend."""

    name: str
    #: Size of ``sun_path`` in ``struct sockaddr_un``, including the NUL.
    sun_path_size: int
    #: Whether the Linux abstract namespace (``@name``) exists.
    has_abstract: bool
    #: Whether ``bind`` of an empty address autobinds a unique abstract name.
    has_autobind: bool
    #: ``offsetof(struct sockaddr_un, sun_path)``.
    sun_path_offset: int
    backend: Backend
    #: Whether a socket from ``accept`` may inherit the listener's ``O_NONBLOCK`` (the
    #: BSDs and macOS: yes; Linux: never), so that it must be made blocking again.
    accepted_may_be_nonblocking: bool = True

    @property
    def max_path_bytes(self) -> int:
        """Longest pathname (in bytes, without its NUL) that fits ``sun_path``."""
        return self.sun_path_size - 1

    @property
    def max_abstract_bytes(self) -> int:
        """Longest abstract name (without the leading NUL)."""
        return self.sun_path_size - 1


_BSDS = ("freebsd", "dragonfly", "netbsd", "openbsd")


def detect() -> Platform:
    """The platform this process runs on: the only OS test of afunix.

    Linux by feature test (the socket module has ``SO_PEERCRED``,
    ``SO_PASSCRED`` and ``SCM_CREDENTIALS``: OpenBSD has the first only);
    macOS and the BSDs by ``sys.platform``; anything else is unsupported
    (sockets work, credentials say they cannot).
    """
    if all(hasattr(socket, n) for n in ("SO_PEERCRED", "SO_PASSCRED", "SCM_CREDENTIALS")):
        from . import linux

        return Platform("linux", 108, True, True, 2, linux, accepted_may_be_nonblocking=False)
    # sockaddr_un elsewhere: sun_len, sun_family (one byte each), sun_path[104].
    if sys.platform == "darwin":  # pragma: no cover - not this machine
        from . import macos

        return Platform("macos", 104, False, False, 2, macos)
    if sys.platform.startswith(_BSDS):  # pragma: no cover - not this machine
        from . import bsd

        return Platform("bsd", 104, False, False, 2, bsd)
    from . import unsupported  # pragma: no cover - not this machine

    return Platform(sys.platform, 104, False, False, 2, unsupported)  # pragma: no cover


PLATFORM: Final[Platform] = detect()
