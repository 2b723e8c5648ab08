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

The package, one module per job (see ``docs/architecture.md``): ``_listener``
(where the listening socket comes from, READY notices, hand-over, stopping),
``_admission`` (per-uid cap, ``policy``, ``verify``, refusals), ``_connection``
(what a handler gets), ``_threads`` and ``_async`` (the runners) and
:mod:`afunix.server.handlers` (echo handlers). :class:`Server` ties them together.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, cast, overload

from .._address import Address, AddressLike
from .._errors import AfunixError
from .._limits import DEFAULT_LIMITS as DEFAULT_LIMITS
from .._limits import Limits as Limits
from .._sockets import SocketTypeLike, socket_type
from ..policy import PeerPolicy
from ._admission import REFUSAL_LOG_INTERVAL as REFUSAL_LOG_INTERVAL
from ._admission import Admission
from ._admission import Verifier as Verifier
from ._async import AsyncRunner
from ._connection import AsyncConnection as AsyncConnection
from ._connection import Connection as Connection
from ._connection import Datagram as Datagram
from ._connection import Handler as Handler
from ._connection import Model as Model
from ._connection import describe_peer as describe_peer
from ._connection import log_handler_failure as log_handler_failure
from ._listener import ListeningSocket
from ._listener import somaxconn as somaxconn
from ._threads import THREAD_MAX_CLIENTS as THREAD_MAX_CLIENTS
from ._threads import ForkRunner, ThreadRunner
from .handlers import async_datagram_echo as async_datagram_echo
from .handlers import async_echo as async_echo
from .handlers import datagram_echo as datagram_echo
from .handlers import echo as echo
from .handlers import echo_handler as echo_handler

__all__ = [
    "AsyncConnection",
    "Connection",
    "Datagram",
    "Handler",
    "Model",
    "Server",
]

log = logging.getLogger("afunix.server")

T = TypeVar("T")
Runner = TypeVar("Runner", ThreadRunner, ForkRunner, AsyncRunner)


class _Part(Generic[T]):
    """An attribute of :class:`Server` that one of its parts keeps: read and written there."""

    def __init__(self, part: str, doc: str) -> None:
        self.part = part
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Part[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object, owner: type | None = None) -> T | _Part[T]:
        if obj is None:
            return self
        return cast(T, getattr(getattr(obj, self.part), self.name))

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


def _is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    )


def _checked(
    handler: Handler,
    model: Model,
    type: SocketTypeLike,
    *,
    max_clients: int | None,
    max_clients_per_uid: int | None,
    backlog: int | None,
    event_loop: str,
) -> tuple[int, int | None]:
    """Check :class:`Server`'s options before any socket exists; the socket type and
    ``max_clients`` (``model="thread"``: :data:`THREAD_MAX_CLIENTS` unless given)."""
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
    sock_type = socket_type(type)
    if max_clients_per_uid is not None and sock_type == socket.SOCK_DGRAM:
        raise ValueError("max_clients_per_uid counts connections: a datagram server has none")
    if event_loop not in ("asyncio", "uvloop"):
        raise ValueError(f"unknown event loop {event_loop!r}: use 'asyncio' or 'uvloop'")
    return sock_type, max_clients


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

    policy: _Part[PeerPolicy | None] = _Part("_admission", "Who may connect (``policy=``).")
    verify: _Part[Verifier | None] = _Part(
        "_admission", "The ``verify(sock, peer)`` hook, after it."
    )
    max_clients: _Part[int | None] = _Part("_admission", "Clients served at once.")
    max_clients_per_uid: _Part[int | None] = _Part(
        "_admission",
        "Connections one uid may hold at once (see :attr:`uid_limit`); ``None``: no cap.",
    )
    refuse_with: _Part[bytes] = _Part(
        "_admission",
        "Sent, best effort and without waiting, to a client refused by the per-uid cap.",
    )
    uid_limit: _Part[int | None] = _Part("_admission", Admission.uid_limit.__doc__ or "")
    served: _Part[int] = _Part(
        "_admission", "Connections served so far (accepted, handed to a handler)."
    )
    rejected: _Part[int] = _Part(
        "_admission", "Connections (and datagrams) refused by ``policy`` or ``verify``."
    )
    hung_up: _Part[int] = _Part(
        "_admission",
        "Clients dropped at accept because they had already hung up, sending nothing "
        "(with a per-uid cap only; they would hold a slot for nothing).",
    )
    refused: _Part[dict[str, int]] = _Part(
        "_admission",
        "Clients turned away before any handler ran, by reason: ``uid-limit`` "
        "(:attr:`uid_limit`), ``no-thread`` (a thread could not be started), "
        "``no-process`` (``fork()`` failed). Each is logged in aggregate.",
    )
    fdstore: _Part[bool] = _Part("_listener", "Park the listener with systemd (``FDSTORE=1``).")
    handed_over_to: _Part[int | None] = _Part(
        "_listener", "The successor's pid after a :meth:`hand_over`."
    )

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
        sock_type, max_clients = _checked(
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
        self._listener = listener = self._listen(
            address,
            sock,
            inherit,
            fdstore,
            backlog=backlog,
            mode=mode,
            owner=owner,
            group=group,
            parent_mode=parent_mode,
        )
        self.sock: socket.socket = listener.sock
        self.address: Address = listener.address
        #: How the listening socket was obtained: "given", "handoff", "activation", "bound".
        self.origin = listener.origin
        self._thread: threading.Thread | None = None
        self._closed = False

    def _listen(
        self,
        address: AddressLike,
        sock: socket.socket | None,
        inherit: bool,
        fdstore: bool,
        **bind: Any,
    ) -> ListeningSocket:
        """The listener (:meth:`ListeningSocket.acquire`); closed if admission cannot work."""
        listener = ListeningSocket.acquire(address, self.type, sock=sock, inherit=inherit, **bind)
        listener.fdstore = fdstore
        listener.on_ready = self._announced
        try:
            self._admission.prepare(listener.sock, listener.address, self.type)
        except BaseException:
            listener.close()
            raise
        return listener

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
                with asyncio.Runner(loop_factory=self._loop_factory()) as runner:
                    runner.run(self._runner(AsyncRunner).serve(handle_signals))
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

    def shutdown(self) -> None:
        """Ask the server to stop (thread- and signal-safe); returns at once."""
        self._listener.request_stop()

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
