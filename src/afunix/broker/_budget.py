"""What the broker lets its clients use: descriptors, connections, requests.

Three budgets, each from the policy's ``[limits]``:

* **descriptors**, against ``RLIMIT_NOFILE`` (:func:`descriptor_budget`): a
  connection holds at most :data:`FDS_PER_CONNECTION`, the broker keeps
  :data:`FDS_RESERVE` for itself, and ``max_clients``,
  ``connections_per_peer`` and the append pipes are lowered to fit;
* **per uid** (:class:`PeerState`): the connections a uid holds and its token
  bucket of requests per second;
* **per connection**: descriptors sent and not yet read (:func:`unread_bytes`,
  :func:`drained`).

The names of the descriptor budget are public as
``afunix.broker.server.DescriptorBudget`` and so on (re-exported there).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import resource
import socket
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from .policy import BrokerLimits

__all__ = [
    "FDS_PER_CONNECTION",
    "FDS_RESERVE",
    "DescriptorBudget",
    "PeerState",
    "descriptor_budget",
    "drained",
    "unread_bytes",
]

#: Descriptors one connection may hold at once: its socket and a duplicate of it (for
#: the goodbye, see ``Serving._goodbye``), the peer's pidfd, one arriving descriptor
#: (closed with its request), and an open in progress (the rule's root, a step of the
#: ``walk`` resolver, its parent, the file).
FDS_PER_CONNECTION: Final = 8
#: Descriptors kept for the broker itself on top of those open when it starts (the
#: listener, its selector, the audit log reopened, a policy re-read, ``/proc`` reads).
FDS_RESERVE: Final = 32

_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes we sent that the peer has not read yet (``SIOCOUTQ``)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _SIOCOUTQ, buf, True)
    except OSError:
        return 0
    return buf[0]


def drained(sock: socket.socket, limits: BrokerLimits) -> bool:
    """Whether the peer reads what was sent to it (all of it) within ``in_flight_timeout``."""
    deadline = time.monotonic() + limits.in_flight_timeout
    while time.monotonic() < deadline:
        if unread_bytes(sock) == 0:
            return True
        time.sleep(0.005)
    return False


@dataclass(frozen=True)
class DescriptorBudget:
    """How many connections fit the descriptor limit (see :func:`descriptor_budget`)."""

    #: The soft ``RLIMIT_NOFILE`` the budget was made for.
    nofile: int
    #: Descriptors kept for the broker itself.
    reserve: int
    #: Connections served at once (``max_clients``, lowered to fit).
    clients: int
    #: Most connections one uid may hold: half of those that fit.
    per_uid: int
    #: Append pipes open at once in all (two descriptors each: the pipe's read end and
    #: the file), within an eighth of the descriptors left after the reserve.
    appends: int = 0

    def per_peer(self, limits: BrokerLimits) -> int:
        """``connections_per_peer`` of *limits* (a reloaded policy too), within the budget."""
        return min(limits.connections_per_peer, self.per_uid)

    def append_pipes(self, limits: BrokerLimits) -> tuple[int, int]:
        """``(append_pipes_per_peer, max_append_pipes)`` of *limits*, within the budget:
        one uid gets at most half of the append pipes there is room for."""
        total = min(limits.max_append_pipes, self.appends)
        return min(limits.append_pipes_per_peer, max(1, total // 2)), total


def _open_descriptors() -> int:
    for where in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(where)) - 1  # less the one listdir used
    return 0


def descriptor_budget(
    limits: BrokerLimits, *, rules: int = 0, nofile: int | None = None, open_now: int | None = None
) -> DescriptorBudget:
    """Fit *limits* to the descriptor limit.

    ``reserve = open_now + FDS_RESERVE + rules`` (one descriptor per rule, for
    its root); append pipes get at most an eighth of the rest,
    ``appends = min(max_append_pipes, (nofile - reserve) // 16)`` (two descriptors
    each); ``room = (nofile - reserve - 2 * appends) // FDS_PER_CONNECTION``
    connections fit;
    ``clients = min(max_clients, room)`` and ``per_uid = room // 2``
    (:meth:`DescriptorBudget.per_peer` gives ``min(connections_per_peer, per_uid)``):
    one uid never holds more than half of the descriptors there are room for.
    *nofile* defaults to the soft ``RLIMIT_NOFILE``, *open_now* to the descriptors
    open now.

    Raises ``OSError(EMFILE)`` if fewer than 2 connections fit: the limit is too
    low to run a broker at all.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 30
    if open_now is None:
        open_now = _open_descriptors()
    reserve = open_now + FDS_RESERVE + rules
    appends = max(0, min(limits.max_append_pipes, (nofile - reserve) // 16))
    room = (nofile - reserve - 2 * appends) // FDS_PER_CONNECTION
    if room < 2:
        need = reserve + 2 * FDS_PER_CONNECTION + 2  # and one append pipe
        raise OSError(
            errno.EMFILE,
            f"the descriptor limit (RLIMIT_NOFILE {nofile}) is too low for the broker: it "
            f"keeps {reserve} for itself and needs {FDS_PER_CONNECTION} per connection; "
            f"raise it to at least {need} (ulimit -n, or LimitNOFILE= under systemd)",
        )
    return DescriptorBudget(
        nofile,
        reserve,
        min(limits.max_clients, room),
        max(1, room // 2),
        appends,
    )


@dataclass
class PeerState:
    """Per-uid accounting: open connections and a token bucket."""

    tokens: float
    stamp: float
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, limits: BrokerLimits) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(
                float(limits.burst), self.tokens + (now - self.stamp) * limits.requests_per_second
            )
            self.stamp = now
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True
