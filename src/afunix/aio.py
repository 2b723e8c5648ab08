"""The asyncio face of :mod:`afunix.channel`: :class:`AsyncChannel`.

Same messages, same framing, same rules as :class:`~afunix.Channel` (they
share their state machine), on a non-blocking socket driven by the running
event loop::

    async def main() -> None:
        a, b = afunix.AsyncChannel.pair()
        with open("/etc/hostname", "rb") as f:
            await a.send(b"file", fds=[f])
        with await b.recv() as msg:
            print(msg.data, msg.fds)

asyncio's own ``sock_recv``/``sock_sendall`` cannot carry descriptors, so
the channel waits for readiness with ``add_reader``/``add_writer`` and makes
the ``recvmsg``/``sendmsg`` calls itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Iterable
from typing import Any

from ._address import AddressLike
from ._cmsg import SCM_MAX_FD, FdLike, close_fds, fd_numbers, rights
from ._errors import AfunixError
from ._fds import Outgoing
from ._memfd import MEMFD_THRESHOLD, MemfdBuffer, available
from ._platform import NOSIGNAL
from ._protocol import DEFAULT_MAX_SIZE
from ._sockets import SocketTypeLike, connect, listen, pair, type_name
from .channel import _RECV_BUFSIZE, Message, _Core

__all__ = ["AsyncChannel"]


class _Readiness:
    """What the event loop says about one channel's socket: readable, writable.

    The reader is registered with the loop on the first wait and *stays*
    registered: a channel being read waits again and again, and an
    ``add_reader``/``remove_reader`` around every wait costs two
    ``epoll_ctl`` calls plus asyncio's bookkeeping each time. Readiness is
    level-triggered, so a registration that nobody waits on fires at every
    turn of the loop while data sits unread: the first such callback
    unregisters, and the next wait registers again. The writer is
    registered only while a task waits on it (a socket is almost always
    writable, so a lasting registration would fire at every turn).

    This object never refers to its channel (the loop holds it while the
    reader is registered), so a channel nobody closed can still be
    collected, and its ``__del__`` unregisters. All waiters of one kind
    belong to one loop; a channel used from one loop after another moves
    its registration to the loop it is used from. The loop keeps one reader
    per descriptor: anything else that waits on the channel's socket with
    the loop (``loop.sock_recv(chan.socket)``, another ``add_reader``)
    takes that place over, one more reason never to use the socket itself.
    """

    __slots__ = ("fd", "loop", "reader", "skip", "writers")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: The loop our reader is registered with, or ``None``.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: The future of the task waiting to read, or ``None``.
        self.reader: asyncio.Future[None] | None = None
        #: Ignore the next reader callback (see :meth:`readable`).
        self.skip = False
        #: The futures of the tasks waiting to write (the writer is registered while
        #: this is not empty).
        self.writers: list[asyncio.Future[None]] = []

    # -- reading ---------------------------------------------------------------

    def wait_readable(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the socket may be readable (the caller awaits it)."""
        waiting = self.reader
        if waiting is not None and not waiting.done():
            # recv() holds a lock, so this is two loops (or threads) using one channel.
            raise RuntimeError("another task is already waiting to read this channel")
        if self.loop is not loop:
            self.stop_reading()  # registered with an earlier loop (a closed one forgot it)
            loop.add_reader(self.fd, self.readable)
            self.loop = loop
        fut = self.reader = loop.create_future()
        return fut

    def readable(self) -> None:
        """The loop's reader callback: wake the task waiting to read, or stop watching."""
        if self.skip:
            # The loop polls once more before the task woken last time runs, and that
            # poll still sees the data the task is about to read: this callback is
            # old news. (Had we woken a task waiting anew, it would find nothing.)
            # If more data is there, level-triggered readiness says so again next turn.
            self.skip = False
            return
        fut = self.reader
        if fut is None or fut.done():  # nobody waits (or the waiter was cancelled)
            self.stop_reading()
            return
        self.reader = None
        fut.set_result(None)
        self.skip = True

    def stop_reading(self) -> None:
        """Unregister the reader, if it is registered."""
        loop, self.loop, self.skip = self.loop, None, False
        if loop is not None:
            loop.remove_reader(self.fd)  # a closed loop returns False: it forgot it already

    # -- writing ---------------------------------------------------------------

    def wait_writable(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the socket may be writable (the caller awaits it)."""
        writers = self.writers
        if writers and writers[0].get_loop() is not loop:
            raise RuntimeError("tasks of another event loop are waiting to write this channel")
        fut = loop.create_future()
        if not writers:
            loop.add_writer(self.fd, self.writable)
        writers.append(fut)
        return fut

    def writable(self) -> None:
        """The loop's writer callback: wake every task waiting to write; unregister."""
        writers, self.writers = self.writers, []
        if not writers:  # pragma: no cover - unregistered when the last waiter left
            return
        writers[0].get_loop().remove_writer(self.fd)
        for fut in writers:
            if not fut.done():
                fut.set_result(None)

    # -- ending a wait -----------------------------------------------------------

    def forget(self, fut: asyncio.Future[None], writable: bool) -> None:
        """*fut*'s task stops waiting (woken, cancelled or failed)."""
        if not writable:
            if self.reader is fut:
                self.reader = None  # the reader stays registered for the next wait
        elif fut in self.writers:
            self.writers.remove(fut)
            if not self.writers:
                fut.get_loop().remove_writer(self.fd)

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
        reader, self.reader = self.reader, None
        for fut in [reader, *writers] if reader is not None else writers:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_exception(AfunixError(errno.EBADF, "the channel was closed"))


class AsyncChannel:
    """Messages with descriptors over one Unix-domain socket, for asyncio.

    The arguments are those of :class:`~afunix.Channel`. Concurrent
    :meth:`send` calls never interleave; concurrent :meth:`recv` calls are
    served one after the other. :meth:`close` wakes any task waiting on the
    channel with an ``EBADF`` error.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        maxfds: int = SCM_MAX_FD,
        memfd_threshold: int | None = MEMFD_THRESHOLD,
        recv_bufsize: int = _RECV_BUFSIZE,
        credentials: bool = False,
        max_fds_in_flight: int | None = None,
    ) -> None:
        self._core = _Core(
            sock,
            max_size=max_size,
            maxfds=maxfds,
            memfd_threshold=memfd_threshold,
            recv_bufsize=recv_bufsize,
            credentials=credentials,
            max_fds_in_flight=max_fds_in_flight,
        )
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        #: Tasks in recv() past its fast path (holding or waiting for the lock).
        self._receivers = 0
        self._readiness = _Readiness(self._fd)
        self._core.on_close = self._wake_waiters

    # -- opening ---------------------------------------------------------------

    @classmethod
    def from_socket(cls, sock: socket.socket, **options: Any) -> AsyncChannel:
        """Wrap *sock* (made non-blocking), checking it is ``AF_UNIX``; the channel owns it."""
        return cls(sock, **options)

    @classmethod
    async def connect(
        cls,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncChannel:
        """Connect with :func:`afunix.connect` (in a worker thread: a full listen
        queue makes a Unix connect wait) and wrap the socket."""
        sock = await asyncio.to_thread(connect, address, type, timeout=timeout)
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def pair(
        cls,
        type: SocketTypeLike = "stream",
        **options: Any,
    ) -> tuple[AsyncChannel, AsyncChannel]:
        """Two connected channels over :func:`afunix.pair`."""
        a, b = pair(type)
        try:
            return cls(a, **options), cls(b, **options)
        except BaseException:
            a.close()
            b.close()
            raise

    @classmethod
    def bind(cls, address: AddressLike, **options: Any) -> AsyncChannel:
        """A datagram channel bound at *address* (see :meth:`Channel.bind`)."""
        sock = listen(address, "dgram")
        try:
            return cls(sock, **options)
        except BaseException:
            sock.close()
            raise

    # -- readiness -------------------------------------------------------------

    async def _wait(self, writable: bool) -> None:
        """Until the socket may be writable (or readable), or ``EBADF`` when the channel closes.

        The caller tries its non-blocking call first and waits only after
        ``EAGAIN``; a wake-up may still be spurious (try again, wait again).
        """
        if self._core.closed:
            raise AfunixError(errno.EBADF, "the channel is closed")
        loop = asyncio.get_running_loop()
        readiness = self._readiness
        fut = readiness.wait_writable(loop) if writable else readiness.wait_readable(loop)
        try:
            await fut
        finally:
            readiness.forget(fut, writable)

    # -- using ---------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (do not read or write it directly)."""
        return self._core.sock

    @property
    def type(self) -> str:
        return type_name(self._core.kind)

    @property
    def closed(self) -> bool:
        return self._core.closed

    def fileno(self) -> int:
        return self._core.sock.fileno()

    async def send(
        self,
        data: bytes | bytearray | memoryview = b"",
        fds: Iterable[FdLike] = (),
        *,
        memfd: bool | None = None,
        address: Any = None,
        more: bool = False,
    ) -> None:
        """Send one message; see :meth:`Channel.send` (and its *more*)."""
        core = self._core
        if fds:
            # Read once, and referenced here until sent, across every await (see
            # channel._kept): the files the caller passed stay open until they went.
            if type(fds) is not tuple and type(fds) is not list:
                fds = list(fds)
            numbers = fd_numbers(fds)
        else:
            numbers = []
        if memfd is None and address is None:
            frame = core.plain_frame(data, len(numbers)) if len(numbers) <= SCM_MAX_FD else None
            if frame is not None:
                if more or core.held:
                    if not core.room_for(len(numbers)):
                        await self.flush()
                    if core.hold(frame, numbers) or not more:
                        await self.flush()
                    return
                async with self._send_lock:
                    await self._write(frame, numbers)
                return
        if core.held:
            await self.flush()  # keep the order: held messages first
        size = memoryview(data).nbytes
        use_memfd = core.use_memfd(size, memfd)
        try:
            await self._send(data, numbers, use_memfd, address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE or memfd is not None or use_memfd or core.stream:
                raise
            if not available():  # pragma: no cover - not Linux
                raise
            await self._send(data, numbers, True, address)  # the same descriptors

    async def _send(
        self, data: bytes | bytearray | memoryview, fds: Iterable[FdLike], memfd: bool, address: Any
    ) -> None:
        out, mfd = self._core.outgoing(data, fds, memfd, address)
        try:
            await self._push(out)
        finally:
            if mfd is not None:
                os.close(mfd)

    async def send_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike] = (), *, address: Any = None
    ) -> None:
        """Seal *buf* and send it as the payload; see :meth:`Channel.send_buffer`."""
        if type(fds) is not tuple and type(fds) is not list:
            fds = list(fds)  # read once, referenced until sent (see send)
        out, mfd = self._core.outgoing_buffer(buf, length, fds, address)
        try:
            await self._push(out)
        finally:
            os.close(mfd)

    async def _write(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Write whole frames, *fds* attached to the first byte (the send lock is held)."""
        sock, sent = self._core.sock, 0
        try:
            while fds and not sent:
                try:
                    sent = sock.sendmsg([frame], [rights(fds)], NOSIGNAL)
                except BlockingIOError:
                    await self._wait(writable=True)
            while sent < len(frame):
                try:
                    sent += sock.send(frame[sent:] if sent else frame, NOSIGNAL)
                except BlockingIOError:
                    await self._wait(writable=True)
        except BaseException:
            if sent:
                self.close()  # half a message went out: the framing is lost
            raise

    async def flush(self) -> None:
        """Write the messages held by ``send(..., more=True)`` now."""
        async with self._send_lock:
            if self._core.held:
                frames, fds = self._core.take_held()
                try:
                    await self._write(frames, fds)
                finally:
                    close_fds(fds)  # our duplicates: the kernel holds what is in flight

    async def _push(self, out: Outgoing) -> None:
        async with self._send_lock:
            try:
                while True:
                    try:
                        if out.send_some(self._core.sock):
                            return
                    except BlockingIOError:
                        await self._wait(writable=True)
            except BaseException:
                if out.sent and self._core.stream:
                    self.close()  # half a message went out: the framing is lost
                raise

    async def recv(self) -> Message:
        """Receive one message. ``EOFError`` when the peer has closed."""
        core = self._core
        if core.held:
            await self.flush()  # a reply may depend on what we hold
        decoder = core.decoder
        if decoder is not None and not self._receivers:
            # Nobody else is receiving or queued to: a message decoded already is
            # ours without the lock (no await between looking and taking it).
            item = decoder.next_fast()
            if item is not None:
                return Message(item) if isinstance(item, bytes) else core.fds_message(item)
        self._receivers += 1
        try:
            return await self._recv_locked()
        finally:
            self._receivers -= 1

    async def _recv_locked(self) -> Message:
        core = self._core
        decoder = core.decoder
        async with self._recv_lock:
            while True:
                if decoder is not None:
                    item = decoder.next_fast()  # fast path: no memfd, no credentials
                    if item is not None:
                        return Message(item) if isinstance(item, bytes) else core.fds_message(item)
                    started = core.direct_start()  # a large payload: into its own buffer
                    if started is not None:
                        return await self._recv_direct(*started)
                    msg = core.next_message()
                    if msg is not None:
                        return msg
                while True:  # the decoder needs bytes: read (no await while there are some)
                    try:
                        msg = core.receive_once()
                        break
                    except BlockingIOError:
                        pass  # wait outside the handler: EBADF or a cancellation is no
                        # "during handling of BlockingIOError" (and the traceback is freed)
                    # Nothing new for the decoder while we wait: read straight after.
                    await self._wait(writable=False)
                if msg is not None:
                    return msg

    async def _recv_direct(self, view: memoryview, got: int) -> Message:
        """The rest of a large plain payload, read straight into *view*."""
        core, head = self._core, got
        try:
            while got < len(view):
                try:
                    got += core.direct_read(view, got)
                    continue
                except BlockingIOError:
                    pass  # wait outside the handler (see recv())
                await self._wait(writable=False)
        except BaseException:
            self.close()  # half a payload read (or a bad one): the stream is out of step
            raise
        return core.direct_done(view, head)

    def __aiter__(self) -> AsyncChannel:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except EOFError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Close the channel; tasks waiting on it get ``EBADF``.

        Messages still held by ``send(..., more=True)`` get one non-blocking
        try; :meth:`aclose` (and ``async with``) flushes them properly first.
        """
        core = self._core
        if core.held and not core.closed:
            frames, fds = core.take_held()
            with contextlib.suppress(OSError):
                if fds:
                    core.sock.sendmsg([frames], [rights(fds)], NOSIGNAL)
                else:
                    core.sock.send(frames, NOSIGNAL)
            close_fds(fds)
        core.close()

    def _wake_waiters(self) -> None:
        """Called by the core before the socket closes (see :meth:`_Readiness.close`)."""
        self._readiness.close()

    def __del__(self) -> None:
        # A channel nobody closed is being collected (its socket closes next, with a
        # ResourceWarning): take its reader off the loop, whose selector would
        # otherwise keep the descriptor number for a socket that is gone.
        readiness = getattr(self, "_readiness", None)  # None: __init__ failed early
        if readiness is not None and readiness.loop is not None:
            try:  # no module globals here: they may be gone at interpreter exit
                readiness.stop_reading()
            except (RuntimeError, OSError):  # pragma: no cover - a loop of another thread
                pass

    async def aclose(self) -> None:
        """Flush held messages, then close."""
        try:
            if self._core.held and not self._core.closed:
                await self.flush()
        finally:
            self.close()

    def __enter__(self) -> AsyncChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<afunix.AsyncChannel {self.type} {state}>"
