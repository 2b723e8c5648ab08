"""The asyncio runner: a task per connection (or datagram), in the running event loop.

:class:`~afunix.server.AsyncServer` runs :meth:`AsyncRunner.serve` in the
caller's loop (``Server(model="asyncio")`` in an ``asyncio.Runner`` of its
own). The loop waits for a client or a stop request, whichever comes first (a
client accepted while stopping is still served), admits it and starts a task;
``max_clients`` is a semaphore taken before each accept. Out of descriptors or
memory, it pauses 0.1 s. On stop it closes the listener, lets tasks finish for
``shutdown_timeout`` and cancels the rest. Cancelled itself, it closes the
listener and cancels every connection's task at once, and waits (up to a
second) for them to close their sockets before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .._address import Address
from ._connection import Datagram, peer_address
from ._listener import PAUSE_ERRNOS, watchdog_period, watchdog_ping
from ._runner import LoopRunner

__all__ = ["AsyncRunner"]

log = logging.getLogger("afunix.server")

#: What the next client is: an accepted socket and its raw address, or a datagram
#: (``None``: dropped by admission) and ``None``.
_Next = tuple[Any, Any]


class AsyncRunner(LoopRunner):
    """Serves one listener in the running event loop until a stop is requested."""

    def _setup(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit: asyncio.Semaphore | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._getter: asyncio.Future[_Next] | None = None  # the accept under way

    @property
    def tasks(self) -> frozenset[asyncio.Task[None]]:
        """The tasks of the connections (and datagrams) being served now."""
        return frozenset(self._tasks)

    async def serve(self, handle_signals: bool, started: Callable[[], None] | None = None) -> None:
        """Serve until the listener's stop request (or ``SIGTERM``/``SIGINT`` when
        *handle_signals*); then stop accepting and drain.

        *started* is called once accepting (after the READY notices). Cancelled,
        or failing, it stops accepting and ends every connection now.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wake() -> None:  # from any thread or a signal handler
            loop.call_soon_threadsafe(stop.set)

        self.listener.on_stop = wake
        if self.listener.stopping.is_set():
            stop.set()
        self.listener.sock.setblocking(False)
        self._limit = asyncio.Semaphore(self.max_clients) if self.max_clients else None
        period = watchdog_period()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.listener.request_stop)
            loop.add_signal_handler(signal.SIGUSR2, self.listener.hand_over_in_background)
        try:
            self.listener.announce()
            if started is not None:
                started()
            if period is not None:
                self._ping(loop, period)
            await self._accept_loop(stop)
            await self._drain()
        except BaseException:  # cancelled (or failed): no drain, every connection ends now
            self.listener.stop_accepting()
            await self._end_now()
            raise
        finally:
            if self._pinger is not None:
                self._pinger.cancel()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                    loop.remove_signal_handler(sig)
            self.listener.on_stop = None

    def _ping(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        """``WATCHDOG=1`` from a loop callback: a blocked loop stops pinging."""
        watchdog_ping()
        self._pinger = loop.call_later(period, self._ping, loop, period)

    async def _accept_loop(self, stop: asyncio.Event) -> None:
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self._limit is not None:
                    await self._limit.acquire()
                if await self._serve_next(stopper):
                    break
        finally:
            stopper.cancel()

    async def _serve_next(self, stopper: asyncio.Future[Any]) -> bool:
        """Wait for the next client and start its task; whether to stop accepting."""
        waited = await self._next(stopper)
        if waited is None:
            self._release()
            return True
        fut, stop_after = waited
        try:
            first, raw = fut.result()
        except OSError as exc:
            self._release()
            if exc.errno not in PAUSE_ERRNOS:
                raise
            log.error("accept failed: %s; pausing briefly", exc)
            await asyncio.sleep(0.1)
            return False
        task = self._start(first, raw)
        if task is None:
            self._release()
        else:
            self.admission.served += 1
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return stop_after

    async def _next(
        self, stopper: asyncio.Future[Any]
    ) -> tuple[asyncio.Future[_Next], bool] | None:
        """The next client (a done future) and whether a stop came meanwhile; ``None``:
        stopped with no client."""
        if self.listener.type == socket.SOCK_DGRAM:
            getter: Awaitable[_Next] = self._next_datagram()
        else:
            getter = asyncio.get_running_loop().sock_accept(self.listener.sock)
        fut = self._getter = asyncio.ensure_future(getter)
        done, _ = await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if fut not in done:
            fut.cancel()
            await asyncio.wait({fut})  # (raises only if this task is cancelled)
            if fut.cancelled() or fut.exception() is not None:
                self._getter = None
                return None
        self._getter = None  # the caller takes its result at once
        # accept() may have completed while we were stopping: that client is served too
        return fut, fut not in done

    def _start(self, first: Any, raw: Any) -> asyncio.Task[None] | None:
        """A task for an admitted client; ``None`` if it was refused (and closed)."""
        if self.listener.type == socket.SOCK_DGRAM:
            if first is None:  # refused by the policy, or malformed: dropped
                return None
            return asyncio.ensure_future(self._datagram(first))
        conn: socket.socket = first
        ok, uid = self.admission.uid_admit(conn)
        peer = peer_address(self.listener.sock, raw)
        if not ok:
            return None
        ok, creds = self.admission.admit(conn, peer, uid)
        if not ok:
            return None
        return asyncio.ensure_future(self._connection(conn, peer, creds, uid))

    async def _drain(self) -> None:
        self.admission.refusals.flush()
        self.listener.stop_accepting()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("cancelled %d connections still open at shutdown", len(pending))
            await asyncio.wait(pending, timeout=1.0)

    async def _end_now(self) -> None:
        """Cancel every connection's task and wait, up to a second, for them to close.

        This task may itself be cancelled again meanwhile (anyio's cancel scopes
        cancel it at every ``await`` until it ends): the wait goes on regardless,
        so that no connection's socket outlives :meth:`serve`.
        """
        pending: set[asyncio.Future[Any]] = set(self._tasks)
        getter, self._getter = self._getter, None  # an accept (or datagram) under way
        if getter is not None:
            pending.add(getter)
        for task in pending:
            task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while pending and (left := deadline - loop.time()) > 0:
            try:
                _, pending = await asyncio.wait(pending, timeout=left)
            except asyncio.CancelledError:
                pending = {task for task in pending if not task.done()}
        if getter is not None:
            _close_unserved(getter)
        if pending:
            log.warning("%d connection task(s) ignored cancellation at shutdown", len(pending))

    async def _next_datagram(self) -> tuple[Datagram | None, None]:
        """One datagram judged by admission, from the event loop (it has no ``sock_recvmsg``)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.admission.admit_datagram(self.listener.sock), None
            except (BlockingIOError, InterruptedError):
                pass
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.listener.sock.fileno()
            loop.add_reader(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    async def _send_reply(self, reply: bytes, sender: Address) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.listener.sock, reply, sender.sockaddr)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_unserved(getter: asyncio.Future[_Next]) -> None:
    """Close a client accepted just before a cancellation, which no task will serve."""
    if getter.done() and not getter.cancelled() and getter.exception() is None:
        first, _raw = getter.result()
        if isinstance(first, socket.socket):
            first.close()
