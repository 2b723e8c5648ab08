"""Servers: one listening socket, a handler, and a concurrency model (UNP 15.5, 15.6).

A handler is a function of one argument. For stream and seqpacket servers
it gets a :class:`Connection` (``model="thread"`` or ``"fork"``) or an
:class:`AsyncConnection` (``model="asyncio"``, the default, with an
``async def`` handler)::

    import afunix

    async def echo(conn: afunix.AsyncConnection) -> None:
        while data := await conn.recv():
            await conn.send(data)

    afunix.Server("/tmp/echo.sock", echo).serve_forever()

    def echo_sync(conn: afunix.Connection) -> None:
        for chunk in conn:              # until the client closes
            conn.send(chunk)

    afunix.Server("/tmp/echo.sock", echo_sync, model="fork").serve_forever()

For datagram servers the handler gets a :class:`Datagram` and returns the
reply (``bytes``) or ``None``; the reply goes to the sender's address, which
exists only if the client bound one (UNP 15.4 point 8).

The models:

``asyncio``
    one event loop, a task per connection; scales to many idle connections.
``thread``
    a thread per connection (``max_clients``, 256 unless given, bounds them;
    past it new clients wait in the listen queue).
``fork``
    the book's model: a child process per connection, the listening socket
    closed in the child, ``SIGCHLD`` reaped with a ``waitpid(WNOHANG)`` loop
    and ``accept`` restarted after ``EINTR``. Only the server's *own*
    children are reaped (``waitpid(pid)`` for each, not ``waitpid(-1)``),
    so a library user's ``subprocess`` children keep their exit status.

``SIGTERM`` and ``SIGINT`` (when serving in the main thread) stop accepting,
let connections in flight finish for up to ``shutdown_timeout`` seconds,
then close the rest and remove the socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
import os
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ._activation import listen_fds, watchdog_interval
from ._address import Address, AddressLike
from ._creds import PeerCredentials, enable_credentials, peer_credentials, recv_credentials
from ._errors import AfunixError, PeerError, PeerTimeout, ProtocolError, UnsupportedFeature
from ._handoff import Takeover, offer, reap_failed, spawn_successor, take_over
from ._notify import notify
from ._platform import NOSIGNAL
from ._sockets import Socket, SocketTypeLike, listen, socket_type
from .aio import AsyncChannel
from .channel import Channel
from .policy import PeerPolicy

__all__ = [
    "AsyncConnection",
    "Connection",
    "Datagram",
    "Handler",
    "Model",
    "Server",
]

log = logging.getLogger("afunix.server")

Model: TypeAlias = Literal["asyncio", "thread", "fork"]
Handler: TypeAlias = Callable[[Any], Any]
Verifier: TypeAlias = Callable[[socket.socket, Address], bool]

_BUFSIZE = 65536

#: ``max_clients`` of a ``model="thread"`` server when none is given: a thread per
#: client is a task the kernel counts against ``RLIMIT_NPROC``, so the model is
#: bounded by default; more clients wait in the listen queue.
THREAD_MAX_CLIENTS = 256

#: Seconds the accept loop pauses after running out of descriptors, threads or
#: processes: clients that arrive meanwhile wait in the listen queue.
_PAUSE = 0.1

#: Seconds between two log lines about clients refused for one reason.
REFUSAL_LOG_INTERVAL = 10.0

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERCRED: int | None = (
    getattr(socket, "SO_PEERCRED", None) if sys.platform.startswith("linux") else None
)


def _peer_uid(conn: socket.socket) -> int:
    """The client's effective uid at ``connect`` time.

    On Linux one ``SO_PEERCRED`` ``getsockopt``, no groups, no pidfd: cheap
    enough to run on every accepted connection before anything else.
    """
    if _SO_PEERCRED is not None:
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(raw)[1])
    with peer_credentials(conn, pidfd=False) as creds:  # pragma: no cover - not Linux
        return creds.uid


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end before we accepted it, sending nothing.

    Such a connection can neither ask nor hear anything: a handler would only
    see end of file. One ``recv(MSG_PEEK)``; a client still connected (the
    usual case) makes it fail with ``EAGAIN``. ``POLLHUP`` tells a closed
    client from one that only shut down its writing side and waits for a reply.
    """
    try:
        if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return False
    except OSError:
        return False
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in poller.poll(0))


class _Refusals:
    """Clients turned away without a handler, counted by reason and logged in aggregate.

    A flood must not turn into a flood of log lines: the first refusal for a
    reason is logged at once, later ones are counted, and the count is logged
    with the next refusal that comes :data:`REFUSAL_LOG_INTERVAL` seconds after
    the last line, and at shutdown. Used by the accepting thread only.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        #: Refusals since the server started, by reason.
        self.counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def add(self, reason: str, detail: str) -> None:
        """Count one refusal; log *detail* unless a line for *reason* went out recently."""
        total = self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.interval:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._logged_at[reason] = now
        self._unlogged.pop(reason, None)
        log.warning(
            "%s (%s: %d refused so far; logged at most every %gs)",
            detail,
            reason,
            total,
            self.interval,
        )

    def flush(self) -> None:
        """Log what was counted and not yet logged (at shutdown)."""
        for reason, n in sorted(self._unlogged.items()):
            log.warning("%s: %d more client(s) refused, %d in all", reason, n, self.counts[reason])
        self._unlogged.clear()


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


@dataclass(frozen=True)
class Limits:
    """Per-connection limits a server applies; exceeding one closes that connection.

    Attributes:
        idle_timeout: seconds a client may stay silent while the handler waits
            for it (``recv``); ``None``: forever.
        send_timeout: seconds a client may leave the server's writes unread
            (a client that never reads); ``None``: forever. Both apply to
            ``conn.recv``/``conn.send``; a sync ``conn.channel()`` gets the
            shorter of the two as its socket timeout, both ways. Inside an
            asyncio handler's channel, bound waits with ``asyncio.timeout()``.
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
        }

    @property
    def channel_timeout(self) -> float | None:
        """The one socket timeout a sync channel gets: a channel cannot tell a
        receive from a send apart, so the shorter of the two applies to both."""
        given = [t for t in (self.idle_timeout, self.send_timeout) if t is not None]
        return min(given) if given else None


DEFAULT_LIMITS = Limits()


class _Peer:
    """What both connection kinds know about the client: its address and credentials."""

    sock: socket.socket
    peer: Address
    limits: Limits
    _credentials: PeerCredentials | None
    _who: str | None = None

    def __init__(
        self,
        sock: socket.socket,
        peer: Address,
        credentials: PeerCredentials | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._credentials = credentials
        self.limits = limits

    def describe(self) -> str:
        """``pid 12 uid 1000 gid 1000`` (from the kernel) or the address, for logs.

        Worked out once and remembered, so it still answers after the socket closed.
        """
        if self._who is None:
            creds = self._credentials
            if creds is None and self.sock.family == socket.AF_UNIX and self.sock.fileno() >= 0:
                try:
                    with peer_credentials(self.sock, pidfd=False) as creds:
                        self._who = describe_peer(creds, self.peer)
                except OSError:
                    pass
            if self._who is None:
                self._who = describe_peer(creds, self.peer)
        return self._who

    @property
    def credentials(self) -> PeerCredentials:
        """The client's identity as the kernel saw it at connect time (UNP 15.8).

        pid, uid, gid, supplementary groups and, on Linux 6.5+, a pidfd (see
        :class:`~afunix.PeerCredentials`). Read on first use, or already read
        when the server has a ``policy``; the pidfd is closed with the
        connection. Raises :class:`~afunix.UnsupportedFeature` over TCP.
        """
        if self._credentials is None:
            self._credentials = peer_credentials(self.sock)
        return self._credentials

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection (and the client's pidfd, if it was read)."""
        self.sock.close()
        if self._credentials is not None:
            self._credentials.close()


class Connection(_Peer):
    """One client connection, for ``thread`` and ``fork`` handlers.

    ``recv`` returns ``b""`` at end of file; iterating yields chunks until
    then. On a seqpacket socket each ``recv`` is one record.
    :attr:`credentials` says who the client is.
    """

    def recv(self, bufsize: int = _BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF.

        Raises :class:`~afunix.PeerTimeout` after ``idle_timeout`` of silence.
        """
        timeout = self.limits.idle_timeout
        if timeout is None:
            return self.sock.recv(bufsize)
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(bufsize)
        except TimeoutError:
            raise PeerTimeout(f"client idle for more than {timeout:g}s") from None
        finally:
            self.sock.settimeout(None)

    def send(self, data: bytes) -> None:
        """Send all of *data*; :class:`~afunix.PeerTimeout` if the client stops reading."""
        timeout = self.limits.send_timeout
        if timeout is None:
            self.sock.sendall(data, NOSIGNAL)
            return
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data, NOSIGNAL)
        except TimeoutError:
            raise PeerTimeout(f"client did not read for more than {timeout:g}s") from None
        finally:
            self.sock.settimeout(None)

    def channel(self, **options: Any) -> Channel:
        """This connection as a message :class:`~afunix.Channel` (descriptors included).

        The server's :class:`Limits` apply (message size, descriptors per message
        and in flight); ``options`` override them. The channel owns the socket.
        """
        self.describe()  # while the socket is surely open, for the logs
        chan = Channel.from_socket(self.sock, **{**self.limits.channel_options(), **options})
        self.sock.settimeout(self.limits.channel_timeout)
        return chan

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk


class AsyncConnection(_Peer):
    """One client connection, for ``asyncio`` handlers (stream or seqpacket).

    :attr:`credentials` says who the client is.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: Address,
        credentials: PeerCredentials | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(sock, peer, credentials, limits)
        self._loop = asyncio.get_running_loop()

    async def recv(self, bufsize: int = _BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF.

        Raises :class:`~afunix.PeerTimeout` after ``idle_timeout`` of silence.
        """
        timeout = self.limits.idle_timeout
        if timeout is None:
            return await self._loop.sock_recv(self.sock, bufsize)
        try:
            return await asyncio.wait_for(self._loop.sock_recv(self.sock, bufsize), timeout)
        except TimeoutError:
            raise PeerTimeout(f"client idle for more than {timeout:g}s") from None

    async def send(self, data: bytes) -> None:
        """Send all of *data*; :class:`~afunix.PeerTimeout` if the client stops reading."""
        timeout = self.limits.send_timeout
        if timeout is None:
            await self._loop.sock_sendall(self.sock, data)
            return
        try:
            await asyncio.wait_for(self._loop.sock_sendall(self.sock, data), timeout)
        except TimeoutError:
            raise PeerTimeout(f"client did not read for more than {timeout:g}s") from None

    def channel(self, **options: Any) -> AsyncChannel:
        """This connection as an :class:`~afunix.AsyncChannel` (see :meth:`Connection.channel`).

        From then on use only the channel: it buffers what it has read, and it
        keeps the socket registered with the event loop while it is being read.
        """
        self.describe()
        return AsyncChannel.from_socket(self.sock, **{**self.limits.channel_options(), **options})

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk


@dataclass(frozen=True)
class Datagram:
    """A datagram received by a datagram server; return the reply from the handler.

    ``credentials`` is the sender's identity, attached to this very datagram
    by the kernel (Linux ``SO_PASSCRED``/``SCM_CREDENTIALS``: pid and real
    uid/gid at send time, no groups, no pidfd); ``None`` where the system
    has no per-message credentials.
    """

    data: bytes
    sender: Address
    credentials: PeerCredentials | None = None


def describe_peer(creds: PeerCredentials | None, address: Address) -> str:
    """A peer for the logs: its kernel credentials where known, else its address."""
    if creds is not None:
        return f"pid {creds.pid} uid {creds.uid} gid {creds.gid}"
    return address.describe()


def log_handler_failure(exc: BaseException, who: str) -> None:
    """Log a connection's end once: a misbehaving peer briefly, a bug with its traceback."""
    if isinstance(exc, PeerError):
        log.warning("closed connection from %s: %s", who, exc)
    elif isinstance(exc, TimeoutError):  # a channel's socket timeout (Limits)
        log.warning("closed connection from %s: timed out waiting for the client", who)
    elif isinstance(exc, ConnectionError | EOFError):
        log.info("connection from %s ended: %s", who, exc or type(exc).__name__)
    else:
        log.error("handler raised for peer %s", who, exc_info=exc)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    )


class Server:
    """A Unix-domain (or TCP) server. See the module docs for handler shapes.

    The socket is bound when the server is constructed, so errors such as
    :class:`AddressInUse` surface at once and :attr:`address` is known before
    serving. Use :meth:`serve_forever` in the foreground, or :meth:`start` /
    :meth:`stop` to run it on a background thread. A ``Server`` is a context
    manager that stops and closes it.

    Where the listening socket comes from (``inherit=True``, the default):
    a predecessor's hand-over (``$AFUNIX_HANDOFF_FD``, see :meth:`hand_over`),
    else systemd socket activation (``LISTEN_FDS``; the first inherited socket
    of this server's type), else ``listen(address, ...)``. :attr:`origin` says
    which. Once accepting, the server sends ``READY=1`` to ``$NOTIFY_SOCKET``
    (and ``FDSTORE=1`` with the listener when ``fdstore=True``), and
    ``STOPPING=1`` when it stops; without ``$NOTIFY_SOCKET`` these do nothing.
    With ``$WATCHDOG_USEC`` (systemd's ``WatchdogSec=``; ``$WATCHDOG_PID``, if
    set, must be this process) it sends ``WATCHDOG=1`` at half that interval
    from the serving loop itself: the asyncio model from a loop callback, the
    thread and fork models from the accept loop (whose ``select`` wakes up in
    time). A loop stuck in a blocking call (an async handler that blocks, a
    ``verify`` hook that hangs, a thread-model datagram handler that never
    returns) stops pinging, and the manager restarts the service.
    ``on_ready(server)`` is called once accepting.

    Who may connect (UNP 15.8): ``policy=`` (a :class:`~afunix.PeerPolicy`)
    is checked against the kernel's credentials of every client before the
    handler sees it, for every model; a refused client is closed (a refused
    datagram dropped) and logged with its pid, uid, gid and executable.
    ``verify(sock, peer_address)`` runs after it, for checks of your own.
    Handlers see the client's identity as ``conn.credentials`` (a
    :class:`~afunix.PeerCredentials`) or ``datagram.credentials``.

    Limits (``limits=``, a :class:`Limits`): ``idle_timeout`` and
    ``send_timeout`` bound how long a client may stay silent or leave the
    server's writes unread; ``conn.channel()`` turns the connection into a
    message channel that enforces the message size and descriptor limits.
    Exceeding a limit closes that connection only, logged once with the
    client's credentials; a handler's own exception is logged with its
    traceback; either way the server goes on serving everyone else.

    Floods (see ``docs/operations.md``, "Threat model"):

    * ``backlog`` (default ``None``: the system's ``net.core.somaxconn``, see
      :func:`somaxconn`) is the kernel's listen queue: a burst of clients up to
      that size waits there instead of being refused.
    * ``max_clients`` bounds the clients served at once; past it new clients
      wait in the listen queue. ``model="thread"`` defaults to
      :data:`THREAD_MAX_CLIENTS` (256). When a thread cannot be started or
      ``fork()`` fails (``RLIMIT_NPROC``, memory), that client is closed,
      accepts pause 0.1 s and the server goes on; such refusals are logged in
      aggregate and counted in :attr:`refused`.
    * ``max_clients_per_uid`` caps the connections one uid holds at once (Unix
      stream and seqpacket sockets): checked right after ``accept`` with one
      ``SO_PEERCRED``, before ``policy``, ``verify`` and any thread, child or
      task; a client past it is sent ``refuse_with`` (if its buffer has room)
      and closed. No uid gets more than three quarters of ``max_clients``
      (:attr:`uid_limit`). With the cap on, a client that hung up before it was
      accepted, sending nothing, is dropped without a handler.
    """

    def __init__(
        self,
        address: AddressLike,
        handler: Handler,
        *,
        type: SocketTypeLike = "stream",
        model: Model = "asyncio",
        backlog: int | None = None,
        mode: int | None = None,
        owner: str | int | None = None,
        group: str | int | None = None,
        parent_mode: int | None = None,
        max_clients: int | None = None,
        max_clients_per_uid: int | None = None,
        refuse_with: bytes = b"",
        shutdown_timeout: float = 5.0,
        verify: Verifier | None = None,
        policy: PeerPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        sock: socket.socket | None = None,
        inherit: bool = True,
        fdstore: bool = False,
        on_ready: Callable[[Server], None] | None = None,
        event_loop: Literal["asyncio", "uvloop"] = "asyncio",
    ) -> None:
        if model not in ("asyncio", "thread", "fork"):
            raise ValueError(f"unknown model {model!r}: use 'asyncio', 'thread' or 'fork'")
        is_async = _is_async(handler)
        if model == "asyncio" and not is_async:
            raise TypeError(
                "model='asyncio' needs an 'async def' handler; for a plain function pass "
                "model='thread' or model='fork'"
            )
        if model != "asyncio" and is_async:
            raise TypeError(f"model={model!r} needs a plain function, not an 'async def' handler")
        if max_clients is not None and max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        if max_clients is None and model == "thread":
            max_clients = THREAD_MAX_CLIENTS
        if max_clients_per_uid is not None and max_clients_per_uid < 1:
            raise ValueError("max_clients_per_uid must be at least 1")
        if backlog is not None and backlog < 0:
            raise ValueError(f"backlog must be 0 or more, not {backlog}")
        self.handler = handler
        self.model: Model = model
        self.max_clients = max_clients
        self.shutdown_timeout = shutdown_timeout
        self.verify = verify
        self.type = socket_type(type)
        if max_clients_per_uid is not None and self.type == socket.SOCK_DGRAM:
            raise ValueError("max_clients_per_uid counts connections: a datagram server has none")
        #: Connections one uid may hold at once (see :attr:`uid_limit`); ``None``: no cap.
        self.max_clients_per_uid = max_clients_per_uid
        #: Sent, best effort and without waiting, to a client refused by the per-uid cap.
        self.refuse_with = refuse_with
        self._uid_conns: dict[int, int] = {}  # thread and asyncio models: uid -> connections
        self._uid_lock = threading.Lock()
        self._child_uid: dict[int, int] = {}  # fork model: pid -> uid
        self._refusals = _Refusals()
        self._queue_ready = False  # thread/fork models: the last accept found a client
        self._tick = 0.25  # thread/fork models: longest select wait (watchdog: shorter)
        #: Clients dropped at accept because they had already hung up, sending
        #: nothing (with a per-uid cap only; they would hold a slot for nothing).
        self.hung_up = 0
        #: Clients turned away before any handler ran, by reason: ``"uid-limit"``
        #: (:attr:`uid_limit`), ``"no-thread"`` (a thread could not be started),
        #: ``"no-process"`` (``fork()`` failed). Each is logged in aggregate.
        self.refused = self._refusals.counts
        self.on_ready = on_ready
        self.fdstore = fdstore
        if event_loop not in ("asyncio", "uvloop"):
            raise ValueError(f"unknown event loop {event_loop!r}: use 'asyncio' or 'uvloop'")
        self.event_loop = event_loop
        #: How the listening socket was obtained: "given", "handoff", "activation", "bound".
        self.origin = "given"
        self._takeover: Takeover | None = None
        if sock is not None:
            self.sock: socket.socket = sock
        elif inherit and (taken := self._inherit()) is not None:
            self.sock = taken
        else:
            self.origin = "bound"
            self.sock = listen(
                address,
                self.type,
                backlog=somaxconn() if backlog is None else backlog,
                mode=mode,
                owner=owner,
                group=group,
                parent_mode=parent_mode,
            )
        self.address: Address = Address.from_sockaddr(self.sock.family, self.sock.getsockname())
        self.policy = policy
        self.limits = limits
        try:
            self._dgram_creds = self._setup_credentials()
        except BaseException:
            self.sock.close()
            raise
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        #: The successor's pid after a :meth:`hand_over`.
        self.handed_over_to: int | None = None
        self._ready = threading.Event()
        self._children: set[int] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_stop: asyncio.Event | None = None
        #: Connections served so far (accepted and handed to a handler).
        self.served = 0
        #: Connections (and datagrams) refused by ``policy`` or ``verify``.
        self.rejected = 0

    def _inherit(self) -> socket.socket | None:
        """A listener from a predecessor (hand-over) or the service manager (activation)."""
        takeover = take_over()
        if takeover is not None:
            self.origin = "handoff"
            self._takeover = takeover
            return takeover.sock
        activated = listen_fds()
        if not activated:
            return None
        mine = [a for a in activated if a.sock.type == self.type]
        if not mine:
            for a in activated:
                a.sock.close()
            raise AfunixError(
                errno.EPROTOTYPE,
                f"socket activation passed {len(activated)} socket(s), none of type "
                f"{self.type!r} that this server serves",
            )
        for extra in activated:
            if extra is not mine[0]:
                log.warning("ignoring activated socket %r: one listener per Server", extra.name)
                extra.sock.close()
        self.origin = "activation"
        return mine[0].sock

    def _accepting(self) -> None:
        """Called once the server accepts: tell whoever waits for that."""
        self._ready.set()
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
            self.on_ready(self)

    def hand_over(self, argv: list[str] | None = None, timeout: float = 10.0) -> int:
        """Start a successor, give it the listening socket, then stop accepting.

        The successor (``argv``, by default this process's own command line) finds
        the socket through ``$AFUNIX_HANDOFF_FD``; a :class:`Server` picks it up
        by itself. Once it answers READY this server stops accepting, finishes the
        connections in flight (up to ``shutdown_timeout``) and :meth:`serve_forever`
        returns. The socket file stays: it belongs to the successor now. Returns
        the successor's pid; if it fails, raises and this server keeps serving.
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
        self.shutdown()
        return pid

    def _hand_over_in_background(self) -> None:
        def run() -> None:
            try:
                self.hand_over()
            except Exception as exc:
                log.error("hand-over failed, still serving: %s", exc)

        threading.Thread(target=run, name="afunix-handover", daemon=True).start()

    # ---------------------------------------------------------------- control
    def serve_forever(self, *, handle_signals: bool | None = None) -> None:
        """Serve until :meth:`shutdown`, ``SIGTERM`` or ``SIGINT``; then clean up.

        ``handle_signals`` defaults to "when running in the main thread".
        """
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        try:
            if self.model == "asyncio":
                factory = None
                if self.event_loop == "uvloop":
                    try:
                        import uvloop  # type: ignore[import-not-found, unused-ignore]
                    except ImportError as exc:
                        raise AfunixError(
                            errno.ENOSYS,
                            "event_loop='uvloop' needs the uvloop package: "
                            "pip install 'afunix[uvloop]'",
                        ) from exc
                    factory = uvloop.new_event_loop
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(self._serve_async(handle_signals))
            else:
                self._serve_sync(handle_signals)
        finally:
            self.close()

    def start(self) -> Server:
        """Serve on a background thread; returns once the server is accepting."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"handle_signals": False},
            name=f"afunix-server {self.address.describe()}",
            daemon=True,
        )
        self._thread.start()
        self._ready.wait(10)
        return self

    def shutdown(self) -> None:
        """Ask the server to stop (thread- and signal-safe); returns at once."""
        if not self._stop.is_set():
            self._stop.set()
            with contextlib.suppress(OSError):
                notify({"STOPPING": 1, "STATUS": "stopping: finishing connections in flight"})
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        loop, ev = self._loop, self._async_stop
        if loop is not None and ev is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def stop(self, timeout: float | None = None) -> None:
        """:meth:`shutdown`, then wait for a :meth:`start`-ed server to finish."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(self.shutdown_timeout + 5 if timeout is None else timeout)
        self.close()

    def close(self) -> None:
        """Close the listening socket (removing its file if still ours)."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- accepting
    def _verify(self, conn: socket.socket, peer: Address) -> bool:
        if self.verify is None:
            return True
        try:
            ok = self.verify(conn, peer)
        except Exception:
            log.exception("verify() raised for peer %s; refusing it", peer.describe())
            ok = False
        if not ok:
            self.rejected += 1
        return ok

    def _setup_credentials(self) -> bool:
        """Check that ``policy`` can work here; ask for per-datagram credentials.

        Returns whether datagrams arrive with their sender's credentials.
        """
        if self.policy is not None and self.sock.family != socket.AF_UNIX:
            raise UnsupportedFeature(
                f"a peer policy needs the kernel's credentials of each client, which exist "
                f"only for Unix-domain sockets, not for {self.address.describe()}"
            )
        if self.max_clients_per_uid is not None and self.sock.family != socket.AF_UNIX:
            raise UnsupportedFeature(
                f"max_clients_per_uid needs the kernel's credentials of each client, which "
                f"exist only for Unix-domain sockets, not for {self.address.describe()}"
            )
        if self.type != socket.SOCK_DGRAM or self.sock.family != socket.AF_UNIX:
            return False
        try:
            enable_credentials(self.sock)
        except UnsupportedFeature:
            if self.policy is not None:
                raise UnsupportedFeature(
                    "a peer policy on a datagram server needs per-message credentials, "
                    "which this system does not provide; use a stream socket"
                ) from None
            return False
        return True

    def _policy_allows(self, creds: PeerCredentials | None, peer: Address, what: str) -> bool:
        """Judge one client against ``policy``; log and count a refusal."""
        if self.policy is None:
            return True
        if creds is None:
            self.rejected += 1
            log.warning(
                "refused %s from %s: it carried no credentials, and the peer policy needs them",
                what,
                peer.describe(),
            )
            return False
        decision = self.policy.check(creds)
        if decision.allowed:
            log.debug("admitted %s from %s: %s", what, creds.describe(), decision.reason)
            return True
        self.rejected += 1
        exe = ""
        try:
            facts = creds.facts()
        except OSError:
            pass
        else:
            if facts.exe:
                exe = f", exe {facts.exe}"
        where = "" if peer.kind.value == "unnamed" else f" at {peer.describe()}"
        log.warning(
            "refused %s from %s%s%s: %s", what, creds.describe(), exe, where, decision.reason
        )
        return False

    def _admit(self, conn: socket.socket, peer: Address) -> tuple[bool, PeerCredentials | None]:
        """Policy, then ``verify``: whether to serve *conn*, and its credentials if read."""
        creds = None
        if self.policy is not None:
            try:
                creds = peer_credentials(conn)
            except OSError as exc:
                self.rejected += 1
                log.warning(
                    "refused connection from %s: its credentials cannot be read (%s)",
                    peer.describe(),
                    exc,
                )
                return False, None
            if not self._policy_allows(creds, peer, "connection"):
                creds.close()
                return False, None
        if not self._verify(conn, peer):
            if creds is not None:
                creds.close()
            return False, None
        return True, creds

    @property
    def uid_limit(self) -> int | None:
        """Connections one uid may hold at once; ``None``: no per-uid cap.

        ``max_clients_per_uid``, but never more than three quarters of
        ``max_clients`` (``max_clients - max_clients // 4``): the last quarter,
        rounded down, is kept for the other uids, so one local user cannot take
        every slot however high its own cap. The check runs right after
        ``accept``, before ``policy``, ``verify``, a thread, a child or a task.
        """
        cap = self.max_clients_per_uid
        if cap is not None and self.max_clients:
            cap = min(cap, self.max_clients - self.max_clients // 4)
        return cap

    def _uid_admit(self, conn: socket.socket) -> tuple[bool, int | None]:
        """The per-uid cap, checked with one ``SO_PEERCRED`` and no thread, no log line.

        Returns whether *conn* may be served (refused: already closed) and the
        uid it was counted under (``None`` without a cap); give that uid back
        with :meth:`_uid_release` when the connection ends.
        """
        cap = self.uid_limit
        if cap is None:
            return True, None
        if _hung_up(conn):
            conn.close()
            self.hung_up += 1
            return False, None
        try:
            uid = _peer_uid(conn)
        except OSError as exc:
            self._refuse(conn, "uid-limit", f"refused a client: its uid cannot be read ({exc})")
            return False, None
        if self.model == "fork":  # children end in _reap, maybe in a signal handler
            held = list(self._child_uid.values()).count(uid)
            ok = held < cap
        else:
            with self._uid_lock:
                held = self._uid_conns.get(uid, 0)
                ok = held < cap
                if ok:
                    self._uid_conns[uid] = held + 1
        if not ok:
            self._refuse(
                conn,
                "uid-limit",
                f"refused a connection from uid {uid}: it holds {held}, the limit per uid",
            )
            return False, None
        return True, uid

    def _uid_release(self, uid: int | None) -> None:
        if uid is None or self.model == "fork":
            return
        with self._uid_lock:
            left = self._uid_conns.get(uid, 0) - 1
            if left > 0:
                self._uid_conns[uid] = left
            else:
                self._uid_conns.pop(uid, None)

    def _refuse(self, conn: socket.socket, reason: str, detail: str) -> None:
        """Turn a client away: :attr:`refuse_with` if its buffer has room, close, count."""
        if self.refuse_with:
            with contextlib.suppress(OSError):
                conn.send(self.refuse_with, socket.MSG_DONTWAIT | NOSIGNAL)
        conn.close()
        self._refusals.add(reason, detail)

    def _recv_datagram(self) -> Datagram | None:
        """One datagram with its sender's credentials, or ``None`` if it was dropped.

        Raises ``BlockingIOError`` when none is waiting (the socket is non-blocking).
        """
        if self._dgram_creds:
            try:
                msg = recv_credentials(self.sock, _BUFSIZE)
            except ProtocolError as exc:
                log.warning("dropped a datagram: %s", exc)
                return None
            dgram = Datagram(msg.data, msg.sender, msg.credentials)
        else:
            data, raw = self.sock.recvfrom(_BUFSIZE)
            dgram = Datagram(data, self._peer(raw))
        if not self._policy_allows(dgram.credentials, dgram.sender, "datagram"):
            return None
        return dgram

    async def _async_recv_datagram(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[Datagram | None, None]:
        """:meth:`_recv_datagram` for the event loop (it has no ``sock_recvmsg``)."""
        while True:
            try:
                return self._recv_datagram(), None
            except (BlockingIOError, InterruptedError):
                pass
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.sock.fileno()
            loop.add_reader(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    def _peer(self, raw: Any) -> Address:
        try:
            return Address.from_sockaddr(self.sock.family, raw)
        except OSError:  # pragma: no cover - unusual family
            return Address.unnamed()

    @contextlib.contextmanager
    def _signals(self, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.shutdown())
        previous[signal.SIGUSR2] = signal.signal(
            signal.SIGUSR2, lambda *_: self._hand_over_in_background()
        )
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # --------------------------------------------------------------- watchdog
    def _watchdog_period(self) -> float | None:
        """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, or ``None``."""
        interval = watchdog_interval()
        if interval is None:
            return None
        log.info("systemd watchdog: %gs; sending WATCHDOG=1 every %gs", interval, interval / 2)
        return interval / 2

    def _watchdog_ping(self) -> None:
        try:
            notify({"WATCHDOG": 1})
        except OSError as exc:  # the manager went away: nothing to tell, keep serving
            log.debug("WATCHDOG=1 not sent: %s", exc)

    def _watchdog_due(self, due: float, period: float) -> float:
        """Ping if *due* has passed (called by the accept loop); the next due time."""
        now = time.monotonic()
        if now < due:
            return due
        self._watchdog_ping()
        return now + period

    # ------------------------------------------------------ thread/fork models
    def _serve_sync(self, handle_signals: bool) -> None:
        sel = selectors.DefaultSelector()
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        workers: set[threading.Thread] = set()
        conns: set[socket.socket] = set()
        lock = threading.Lock()
        # Thread model: a slot per client; without a free slot we do not accept,
        # so new clients wait in the listen queue.
        slots = (
            threading.BoundedSemaphore(self.max_clients)
            if self.max_clients and self.model == "thread"
            else None
        )
        old_chld = None
        period = self._watchdog_period()
        self._tick = min(0.25, period) if period is not None else 0.25
        due = 0.0  # the first WATCHDOG=1 goes out with the first pass of the loop
        if self.model == "fork" and handle_signals:
            old_chld = signal.signal(signal.SIGCHLD, lambda *_: self._reap())
        try:
            with self._signals(handle_signals):
                self._accepting()
                while not self._stop.is_set():
                    if period is not None:
                        due = self._watchdog_due(due, period)
                    if self.model == "fork":
                        self._reap()
                        if self.max_clients and len(self._children) >= self.max_clients:
                            time.sleep(0.005)  # leave new clients in the listen queue
                            continue
                    if slots is not None and not slots.acquire(timeout=min(0.1, self._tick)):
                        continue
                    dispatched = False
                    try:
                        dispatched = self._accept_and_dispatch(sel, workers, conns, lock, slots)
                    finally:
                        if slots is not None and not dispatched:
                            slots.release()
                    if dispatched:  # (not per refusal: a flood is refused cheaply)
                        workers = {w for w in workers if w.is_alive()}
        finally:
            sel.close()
            self._refusals.flush()
            self._stop_accepting()
            self._drain_sync(workers, conns, lock)
            if old_chld is not None:
                signal.signal(signal.SIGCHLD, old_chld)

    def _accept_and_dispatch(
        self,
        sel: selectors.BaseSelector,
        workers: set[threading.Thread],
        conns: set[socket.socket],
        lock: threading.Lock,
        slots: threading.BoundedSemaphore | None,
    ) -> bool:
        """Wait briefly for a client; hand it to a thread or child.

        Returns whether a thread took over the slot (it releases it when done).
        After an accept the next call tries ``accept`` straight away, without
        ``select``: a full listen queue drains at the cost of its refusals.
        """
        if not self._queue_ready:
            events = sel.select(timeout=self._tick)
            if not any(key.fileobj is self.sock for key, _ in events):
                return False
        if self.type == socket.SOCK_DGRAM:
            self._serve_datagram_sync()
            return False
        try:
            conn, raw = self.sock.accept()  # EINTR is retried (PEP 475)
        except (BlockingIOError, InterruptedError):
            self._queue_ready = False
            return False
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; pausing briefly", exc)
                time.sleep(0.1)
                return False
            raise
        self._queue_ready = True
        ok, uid = self._uid_admit(conn)
        if not ok:
            return False
        conn.setblocking(True)
        peer = self._peer(raw)
        ok, creds = self._admit(conn, peer)
        if not ok:
            conn.close()
            self._uid_release(uid)
            return False
        if self.model == "fork":
            self._fork_child(conn, peer, creds, uid)
            return False
        with lock:
            conns.add(conn)
        t = threading.Thread(
            target=self._run_thread,
            args=(conn, peer, conns, lock, slots),
            kwargs={"creds": creds, "uid": uid},
            daemon=True,
        )
        try:
            t.start()
        except RuntimeError as exc:  # "can't start new thread": RLIMIT_NPROC, memory
            with lock:
                conns.discard(conn)
            conn.close()
            if creds is not None:
                creds.close()
            self._uid_release(uid)
            self._out_of("no-thread", f"cannot start a thread for a client ({exc})")
            return False
        workers.add(t)
        self.served += 1
        return True

    def _out_of(self, reason: str, detail: str) -> None:
        """No thread or process for a client: it was refused; pause accepting briefly.

        Like ``EMFILE``: the server keeps serving the clients it has, and new
        ones wait in the listen queue until the pause is over.
        """
        self._refusals.add(
            reason,
            f"{detail}; refused that client and pausing accepts for {_PAUSE:g}s "
            f"(threads and processes count against RLIMIT_NPROC; lower max_clients)",
        )
        self._stop.wait(_PAUSE)

    def _serve_datagram_sync(self) -> None:
        try:
            dgram = self._recv_datagram()
        except (BlockingIOError, InterruptedError):
            return
        if dgram is None:
            return
        if self.model == "fork":
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max) or ENOMEM
                self._out_of("no-process", f"cannot fork a child for a datagram ({exc})")
                return
            self.served += 1
            if pid == 0:  # pragma: no cover - child; measured through its effects
                code = 0
                try:
                    self._after_fork(keep_listener=True)  # the reply leaves through it
                    self._reply(dgram)
                except BaseException:
                    log.exception("datagram handler failed")
                    code = 1
                finally:
                    os._exit(code)
            self._children.add(pid)
        else:
            self.served += 1
            self._reply(dgram)

    def _reply(self, dgram: Datagram) -> None:
        sender = dgram.sender
        try:
            reply = self.handler(dgram)
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
            return
        if reply is None:
            return
        if sender.kind.value == "unnamed":
            log.warning(
                "cannot reply to a datagram from an unbound socket (UNP 15.4 point 8); "
                "the client must bind an address"
            )
            return
        try:
            self.sock.sendto(reply, NOSIGNAL, sender.sockaddr)
        except OSError as exc:
            log.warning("reply to %s failed: %s", sender.describe(), exc)

    def _run_thread(
        self,
        conn: socket.socket,
        peer: Address,
        conns: set[socket.socket],
        lock: threading.Lock,
        slots: threading.BoundedSemaphore | None,
        *,
        creds: PeerCredentials | None = None,
        uid: int | None = None,
    ) -> None:
        connection = Connection(conn, peer, creds, self.limits)
        try:
            self.handler(connection)
        except Exception as exc:
            log_handler_failure(exc, connection.describe())
        finally:
            with lock:
                conns.discard(conn)
            connection.close()
            self._uid_release(uid)
            if slots is not None:
                slots.release()

    def _after_fork(self, keep_listener: bool = False) -> None:
        """In a forked child: drop the listener (without removing its file)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self._wake_r.close()
        self._wake_w.close()
        if keep_listener:
            return
        # Close the inherited listening descriptor but keep the file: it is the
        # parent's. detach() makes Socket.close() forget the path.
        fd = self.sock.detach() if isinstance(self.sock, Socket) else self.sock.fileno()
        with contextlib.suppress(OSError):
            os.close(fd)

    def _fork_child(
        self,
        conn: socket.socket,
        peer: Address,
        creds: PeerCredentials | None = None,
        uid: int | None = None,
    ) -> None:
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max) or ENOMEM
            conn.close()
            if creds is not None:
                creds.close()
            self._out_of("no-process", f"cannot fork a child for a client ({exc})")
            return
        if pid == 0:  # pragma: no cover - child; measured through its effects
            code = 0
            connection = Connection(conn, peer, creds, self.limits)
            try:
                self._after_fork()
                self.handler(connection)
            except BaseException as exc:
                log_handler_failure(exc, connection.describe())
                code = 1
            finally:
                with contextlib.suppress(OSError):
                    connection.close()
                os._exit(code)
        self._children.add(pid)
        if uid is not None:
            self._child_uid[pid] = uid
        self.served += 1
        conn.close()  # the parent's copies; the child has its own
        if creds is not None:
            creds.close()

    def _reap(self) -> None:
        """``waitpid(pid, WNOHANG)`` for each of our children (the book's SIGCHLD loop)."""
        for pid in list(self._children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                self._children.discard(pid)
                self._child_uid.pop(pid, None)
                log.debug("child %d terminated", pid)

    def _stop_accepting(self) -> None:
        """Close a stream/seqpacket listener (removing its file) before draining.

        While connections in flight finish, new clients must not queue on a
        listener nobody accepts from: with the file gone they get ``ENOENT`` at
        once. A datagram socket stays open: replies still leave through it.
        """
        if self.type != socket.SOCK_DGRAM:
            self.sock.close()

    def _drain_sync(
        self, workers: set[threading.Thread], conns: set[socket.socket], lock: threading.Lock
    ) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        if self.model == "fork":
            while self._children and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.01)
            for pid in list(self._children):
                log.warning("child %d still running at shutdown; terminating it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for pid in list(self._children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._children.discard(pid)
                self._child_uid.pop(pid, None)
            return
        for t in list(workers):
            t.join(max(deadline - time.monotonic(), 0))
        with lock:
            leftovers = list(conns)
        for conn in leftovers:
            log.warning("closing connection still open at shutdown")
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(workers):
            t.join(1.0)

    # ----------------------------------------------------------- asyncio model
    async def _serve_async(self, handle_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._async_stop = stop = asyncio.Event()
        if self._stop.is_set():
            stop.set()
        self.sock.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(self.max_clients) if self.max_clients else None
        period = self._watchdog_period()
        pinger: asyncio.TimerHandle | None = None

        def ping() -> None:  # a loop callback: a blocked loop stops pinging
            nonlocal pinger
            self._watchdog_ping()
            assert period is not None
            pinger = loop.call_later(period, ping)

        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.shutdown)
            loop.add_signal_handler(signal.SIGUSR2, self._hand_over_in_background)
        try:
            self._accepting()
            if period is not None:
                ping()
            stopper = asyncio.ensure_future(stop.wait())
            while not stop.is_set():
                if limit is not None:
                    await limit.acquire()
                if self.type == socket.SOCK_DGRAM:
                    getter: Awaitable[Any] = self._async_recv_datagram(loop)
                else:
                    getter = loop.sock_accept(self.sock)
                fut = asyncio.ensure_future(getter)
                done, _ = await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if fut not in done:
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await fut
                    if fut.cancelled() or fut.exception() is not None:
                        if limit is not None:
                            limit.release()
                        break
                    # accept() completed while we were stopping: serve that client too
                    stop_after = True
                else:
                    stop_after = False
                try:
                    first, raw = fut.result()
                except OSError as exc:
                    if limit is not None:
                        limit.release()
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed: %s; pausing briefly", exc)
                        await asyncio.sleep(0.1)
                        continue
                    raise
                if self.type == socket.SOCK_DGRAM:
                    if first is None:  # refused by the policy, or malformed: dropped
                        if limit is not None:
                            limit.release()
                        if stop_after:
                            break
                        continue
                    task = asyncio.ensure_future(self._async_datagram(first, limit))
                else:
                    conn: socket.socket = first
                    ok, uid = self._uid_admit(conn)
                    peer = self._peer(raw)
                    creds = None
                    if ok:
                        ok, creds = self._admit(conn, peer)
                        if not ok:
                            conn.close()
                            self._uid_release(uid)
                    if not ok:
                        if limit is not None:
                            limit.release()
                        if stop_after:
                            break
                        continue
                    task = asyncio.ensure_future(self._async_conn(conn, peer, limit, creds, uid))
                self.served += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if stop_after:
                    break
            stopper.cancel()
            self._refusals.flush()
            self._stop_accepting()
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=self.shutdown_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    log.warning("cancelled %d connections still open at shutdown", len(pending))
                    await asyncio.wait(pending, timeout=1.0)
        finally:
            if pinger is not None:
                pinger.cancel()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                    loop.remove_signal_handler(sig)
            self._loop = None

    async def _async_conn(
        self,
        conn: socket.socket,
        peer: Address,
        limit: asyncio.Semaphore | None,
        creds: PeerCredentials | None = None,
        uid: int | None = None,
    ) -> None:
        connection = AsyncConnection(conn, peer, creds, self.limits)
        try:
            await self.handler(connection)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_handler_failure(exc, connection.describe())
        finally:
            connection.close()
            self._uid_release(uid)
            if limit is not None:
                limit.release()

    async def _async_datagram(self, dgram: Datagram, limit: asyncio.Semaphore | None) -> None:
        sender = dgram.sender
        try:
            reply = await self.handler(dgram)
            if reply is not None:
                if sender.kind.value == "unnamed":
                    log.warning("cannot reply to a datagram from an unbound socket")
                else:
                    await asyncio.get_running_loop().sock_sendto(self.sock, reply, sender.sockaddr)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
        finally:
            if limit is not None:
                limit.release()


# ---------------------------------------------------------------- handlers
def echo(conn: Connection) -> None:
    """The classic echo handler for ``thread``/``fork`` stream and seqpacket servers."""
    for chunk in conn:
        conn.send(chunk)


async def async_echo(conn: AsyncConnection) -> None:
    """The classic echo handler for ``asyncio`` stream and seqpacket servers."""
    while chunk := await conn.recv():
        await conn.send(chunk)


def datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender."""
    return dgram.data


async def async_datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender (asyncio model)."""
    return dgram.data


def echo_handler(model: Model, sock_type: int) -> Handler:
    """The echo handler that fits *model* and *sock_type*."""
    if sock_type == socket.SOCK_DGRAM:
        return async_datagram_echo if model == "asyncio" else datagram_echo
    return async_echo if model == "asyncio" else echo
