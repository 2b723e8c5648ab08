"""Append grants the client cannot undo: a pipe that the broker drains into the file.

``O_APPEND`` is a property of the open file description, and its holder can
clear it (``fcntl(F_SETFL, 0)``), then ``lseek`` and overwrite, or
``ftruncate``. So when a rule grants ``append`` but not ``write``, the broker
does not send the file: it opens the file ``O_APPEND`` itself, keeps that
descriptor, and sends the *write end of a pipe*. A thread per grant (a
*drain*) copies what comes out of the pipe into the file, in order, until
the client closes its end (every copy of it). What the client holds is a
pipe: ``fstat`` says FIFO, ``lseek`` fails with ``ESPIPE``, ``ftruncate``
with ``EINVAL``, and ``F_SETFL`` changes only the pipe. The file gets exactly
the bytes written, after whatever it held.

The pipe is made in packet mode (``O_DIRECT``, Linux 3.4+) where the kernel
allows: each ``write`` of at most ``PIPE_BUF`` (4096) bytes comes out as one
``read`` and goes into the file as one ``write``, so lines of up to
``PIPE_BUF`` bytes are never split by another writer's append.

Bounded: at most ``append_pipes_per_peer`` drains per uid and
``max_append_pipes`` in all (the policy's ``[limits]``); past them the request
gets ``EAGAIN``. Before an append grant is answered, what the same uid already
wrote into its earlier pipes is in the file (waited for up to a second), so a
client that writes, closes and asks again sees its bytes in that order.
When the broker stops, each drain copies what is already in its pipe and
closes it: later writes fail with ``EPIPE``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppendLimit", "AppendPipes"]

log = logging.getLogger("afunix.broker")

_CHUNK = 65536  # >= a packet (one page), so packet mode never cuts one


class AppendLimit(OSError):
    """No room for one more append pipe (``EAGAIN``), or no thread to drain it."""


@dataclass(eq=False)
class _Drain:
    uid: int
    read_fd: int
    file_fd: int
    what: dict[str, Any]
    busy: bool = False
    copied: int = 0
    thread: threading.Thread | None = field(default=None, repr=False)


def _unread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pipe() -> tuple[int, int]:
    try:
        return os.pipe2(os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
    except OSError as exc:  # pragma: no cover - kernels before 3.4: a plain pipe
        if exc.errno != errno.EINVAL:
            raise
        return os.pipe2(os.O_CLOEXEC)


class AppendPipes:
    """The broker's drains. *on_end* gets a record when one ends (for the audit log)."""

    def __init__(self, on_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._on_end = on_end
        self._cond = threading.Condition(threading.RLock())
        self._drains: set[_Drain] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._stopping = False

    def count(self, uid: int | None = None) -> int:
        """Drains running (for *uid*, or in all)."""
        with self._cond:
            return sum(1 for d in self._drains if uid is None or d.uid == uid)

    def check_room(self, uid: int, per_uid: int, total: int) -> None:
        """Raise :class:`AppendLimit` (``EAGAIN``) if *uid* may not have one more pipe now."""
        with self._cond:
            mine = sum(1 for d in self._drains if d.uid == uid)
            if self._stopping:
                raise AppendLimit(errno.EAGAIN, "the broker is stopping")
            if mine >= per_uid:
                raise AppendLimit(
                    errno.EAGAIN,
                    f"uid {uid} has {mine} append pipes open (limit {per_uid}); "
                    "close one and retry",
                )
            if len(self._drains) >= total:
                raise AppendLimit(
                    errno.EAGAIN, f"{len(self._drains)} append pipes open (limit {total}); retry"
                )

    def flush(self, uid: int, timeout: float = 1.0) -> bool:
        """Wait until what *uid* wrote into its pipes so far is in the files (True), or
        *timeout* passed (False: a client still writing to an earlier pipe)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(d.busy or _unread(d.read_fd) for d in self._drains if d.uid == uid):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def start(
        self,
        uid: int,
        file_fd: int,
        what: dict[str, Any],
        *,
        nonblock: bool,
        limits: tuple[int, int],
    ) -> int:
        """Drain a new pipe into *file_fd* (taken over: closed when the drain ends, or here on
        failure); returns the write end, for the client (the caller closes its copy).

        *limits* is (per uid, in all): checked again here, with the new drain counted in
        the same step, so concurrent requests cannot overshoot them.
        """
        try:
            read_fd, write_fd = _pipe()
        except OSError:
            os.close(file_fd)
            raise
        drain = _Drain(uid, read_fd, file_fd, what)
        drain.thread = threading.Thread(
            target=self._run, args=(drain,), name=f"afunix-append-{uid}", daemon=True
        )
        try:
            with self._cond:
                self.check_room(uid, *limits)
                self._drains.add(drain)
            try:
                drain.thread.start()
            except RuntimeError as exc:  # can't start new thread
                with self._cond:
                    self._drains.discard(drain)
                raise AppendLimit(
                    errno.EAGAIN, f"no thread to drain an append pipe: {exc}"
                ) from None
        except BaseException:
            for fd in (read_fd, write_fd, file_fd):
                os.close(fd)
            raise
        if nonblock:
            os.set_blocking(write_fd, False)
        return write_fd

    def close(self, timeout: float = 2.0) -> None:
        """Stop: each drain copies what is in its pipe, then closes it (writers get EPIPE)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            threads = [d.thread for d in self._drains if d.thread is not None]
        os.write(self._wake_w, b"x")
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):  # stuck writing: its wake-up pipe stays open
            log.warning("an append pipe is still being drained after %.1fs", timeout)
            return
        os.close(self._wake_w)
        os.close(self._wake_r)

    # -------------------------------------------------------------- the drain
    def _run(self, d: _Drain) -> None:
        why = "the client closed its end"
        try:
            while self._copy_some(d):
                pass
            if self._stopping:
                why = "the broker stopped"
        except OSError as exc:
            why = f"writing the file failed: {exc.strerror or exc}"
            log.error("append pipe for uid %d ends: %s", d.uid, why)
        finally:
            with self._cond:
                self._drains.discard(d)
                os.close(d.read_fd)
                os.close(d.file_fd)
                self._cond.notify_all()
        if self._on_end is not None:
            self._on_end({**d.what, "bytes": d.copied, "reason": why})

    def _copy_some(self, d: _Drain) -> bool:
        """Copy one chunk; False at end of file, or when stopping (after copying what the
        pipe held then)."""
        poller = select.poll()
        poller.register(d.read_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll()}
        if self._wake_r not in ready:
            return self._copy_one(d) > 0
        os.set_blocking(d.read_fd, False)
        budget = _unread(d.read_fd)
        try:
            while budget > 0:
                n = self._copy_one(d)
                if not n:
                    break
                budget -= n
        except BlockingIOError:
            pass
        return False

    def _copy_one(self, d: _Drain) -> int:
        """Read one chunk and append it to the file: its length (0 at end of file)."""
        with self._cond:
            d.busy = True
        try:
            data = os.read(d.read_fd, _CHUNK)
            if data:
                _write_all(d.file_fd, data)
                d.copied += len(data)
            return len(data)
        finally:
            with self._cond:
                d.busy = False
                self._cond.notify_all()
