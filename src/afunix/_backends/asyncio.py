"""The asyncio runtime of :class:`afunix.AsyncChannel`: :class:`Waiter`.

One waiter per channel (the loop keeps one reader per descriptor). The
reader is registered with the loop on the first wait and *stays*
registered while tasks keep receiving: an ``add_reader``/``remove_reader``
around every wait costs two ``epoll_ctl`` calls and asyncio's bookkeeping
each time. The reader callback *receives* itself (``attempt``, one
``recvmsg`` of the channel) and hands the message to the oldest waiting
task: no extra loop turn, and no failed ``recvmsg`` per message, as a task
that tried first and then waited would make. Readiness is level-triggered:
a callback that finds nobody waiting unregisters (no read-ahead), the next
wait registers again. The writer is registered only while a task waits on
it (a socket is almost always writable).

The waiter never refers to its channel (``attempt`` holds the socket and
protocol, not the channel), so a channel nobody closed can still be
collected and unregister. All waiters of one kind belong to one loop; a
channel used from one loop after another moves its registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import AfunixError

__all__ = [
    "Waiter",
    "current_task",
    "new_event",
    "new_lock",
    "new_semaphore",
    "sleep",
    "to_thread",
    "wait_ready",
]

#: ``attempt(read)``: the next result, or ``None`` to wait for readiness; it may
#: make one receive call only when *read* is true.
Attempt = Callable[[bool], Any]


class Waiter:
    """Readiness of one socket for the tasks of one channel (see the module docstring)."""

    __slots__ = ("attempt", "fd", "loop", "ready", "receivers", "writers")

    def __init__(self, fd: int, attempt: Attempt) -> None:
        self.fd = fd
        self.attempt = attempt
        #: The loop our reader is registered with, or ``None``.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Futures of the tasks waiting for a result, oldest first.
        self.receivers: deque[asyncio.Future[Any]] = deque()
        #: Futures of the tasks waiting to write (the writer is registered meanwhile).
        self.writers: list[asyncio.Future[None]] = []
        #: The socket became readable while nobody waited (the reader unregistered):
        #: the next receive may read at once instead of waiting for a loop turn.
        self.ready = False

    # -- receiving ---------------------------------------------------------------

    def receive(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """A future that the reader callback completes with a result of ``attempt``."""
        receivers = self.receivers
        if self.loop is not loop:
            if any(not f.done() for f in receivers):
                raise RuntimeError("tasks of another event loop are receiving on this channel")
            receivers.clear()
            self.stop_reading()  # registered with an earlier loop (a closed one forgot it)
            loop.add_reader(self.fd, self.readable)
            self.loop = loop
        fut: asyncio.Future[Any] = loop.create_future()
        receivers.append(fut)
        self.ready = False
        return fut

    def readable(self) -> None:
        """The loop's reader callback: receive for the oldest waiting tasks."""
        receivers = self.receivers
        read = True  # one receive call per callback; then only what is buffered
        served = False
        while receivers:
            fut = receivers[0]
            if fut.done():  # cancelled while waiting
                receivers.popleft()
                continue
            try:
                result = self.attempt(read)
            except Exception as exc:  # to the task that waits longest; others try again
                receivers.popleft()
                fut.set_exception(exc)
                read = False
                served = True
                continue
            read = False
            if result is None:
                return
            receivers.popleft()
            fut.set_result(result)
            served = True
        if not served:
            self.stop_reading()  # nobody waits: no read-ahead, no callback every turn
            self.ready = True  # ... but the next receive knows there is data

    def forget(self, fut: asyncio.Future[Any]) -> None:
        """*fut*'s task stopped waiting (cancelled, timed out) before a result came."""
        with contextlib.suppress(ValueError):
            self.receivers.remove(fut)

    def give_back(self, result: Any) -> bool:
        """Hand *result* (taken by a task cancelled before it ran) to the oldest waiting
        task; ``False`` if none waits (the caller keeps it for the next receive)."""
        receivers = self.receivers
        while receivers:
            fut = receivers.popleft()
            if not fut.done():
                fut.set_result(result)
                return True
        return False

    def stop_reading(self) -> None:
        """Unregister the reader, if it is registered."""
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.remove_reader(self.fd)  # a closed loop returns False: it forgot it already

    # -- writing -------------------------------------------------------------------

    def writable(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the socket may be writable (the caller awaits it)."""
        writers = self.writers
        if writers and writers[0].get_loop() is not loop:
            raise RuntimeError("tasks of another event loop are waiting to write this channel")
        fut: asyncio.Future[None] = loop.create_future()
        if not writers:
            loop.add_writer(self.fd, self._wake_writers)
        writers.append(fut)
        return fut

    def forget_writer(self, fut: asyncio.Future[None]) -> None:
        """*fut*'s task stops waiting to write (cancelled or failed)."""
        if fut in self.writers:
            self.writers.remove(fut)
            if not self.writers:
                fut.get_loop().remove_writer(self.fd)

    def _wake_writers(self) -> None:
        writers, self.writers = self.writers, []
        if not writers:  # pragma: no cover - unregistered when the last waiter left
            return
        writers[0].get_loop().remove_writer(self.fd)
        for fut in writers:
            if not fut.done():
                fut.set_result(None)

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """The channel closes: unregister, fail every waiting task with ``EBADF``.

        This runs before the socket closes: a selector that kept the
        descriptor number would mistake the next socket given that number
        for this one.
        """
        self.stop_reading()
        writers, self.writers = self.writers, []
        if writers:
            writers[0].get_loop().remove_writer(self.fd)
        receivers, self.receivers = list(self.receivers), deque()
        for fut in [*receivers, *writers]:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_exception(AfunixError(errno.EBADF, "the channel was closed"))


# -- the primitives of afunix._backends, for asyncio -----------------------------------

T = TypeVar("T")

current_task = asyncio.current_task
new_lock = asyncio.Lock
new_event = asyncio.Event
new_semaphore = asyncio.Semaphore
sleep = asyncio.sleep


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread (``asyncio.to_thread``)."""
    return await asyncio.to_thread(fn, *args)


async def wait_ready(fd: int, write: bool, timeout: float | None) -> bool:
    """Wait until *fd* is readable (writable if *write*); ``False`` after *timeout*."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    if write:
        loop.add_writer(fd, _set_done, fut)
    else:
        loop.add_reader(fd, _set_done, fut)
    try:
        if timeout is None:
            await fut
            return True
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        return bool(done)
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
