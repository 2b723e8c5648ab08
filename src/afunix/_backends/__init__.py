"""Event-loop runtimes of the asynchronous shells (design guide, section 4.6).

The asynchronous API (:class:`~afunix.AsyncChannel`, ``AsyncConnection``,
:class:`~afunix.AsyncServer`, the broker's ``AsyncClient``) runs under
**asyncio** and under **trio**, and so under anyio on either. Which one is
asked of the calling task, call by call (:func:`in_trio`): an object made in
one runtime is used in that runtime. The primitives here are what the shells
need beyond a state machine: wait until a socket is readable or writable
(with a timeout), locks, events, semaphores, a worker thread, and warning
waiters of a socket about to close.

:mod:`afunix._backends.asyncio` also holds the channel's fast reader
(``Waiter``); :mod:`afunix._backends.trio` is imported only under trio, so
neither ``import afunix`` nor an asyncio program loads trio, which is no
runtime dependency.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "asyncio_loop",
    "current_task",
    "in_trio",
    "new_event",
    "new_lock",
    "new_semaphore",
    "notify_closing",
    "sleep",
    "to_thread",
    "wait_readable",
    "wait_writable",
]

T = TypeVar("T")

#: The running asyncio loop, or ``None`` (under trio, or outside both): asked per call.
#: (``asyncio._get_running_loop``, a documented helper for event-loop libraries: the
#: public ``get_running_loop`` raises instead, at the cost of an exception under trio.)
asyncio_loop: Callable[[], asyncio.AbstractEventLoop | None] = asyncio._get_running_loop


def in_trio() -> bool:
    """Whether the calling task runs under trio; ``False`` under asyncio.

    Raises ``RuntimeError`` outside both: the asynchronous API needs a
    running event loop.
    """
    if asyncio_loop() is not None:
        return False
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_task():
        return True
    raise RuntimeError(
        "no running event loop: afunix's asynchronous API runs under asyncio or trio "
        "(or anyio on either); use the blocking API (afunix.Channel, afunix.Server) elsewhere"
    )


def _trio() -> Any:
    from . import trio

    return trio


def _asyncio() -> Any:
    # (importing the submodules binds their names here: no module of that name is used)
    from . import asyncio

    return asyncio


def _runtime() -> Any:
    return _trio() if in_trio() else _asyncio()


async def wait_readable(fd: int, timeout: float | None = None) -> bool:
    """Wait until *fd* is readable; ``False`` if *timeout* seconds passed first.

    One task at a time per descriptor and direction (trio's rule): callers
    serialize with a lock. A descriptor closed meanwhile through
    :func:`notify_closing` raises ``EBADF``.
    """
    ready: bool = await _runtime().wait_ready(fd, False, timeout)
    return ready


async def wait_writable(fd: int, timeout: float | None = None) -> bool:
    """Wait until *fd* is writable; ``False`` if *timeout* seconds passed first."""
    ready: bool = await _runtime().wait_ready(fd, True, timeout)
    return ready


def notify_closing(fd: int) -> None:
    """*fd* is about to close: wake its waiters with ``EBADF`` (trio needs this;
    a no-op outside trio, and where nobody waits)."""
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        trio.lowlevel.notify_closing(fd)


def new_lock() -> Any:
    """A fair lock of the running runtime (``async with lock:``)."""
    return _runtime().new_lock()


def new_event() -> Any:
    """An event of the running runtime (``set()``, ``is_set()``, ``await wait()``)."""
    return _runtime().new_event()


def new_semaphore(value: int) -> Any:
    """A semaphore of the running runtime (``await acquire()``, ``release()``)."""
    return _runtime().new_semaphore(value)


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, awaited."""
    result: T = await _runtime().to_thread(fn, *args)
    return result


async def sleep(seconds: float) -> None:
    """Sleep in the running runtime."""
    await _runtime().sleep(seconds)


def current_task() -> Any:
    """The calling task (asyncio's ``Task`` or trio's)."""
    return _runtime().current_task()
