"""``Limits``: what one client connection of a server may use (design guide, section 5).

A base-layer module (it imports nothing of afunix), so that servers, channels
and the broker can all name the same limits without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-connection limits a server applies; exceeding one closes that connection.

    Attributes:
        idle_timeout: seconds a client may stay silent while the handler waits
            for it (``recv``); ``None``: forever.
        send_timeout: seconds a client may leave the server's writes unread
            (a client that never reads); ``None``: forever. Both apply to
            ``conn.recv``/``conn.send``, and to the channel of ``conn.channel()``
            (sync and async) as its ``idle_timeout`` and ``send_timeout``
            (:class:`~afunix.PeerTimeout`, whose ``expired`` says which).
        max_message: the largest message a :meth:`Connection.channel` accepts,
            in bytes (the per-connection buffer limit).
        max_fds_per_message: descriptors accepted with one message (D-Bus: 16).
        max_fds_in_flight: descriptors a connection may have received and not
            yet handed to the handler (D-Bus: 64).
    """

    idle_timeout: float | None = None
    send_timeout: float | None = None
    max_message: int = 1 << 20
    max_fds_per_message: int = 16
    max_fds_in_flight: int = 64

    def channel_options(self) -> dict[str, Any]:
        return {
            "max_size": self.max_message,
            "maxfds": self.max_fds_per_message,
            "max_fds_in_flight": self.max_fds_in_flight,
            "idle_timeout": self.idle_timeout,
            "send_timeout": self.send_timeout,
        }


DEFAULT_LIMITS = Limits()
