"""The trio runner: a task per connection (or datagram) in a nursery of the caller's run.

:class:`~afunix.server.AsyncServer` runs :meth:`TrioRunner.serve` when its
``serve_forever`` is awaited under trio (or anyio on trio); it is the twin of
:class:`~afunix.server._async.AsyncRunner` with trio's structure: the
connections' tasks live in a nursery of ``serve``, so none can outlive it.

Accepting waits for the listener with ``wait_readable`` and accepts without
blocking, so a cancellation can only strike while waiting: a client is never
accepted and then dropped. A stop request (thread- and signal-safe, through
the trio token) cancels the accepting, closes the listener, lets connections
finish for ``shutdown_timeout`` seconds and cancels the rest. Cancelled from
outside, the nursery cancels every connection at once and waits for them.
``max_clients`` is a semaphore taken before each accept; out of descriptors
or memory, it pauses 0.1 s.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from .._address import Address
from ._connection import peer_address
from ._listener import PAUSE_ERRNOS, watchdog_period, watchdog_ping
from ._runner import LoopRunner

__all__ = ["TrioRunner"]

log = logging.getLogger("afunix.server")


class TrioRunner(LoopRunner):
    """Serves one listener in the running trio run until a stop is requested."""

    def _setup(self) -> None:
        self._tasks: set[Any] = set()  # trio.lowlevel.Task of each connection
        self._idle = trio.Event()  # set whenever no connection is being served
        self._idle.set()
        self._limit = trio.Semaphore(self.max_clients) if self.max_clients else None
        self._replying = trio.Lock()  # one task at a time waits to write the socket

    @property
    def tasks(self) -> frozenset[Any]:
        """The tasks of the connections (and datagrams) being served now."""
        return frozenset(self._tasks)

    async def serve(self, handle_signals: bool, started: Callable[[], None] | None = None) -> None:
        """Serve until the listener's stop request (or ``SIGTERM``/``SIGINT`` when
        *handle_signals*); then stop accepting and drain (see the module docstring)."""
        token = trio.lowlevel.current_trio_token()
        stop = trio.Event()

        def wake() -> None:  # from any thread or a signal handler
            try:
                token.run_sync_soon(stop.set)
            except trio.RunFinishedError:
                pass

        self.listener.on_stop = wake
        if self.listener.stopping.is_set():
            stop.set()
        self.listener.sock.setblocking(False)
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as helpers:
                    if handle_signals:
                        await helpers.start(self._signals)
                    self.listener.announce()
                    if started is not None:
                        started()
                    period = watchdog_period()
                    if period is not None:
                        helpers.start_soon(self._ping, period)
                    await self._accept_until(stop, connections)
                    helpers.cancel_scope.cancel()
                await self._drain(connections)
        except BaseException:  # cancelled (or failed): the nursery ended every connection
            self._stop_accepting()
            raise
        finally:
            self.listener.on_stop = None

    async def _signals(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stops = {signal.SIGTERM, signal.SIGINT}
        with trio.open_signal_receiver(*stops, signal.SIGUSR2) as received:
            task_status.started()
            async for signum in received:
                if signum in stops:
                    self.listener.request_stop()
                else:
                    self.listener.hand_over_in_background()

    async def _ping(self, period: float) -> None:
        """``WATCHDOG=1`` from a task: a blocked run stops pinging."""
        while True:
            watchdog_ping()
            await trio.sleep(period)

    async def _accept_until(self, stop: trio.Event, connections: trio.Nursery) -> None:
        """Accept and start clients' tasks until *stop* is set."""
        async with trio.open_nursery() as accepting:

            async def watch() -> None:
                await stop.wait()
                accepting.cancel_scope.cancel()

            accepting.start_soon(watch)
            await self._accept_forever(connections)

    async def _accept_forever(self, connections: trio.Nursery) -> None:
        sock = self.listener.sock
        dgram = self.listener.type == socket.SOCK_DGRAM
        while True:
            if self._limit is not None:
                await self._limit.acquire()
            try:
                first, raw = await self._next(sock, dgram)
            except OSError as exc:
                self._release()
                if exc.errno not in PAUSE_ERRNOS:
                    raise
                log.error("accept failed: %s; pausing briefly", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                self._release()
                raise
            self._start(connections, first, raw, dgram)

    async def _next(self, sock: socket.socket, dgram: bool) -> tuple[Any, Any]:
        """The next client: an accepted socket and its raw address, or a datagram
        (``None``: dropped by admission) and ``None``."""
        fd = sock.fileno()
        while True:
            try:
                if dgram:
                    return self.admission.admit_datagram(sock), None
                return sock.accept()
            except (BlockingIOError, InterruptedError):
                pass
            await trio.lowlevel.wait_readable(fd)

    def _start(self, connections: trio.Nursery, first: Any, raw: Any, dgram: bool) -> None:
        """Start the task of an admitted client; release its slot if it was refused."""
        if dgram:
            if first is None:  # refused by the policy, or malformed: dropped
                self._release()
                return
            self.admission.served += 1
            self._spawn(connections, self._datagram, first)
            return
        conn: socket.socket = first
        ok, uid = self.admission.uid_admit(conn)
        peer = peer_address(self.listener.sock, raw)
        if ok:
            ok, creds = self.admission.admit(conn, peer, uid)
        if not ok:
            self._release()
            return
        self.admission.served += 1
        self._spawn(connections, self._connection, conn, peer, creds, uid)

    def _spawn(self, connections: trio.Nursery, fn: Callable[..., Any], *args: Any) -> None:
        async def run() -> None:
            task = trio.lowlevel.current_task()
            self._tasks.add(task)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            try:
                await fn(*args)
            finally:
                self._tasks.discard(task)
                if not self._tasks:
                    self._idle.set()

        connections.start_soon(run)

    def _stop_accepting(self) -> None:
        if self.listener.type != socket.SOCK_DGRAM and self.listener.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.listener.sock.fileno())
        self.listener.stop_accepting()

    async def _drain(self, connections: trio.Nursery) -> None:
        self.admission.refusals.flush()
        self._stop_accepting()
        timeout = self.shutdown_timeout
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            await self._idle.wait()
        if self._tasks:
            log.warning("cancelled %d connections still open at shutdown", len(self._tasks))
            connections.cancel_scope.cancel()

    async def _send_reply(self, reply: bytes, sender: Address) -> None:
        sock = self.listener.sock
        while True:
            try:
                sock.sendto(reply, sender.sockaddr)
                return
            except BlockingIOError:
                pass
            async with self._replying:
                await trio.lowlevel.wait_writable(sock)
