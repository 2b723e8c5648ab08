"""What the running system can do, decided once at import.

The rest of afunix never tests ``sys.platform``: it asks this module. Each
system family has its own module (:mod:`afunix._plat_linux`,
:mod:`afunix._plat_bsd`); :data:`PLATFORM` is the one that fits, picked by
feature test (does ``SO_PEERCRED`` exist? does ``/proc/net/unix`` exist?).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Final, Protocol

#: Flags for every send of the library: ``MSG_NOSIGNAL``, so that writing to a
#: peer that has gone raises ``BrokenPipeError`` instead of killing a process
#: whose ``SIGPIPE`` is at its default. (0 where the flag does not exist; macOS
#: would need ``SO_NOSIGPIPE`` on the socket instead.)
NOSIGNAL: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))


class _Backend(Protocol):
    def find_socket_holder(self, path: bytes) -> str | None: ...


@dataclass(frozen=True)
class Platform:
    """Facts about Unix-domain sockets on this system."""

    name: str
    #: Size of ``sun_path`` in ``struct sockaddr_un``, including the NUL.
    sun_path_size: int
    #: Whether the Linux abstract namespace (``@name``) exists.
    has_abstract: bool
    #: Whether ``bind`` of an empty address autobinds a unique abstract name.
    has_autobind: bool
    #: ``offsetof(struct sockaddr_un, sun_path)``.
    sun_path_offset: int
    backend: _Backend

    @property
    def max_path_bytes(self) -> int:
        """Longest pathname (in bytes, without its NUL) that fits ``sun_path``."""
        return self.sun_path_size - 1

    @property
    def max_abstract_bytes(self) -> int:
        """Longest abstract name (without the leading NUL)."""
        return self.sun_path_size - 1


def _detect() -> Platform:
    if hasattr(socket, "SO_PEERCRED"):
        from . import _plat_linux

        return Platform(
            name="linux",
            sun_path_size=108,
            has_abstract=True,
            has_autobind=True,
            sun_path_offset=2,
            backend=_plat_linux,
        )
    from . import _plat_bsd  # pragma: no cover - not this machine

    return Platform(  # pragma: no cover
        name="bsd",
        sun_path_size=104,
        has_abstract=False,
        has_autobind=False,
        sun_path_offset=2,
        backend=_plat_bsd,
    )


PLATFORM: Platform = _detect()
