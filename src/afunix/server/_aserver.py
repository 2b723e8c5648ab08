"""``AsyncServer``: an afunix server that runs in the caller's event loop (asyncio or trio).

:class:`~afunix.Server` owns its loop (``serve_forever()`` blocks); an
:class:`AsyncServer` is awaited in a loop that is already running, next to
the program's own tasks: a web service, a supervisor, a second server. It has
the options of :class:`~afunix.Server` (without ``model``: it is the asyncio
model; without ``event_loop``: the loop is yours) and the same parts:
admission (``policy``, ``verify``, per-uid cap, refusals) and the listener
(hand-over, socket activation, READY/STOPPING/WATCHDOG notices).
``Server(model="asyncio")`` is this class run in an ``asyncio.Runner``.
Under asyncio it serves with :class:`~afunix.server._async.AsyncRunner`,
under trio with :class:`~afunix.server._trio.TrioRunner` (imported only
then: trio is no dependency).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._address import AddressLike
from .._backends import current_task, in_trio, new_event
from .._limits import DEFAULT_LIMITS, Limits
from .._sockets import SocketTypeLike
from ..policy import PeerPolicy
from ._admission import Admission, Verifier
from ._async import AsyncRunner
from ._connection import Handler
from ._listener import ListeningSocket
from ._parts import ServerParts, check_options, is_async, open_listener

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = ["AsyncServer", "TaskStatus", "serve_parts"]


class TaskStatus(Protocol):
    """What this server needs of trio's and anyio's ``task_status``: ``started()``,
    called once accepting (their ``TaskStatus[None]`` fits)."""

    def started(self) -> None: ...


class AsyncServer(ServerParts):
    """A server awaited in your own event loop: asyncio or trio, and anyio on either.

    Bound (or inherited) when constructed, like :class:`~afunix.Server`, so
    :class:`~afunix.AddressInUse` and friends surface at once; constructing
    needs no running loop. Serve it in a task of yours::

        async with AsyncServer("/run/app.sock", handle, policy=policy) as server:
            await server.serve_forever()

        # trio, or anyio on either: returns once accepting
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)

    :meth:`serve_forever` runs until :meth:`shutdown` (thread- and
    signal-safe), a successor takes over (:meth:`hand_over`), or the task is
    cancelled. Stopped, it stops accepting (a stream listener is closed and
    its file removed at once, so new clients get ``ENOENT`` rather than
    wait), lets handlers finish for up to ``shutdown_timeout`` seconds,
    cancels the rest and closes the listener. Cancelled, it cancels every
    handler at once. Either way the server is closed when it returns, and
    no descriptor of it stays open.

    The handler is an ``async def`` function of one argument: an
    :class:`~afunix.AsyncConnection` (``conn.channel()`` turns it into an
    :class:`~afunix.AsyncChannel` that carries descriptors) or, for
    ``type="dgram"``, a :class:`~afunix.Datagram` whose reply it returns. A
    handler's exception is logged and ends that connection only.

    No signal handler is installed unless ``handle_signals=True`` (then
    ``SIGTERM``/``SIGINT`` stop it and ``SIGUSR2`` hands it over, through
    ``loop.add_signal_handler``, or trio's ``open_signal_receiver``, in the
    main thread only; they are removed when it stops). Call :meth:`shutdown`
    from handlers of your own instead.

    The other options are :class:`~afunix.Server`'s (see there): ``type``,
    ``backlog``, ``mode``, ``owner``, ``group``, ``parent_mode``,
    ``allow_remote`` (``tcp://`` beyond loopback), ``max_clients``,
    ``max_clients_per_uid``, ``refuse_with``,
    ``shutdown_timeout``, ``verify``, ``policy``, ``limits``, ``sock``,
    ``inherit``, ``fdstore``, and ``on_ready(server)``, called once accepting.
    """

    def __init__(
        self,
        address: AddressLike,
        handler: Handler,
        *,
        type: SocketTypeLike = "stream",
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
        on_ready: Callable[[AsyncServer], None] | None = None,
        handle_signals: bool = False,
    ) -> None:
        if not is_async(handler):
            raise TypeError(
                "AsyncServer needs an 'async def' handler (it runs in your event loop); "
                "for a plain function use afunix.Server(..., model='thread')"
            )
        sock_type, max_clients = check_options(
            handler,
            "asyncio",
            type,
            max_clients=max_clients,
            max_clients_per_uid=max_clients_per_uid,
            backlog=backlog,
            event_loop="asyncio",
        )
        admission = Admission(
            policy=policy,
            verify=verify,
            max_clients=max_clients,
            max_clients_per_uid=max_clients_per_uid,
            refuse_with=refuse_with,
            fork=False,
        )
        listener = open_listener(
            address,
            sock_type,
            admission,
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
        self.on_ready = on_ready
        listener.on_ready = self._announced
        self._attach(
            listener,
            admission,
            handler,
            limits=limits,
            shutdown_timeout=shutdown_timeout,
            handle_signals=handle_signals,
        )

    def _attach(
        self,
        listener: ListeningSocket,
        admission: Admission,
        handler: Handler,
        *,
        limits: Limits,
        shutdown_timeout: float,
        handle_signals: bool,
    ) -> None:
        self._listener = listener
        self._admission = admission
        if limits.idle_timeout is not None:
            admission.handshake_timeout = limits.idle_timeout
        self.handler = handler
        self.limits = limits
        self.shutdown_timeout = shutdown_timeout
        self.handle_signals = handle_signals
        self.type: int = listener.type
        self.sock = listener.sock
        self.address = listener.address
        self.origin = listener.origin
        self._runner: Any = None  # AsyncRunner or TrioRunner, while serving
        self._finished: Any = None  # the runtime's Event, set when serve_forever ends
        self._closed = False

    def _announced(self) -> None:
        if self.on_ready is not None:
            self.on_ready(self)

    async def serve_forever(self, *, task_status: TaskStatus | None = None) -> None:
        """Serve until :meth:`shutdown`, a hand-over or cancellation; then close.

        ``task_status.started()`` is called once accepting, so that
        ``await task_group.start(server.serve_forever)`` (anyio) returns when
        clients can connect. Runs once per server: afterwards the listener is
        closed (and its file removed, unless it was handed over).
        """
        if self._runner is not None or self._closed:
            raise RuntimeError(
                f"{self.address.describe()}: serve_forever() runs once per AsyncServer; "
                "create a new server to serve again"
            )
        if in_trio():
            from ._trio import TrioRunner

            runner_class: Any = TrioRunner
        else:
            runner_class = AsyncRunner
        self._finished = new_event()
        self._runner = runner = runner_class(
            self._listener,
            self._admission,
            self.handler,
            self.limits,
            max_clients=self.max_clients,
            shutdown_timeout=self.shutdown_timeout,
        )
        started = task_status.started if task_status is not None else None
        try:
            await runner.serve(self.handle_signals, started)
        finally:
            self._close()
            self._finished.set()

    def hand_over(self, argv: list[str] | None = None, timeout: float = 10.0) -> int:
        """Start a successor, give it the listening socket, then stop accepting.

        As :meth:`afunix.Server.hand_over`; it blocks until the successor is
        ready (up to *timeout*), so from the event loop call it in a thread:
        ``await asyncio.to_thread(server.hand_over)`` (trio:
        ``await trio.to_thread.run_sync(server.hand_over)``). Returns the successor's pid.
        """
        return self._listener.hand_over(argv, timeout)

    async def aclose(self) -> None:
        """:meth:`shutdown`, wait for :meth:`serve_forever` to drain and end, then close.

        The listener is closed and its file removed (unless handed over). From
        a handler of this server, it only asks to stop (it cannot wait for
        its own end).
        """
        self.shutdown()
        runner, finished = self._runner, self._finished
        if runner is not None and finished is not None:
            if current_task() in runner.tasks:
                return
            await finished.wait()
        self._close()

    def close(self) -> None:
        """Close the listener now (removing its file), without draining.

        For a server that is not serving (constructed, then given up); a
        serving one is asked to stop instead (:meth:`shutdown`) and closes
        when it has drained.
        """
        if self._finished is not None and not self._finished.is_set():
            self.shutdown()
            return
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.close()

    async def __aenter__(self) -> AsyncServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving" if self._runner else "bound"
        return f"<AsyncServer {self.address.describe()} {state}>"


def serve_parts(
    listener: ListeningSocket,
    admission: Admission,
    handler: Handler,
    limits: Limits,
    *,
    shutdown_timeout: float,
    handle_signals: bool,
) -> AsyncServer:
    """The :class:`AsyncServer` that ``Server(model="asyncio")`` runs, on the Server's
    own listener and admission (its ``on_ready`` stays the Server's)."""
    server = AsyncServer.__new__(AsyncServer)
    server.on_ready = None
    server._attach(
        listener,
        admission,
        handler,
        limits=limits,
        shutdown_timeout=shutdown_timeout,
        handle_signals=handle_signals,
    )
    return server
