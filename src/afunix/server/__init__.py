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

A program that already runs an asyncio loop (or anyio on asyncio) embeds an
:class:`AsyncServer` instead: same options, awaited in that loop, no signal
handlers of its own unless asked (``docs/servers.md``).
``Server(model="asyncio")`` runs an :class:`AsyncServer` in an ``asyncio.Runner``.

The package, one module per job (see ``docs/architecture.md``): ``_listener``
(where the listening socket comes from, READY notices, hand-over, stopping),
``_admission`` (per-uid cap, ``policy``, ``verify``, refusals), ``_connection``
(what a handler gets), ``_threads`` and ``_async`` (the runners), ``_parts``
(what both server classes share), ``_aserver`` (:class:`AsyncServer`) and
:mod:`afunix.server.handlers` (echo handlers). :class:`Server` ties them together.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar, cast

from .._address import AddressLike
from .._errors import AfunixError
from .._limits import DEFAULT_LIMITS as DEFAULT_LIMITS
from .._limits import Limits as Limits
from .._sockets import SocketTypeLike
from ..policy import PeerPolicy
from ._admission import REFUSAL_LOG_INTERVAL as REFUSAL_LOG_INTERVAL
from ._admission import Admission
from ._admission import Verifier as Verifier
from ._aserver import AsyncServer as AsyncServer
from ._aserver import serve_parts
from ._connection import AsyncConnection as AsyncConnection
from ._connection import Connection as Connection
from ._connection import Datagram as Datagram
from ._connection import Handler as Handler
from ._connection import Model as Model
from ._connection import describe_peer as describe_peer
from ._connection import log_handler_failure as log_handler_failure
from ._listener import somaxconn as somaxconn
from ._parts import ServerParts, check_options, open_listener
from ._threads import THREAD_MAX_CLIENTS as THREAD_MAX_CLIENTS
from ._threads import ForkRunner, ThreadRunner
from .handlers import async_datagram_echo as async_datagram_echo
from .handlers import async_echo as async_echo
from .handlers import datagram_echo as datagram_echo
from .handlers import echo as echo
from .handlers import echo_handler as echo_handler

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = [
    "AsyncConnection",
    "AsyncServer",
    "Connection",
    "Datagram",
    "Handler",
    "Model",
    "Server",
]

log = logging.getLogger("afunix.server")

Runner = TypeVar("Runner", ThreadRunner, ForkRunner)


class Server(ServerParts):
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

    Over TCP (``"tcp://127.0.0.1:7000"``) every model serves as over a Unix
    socket, with what TCP cannot do refused: ``conn.credentials`` raises
    :class:`~afunix.UnsupportedFeature` (a TCP peer has no kernel
    credentials), ``conn.channel()`` carries messages but refuses descriptors
    and memfds, and a ``policy`` or ``max_clients_per_uid`` is refused when the
    server is made. An address other hosts can reach (anything but loopback)
    is refused with ``EACCES`` unless ``allow_remote=True``: plain TCP
    authenticates nobody. No socket file is made, checked or removed.

    Limits (``limits=``, a :class:`Limits`): ``idle_timeout`` and
    ``send_timeout`` bound how long a client may stay silent or leave the
    server's writes unread; ``conn.channel()`` turns the connection into a
    message channel that enforces the message size and descriptor limits and
    both timeouts (:class:`~afunix.PeerTimeout`, ``expired`` says which).
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
        allow_remote: bool = False,
        ssl: _ssl.SSLContext | None = None,
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
        sock_type, max_clients = check_options(
            handler,
            model,
            type,
            max_clients=max_clients,
            max_clients_per_uid=max_clients_per_uid,
            backlog=backlog,
            event_loop=event_loop,
        )
        self.handler = handler
        self.model: Model = model
        self.type = sock_type
        self.shutdown_timeout = shutdown_timeout
        self.limits = limits
        self.on_ready = on_ready
        self.event_loop = event_loop
        self._admission = Admission(
            policy=policy,
            verify=verify,
            max_clients=max_clients,
            max_clients_per_uid=max_clients_per_uid,
            refuse_with=refuse_with,
            fork=model == "fork",
        )
        if limits.idle_timeout is not None:
            self._admission.handshake_timeout = limits.idle_timeout
        self._listener = listener = open_listener(
            address,
            sock_type,
            self._admission,
            sock=sock,
            inherit=inherit,
            fdstore=fdstore,
            backlog=backlog,
            mode=mode,
            owner=owner,
            group=group,
            parent_mode=parent_mode,
            allow_remote=allow_remote,
            ssl=ssl,
        )
        listener.on_ready = self._announced
        self.sock = listener.sock
        self.address = listener.address
        self.origin = listener.origin
        self._thread: threading.Thread | None = None
        self._closed = False

    def _announced(self) -> None:
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
        return self._listener.hand_over(argv, timeout)

    # ---------------------------------------------------------------- control
    def serve_forever(self, *, handle_signals: bool | None = None) -> None:
        """Serve until :meth:`shutdown`, ``SIGTERM`` or ``SIGINT``; then clean up.

        ``handle_signals`` defaults to "when running in the main thread".
        """
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        try:
            if self.model == "asyncio":
                server = serve_parts(
                    self._listener,
                    self._admission,
                    self.handler,
                    self.limits,
                    shutdown_timeout=self.shutdown_timeout,
                    handle_signals=handle_signals,
                )
                with asyncio.Runner(loop_factory=self._loop_factory()) as runner:
                    runner.run(server.serve_forever())
            elif self.model == "fork":
                self._runner(ForkRunner).run(handle_signals)
            else:
                self._runner(ThreadRunner).run(handle_signals)
        finally:
            self.close()

    def _runner(self, kind: type[Runner]) -> Runner:
        return kind(
            self._listener,
            self._admission,
            self.handler,
            self.limits,
            max_clients=self.max_clients,
            shutdown_timeout=self.shutdown_timeout,
        )

    def _loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        if self.event_loop != "uvloop":
            return None
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise AfunixError(
                errno.ENOSYS,
                "event_loop='uvloop' needs the uvloop package: pip install 'afunix[uvloop]'",
            ) from exc
        return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)

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
        self._listener.ready.wait(10)
        return self

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
        self._listener.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
