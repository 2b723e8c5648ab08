"""What the systems without pidfds and without a safe ``/proc`` share (BSDs, macOS).

Imported by :mod:`afunix._platform.bsd` and :mod:`afunix._platform.macos`, so that each
platform module keeps only what really differs.
"""

from __future__ import annotations

from .._errors import UnsupportedFeature


def has_pidfd() -> bool | None:
    return False


def pidfd_exited(pidfd: int, timeout: float | None = 0.0) -> bool:  # pragma: no cover
    raise UnsupportedFeature("pidfds exist only on Linux")


def pidfd_pid(pidfd: int) -> int | None:  # pragma: no cover
    raise UnsupportedFeature("pidfds exist only on Linux")


def process_facts(
    pid: int, pidfd: int | None
) -> tuple[str | None, tuple[str, ...] | None, str | None, bool]:  # pragma: no cover
    """No ``/proc`` to read safely here: nothing is known beyond the ids."""
    return None, None, None, False


def find_socket_holder(path: bytes) -> str | None:  # pragma: no cover - not Linux
    """No ``/proc/net/unix`` here (``sockstat``/``lsof`` would be needed): unknown."""
    return None
