"""A server's listening socket: where it comes from, who hears that it accepts, how it stops.

Where it comes from (:meth:`ListeningSocket.acquire`): the caller's socket,
else a predecessor's hand-over (``$AFUNIX_HANDOFF_FD``), else systemd socket
activation (``LISTEN_FDS``), else ``listen()``. Who hears (:meth:`~ListeningSocket.announce`):
the predecessor (its READY), the service manager (``READY=1``, ``FDSTORE=1``,
``STOPPING=1``, ``WATCHDOG=1``) and the server's ``on_ready``. How it stops:
:meth:`~ListeningSocket.request_stop` (thread- and signal-safe) wakes whichever
runner serves it, which then calls :meth:`~ListeningSocket.stop_accepting`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from .._activation import listen_fds, watchdog_interval
from .._address import Address, AddressLike
from .._connect import check_tls, requires_client_certificates, tcp_of
from .._errors import AfunixError
from .._handoff import Takeover, offer, reap_failed, spawn_successor, take_over
from .._notify import notify
from .._sockets import Socket, listen, refuse_exposed

__all__ = ["PAUSE_ERRNOS", "ListeningSocket", "somaxconn", "watchdog_period", "watchdog_ping"]

log = logging.getLogger("afunix.server")

#: ``accept`` errors that mean "out of descriptors or memory": the accept loop
#: pauses briefly (clients wait in the listen queue) instead of stopping.
PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@functools.cache
def somaxconn() -> int:
    """The system's cap on a listen queue: ``net.core.somaxconn``, read once.

    The default ``backlog`` of a :class:`Server` (as in Go's ``net`` package): a
    burst of clients larger than the queue is refused (``EAGAIN``) or made to
    wait, so the server asks for as much as the kernel allows. Falls back to
    :data:`socket.SOMAXCONN` where ``/proc`` cannot say.
    """
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


def watchdog_period() -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, or ``None``."""
    interval = watchdog_interval()
    if interval is None:
        return None
    log.info("systemd watchdog: %gs; sending WATCHDOG=1 every %gs", interval, interval / 2)
    return interval / 2


def watchdog_ping() -> None:
    """Send ``WATCHDOG=1`` (from a serving loop: a stuck loop stops pinging)."""
    try:
        notify({"WATCHDOG": 1})
    except OSError as exc:  # the manager went away: nothing to tell, keep serving
        log.debug("WATCHDOG=1 not sent: %s", exc)


class ListeningSocket:
    """One server's listener and the signals around it.

    Attributes: ``sock``, ``type`` (the server's socket type), ``address``,
    ``origin`` (``"given"``, ``"handoff"``, ``"activation"`` or ``"bound"``),
    ``fdstore``, ``on_ready`` (called once accepting), ``handed_over_to``;
    ``ready`` and ``stopping`` (events); ``wake_r`` (readable once a stop is
    requested: a ``select`` waits on it); ``on_stop`` (how a stop request wakes
    an event loop, set by the asyncio runner while it serves).
    """

    def __init__(
        self,
        sock: socket.socket,
        sock_type: int,
        origin: str,
        takeover: Takeover | None = None,
        tls: Any = None,
    ) -> None:
        self.sock = sock
        self.type = sock_type
        self.origin = origin
        self._takeover = takeover
        #: The server's ``ssl.SSLContext`` (``tls://``): each client shakes hands first.
        self.tls = tls
        self.address: Address = Address.from_sockaddr(sock.family, sock.getsockname())
        if tls is not None:
            self.address = Address.tls(self.address.host, self.address.port or 0)
        self.fdstore = False
        self.on_ready: Callable[[], None] | None = None
        self.handed_over_to: int | None = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.on_stop: Callable[[], None] | None = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    @classmethod
    def acquire(
        cls,
        address: AddressLike,
        sock_type: int,
        *,
        sock: socket.socket | None = None,
        inherit: bool = True,
        backlog: int | None = None,
        mode: int | None = None,
        owner: str | int | None = None,
        group: str | int | None = None,
        parent_mode: int | None = None,
        allow_remote: bool = False,
        ssl: Any = None,
    ) -> ListeningSocket:
        """*sock* if given; else, with *inherit*, a hand-over's or activation's socket;
        else ``listen(address, ...)`` with *backlog* (default :func:`somaxconn`).

        A ``tcp://`` address other hosts can reach is refused (``EACCES``,
        :func:`~afunix._sockets.refuse_exposed`) unless *allow_remote*, and so
        is a ``tls://`` one unless *ssl* requires client certificates: checked
        as resolved before binding and as bound after. A socket given, handed
        over or activated is the caller's choice and is not checked. ``tls://``
        needs *ssl* (a server ``ssl.SSLContext``) and a stream socket.
        """
        addr = Address.parse(address)
        tls = ssl if check_tls(addr, ssl) else None
        if tls is not None and sock_type != socket.SOCK_STREAM:
            raise AfunixError(errno.EINVAL, f"{addr}: TLS runs over stream sockets only")
        if sock is not None:
            return cls(sock, sock_type, "given", tls=tls)
        takeover = take_over() if inherit else None
        if takeover is not None:
            return cls(takeover.sock, sock_type, "handoff", takeover, tls=tls)
        activated = _activated(sock_type) if inherit else None
        if activated is not None:
            return cls(activated, sock_type, "activation", tls=tls)
        authenticated = requires_client_certificates(tls)
        addr = refuse_exposed(addr, allow_remote=allow_remote, authenticated=authenticated)
        bound = listen(
            tcp_of(addr),
            sock_type,
            backlog=somaxconn() if backlog is None else backlog,
            mode=mode,
            owner=owner,
            group=group,
            parent_mode=parent_mode,
        )
        try:  # bound now: check the address the name gave
            refuse_exposed(addr, allow_remote=allow_remote, sock=bound, authenticated=authenticated)
        except BaseException:
            bound.close()
            raise
        return cls(bound, sock_type, "bound", tls=tls)

    def announce(self) -> None:
        """Called once the server accepts: tell whoever waits for that."""
        self.ready.set()
        if self._takeover is not None:
            takeover, self._takeover = self._takeover, None
            try:
                takeover.ready()
            except OSError as exc:  # the old process is gone: nothing to tell
                log.warning("could not tell the previous server we took over: %s", exc)
        notify({"READY": 1, "STATUS": f"accepting on {self.address.describe()}"})
        if self.fdstore:
            # Park the listener with the service manager: after a restart it comes
            # back through LISTEN_FDS, and no client sees the socket missing.
            notify({"FDSTORE": 1, "FDNAME": "afunix-listener"}, fds=[self.sock.fileno()])
        if self.on_ready is not None:
            self.on_ready()

    def hand_over(self, argv: list[str] | None = None, timeout: float = 10.0) -> int:
        """Start a successor, give it the listening socket, then stop accepting.

        See :meth:`afunix.Server.hand_over`. Returns the successor's pid; if it
        fails, raises and this server keeps serving.
        """
        pid, channel = spawn_successor(argv)
        try:
            offer(channel, self.sock, timeout)
        except BaseException:
            reap_failed(pid)
            raise
        finally:
            channel.close()
        if isinstance(self.sock, Socket):
            self.sock._bound = None  # the file is the successor's now: never unlink it
        self.handed_over_to = pid
        log.info("handed %s over to pid %d", self.address.describe(), pid)
        self.request_stop()
        return pid

    def hand_over_in_background(self) -> None:
        """:meth:`hand_over` on a thread of its own (from a ``SIGUSR2`` handler)."""

        def run() -> None:
            try:
                self.hand_over()
            except Exception as exc:
                log.error("hand-over failed, still serving: %s", exc)

        threading.Thread(target=run, name="afunix-handover", daemon=True).start()

    def request_stop(self) -> None:
        """Ask the runner to stop accepting (thread- and signal-safe); returns at once."""
        if not self.stopping.is_set():
            self.stopping.set()
            with contextlib.suppress(OSError):
                notify({"STOPPING": 1, "STATUS": "stopping: finishing connections in flight"})
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")
        wake_loop = self.on_stop
        if wake_loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                wake_loop()

    def stop_accepting(self) -> None:
        """Close a stream/seqpacket listener (removing its file) before draining.

        While connections in flight finish, new clients must not queue on a
        listener nobody accepts from: with the file gone they get ``ENOENT`` at
        once. A datagram socket stays open: replies still leave through it.
        """
        if self.type != socket.SOCK_DGRAM:
            self.sock.close()

    def close_in_child(self, keep_listener: bool = False) -> None:
        """In a forked child: drop the wake-up pair and the listener (not its file)."""
        self.wake_r.close()
        self.wake_w.close()
        if keep_listener:
            return
        # Close the inherited listening descriptor but keep the file: it is the
        # parent's. detach() makes Socket.close() forget the path.
        fd = self.sock.detach() if isinstance(self.sock, Socket) else self.sock.fileno()
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Close the listening socket (removing its file if still ours)."""
        self.sock.close()
        self.wake_r.close()
        self.wake_w.close()


def _activated(sock_type: int) -> socket.socket | None:
    """The service manager's socket of *sock_type* (socket activation), if it passed any."""
    activated = listen_fds()
    if not activated:
        return None
    mine = [a for a in activated if a.sock.type == sock_type]
    if not mine:
        for a in activated:
            a.sock.close()
        raise AfunixError(
            errno.EPROTOTYPE,
            f"socket activation passed {len(activated)} socket(s), none of type "
            f"{sock_type!r} that this server serves",
        )
    for extra in activated:
        if extra is not mine[0]:
            log.warning("ignoring activated socket %r: one listener per Server", extra.name)
            extra.sock.close()
    return mine[0].sock
