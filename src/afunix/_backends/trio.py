"""The trio runtime of the asynchronous shells (imported only under trio).

trio lets one task at a time wait for a descriptor in each direction
(``wait_readable``/``wait_writable``); the shells wait under a lock, as
trio's own streams do, so several receiving tasks queue in order. trio
needs to be told before a descriptor it may be waiting on closes
(``notify_closing``): waiters wake with ``ClosedResourceError``, which is
``EBADF`` here, as under asyncio. Cancellation can only strike while a task
waits, never between a receive and its result, so no message taken for a
cancelled task can be lost.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .._errors import AfunixError

__all__ = [
    "acquire",
    "current_task",
    "new_event",
    "new_lock",
    "new_semaphore",
    "sleep",
    "to_thread",
    "wait_ready",
]

T = TypeVar("T")

current_task = trio.lowlevel.current_task
new_lock = trio.Lock
new_event = trio.Event
new_semaphore = trio.Semaphore
sleep = trio.sleep


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a trio worker thread."""
    return await trio.to_thread.run_sync(fn, *args)


async def wait_ready(fd: int, write: bool, timeout: float | None) -> bool:
    """Wait until *fd* is readable (writable if *write*); ``False`` after *timeout*.

    ``EBADF`` when the descriptor is closed meanwhile (:func:`notify_closing`).
    """
    wait = trio.lowlevel.wait_writable if write else trio.lowlevel.wait_readable
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        try:
            await wait(fd)
        except trio.ClosedResourceError:
            raise AfunixError(errno.EBADF, "the socket was closed while waiting") from None
    return not scope.cancelled_caught


async def acquire(lock: trio.Lock, timeout: float | None) -> bool:
    """Acquire *lock*; ``False`` if *timeout* seconds passed first."""
    with trio.move_on_after(math.inf if timeout is None else timeout):
        await lock.acquire()
        return True
    return False
