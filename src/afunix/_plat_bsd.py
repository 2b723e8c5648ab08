"""BSD and macOS specifics. Not exercised on the Linux CI machine."""

from __future__ import annotations


def find_socket_holder(path: bytes) -> str | None:  # pragma: no cover - not Linux
    """BSDs have no ``/proc/net/unix``; ``sockstat``/``lsof`` would be needed."""
    return None
