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
from ._errors import AfunixError
from ._fds import SCM_MAX_FD, FdLike, Outgoing
from ._memfd import MEMFD_THRESHOLD, MemfdBuffer, available
from ._protocol import DEFAULT_MAX_SIZE
from ._sockets import SocketTypeLike, connect, listen, pair, type_name
from .channel import _RECV_BUFSIZE, Message, _Core

__all__ = ["AsyncChannel"]


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
        self._waiters: dict[asyncio.Future[None], tuple[asyncio.AbstractEventLoop, bool]] = {}
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
        if self._core.closed:
            raise AfunixError(errno.EBADF, "the channel is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(self._fd, ready)
        else:
            loop.add_reader(self._fd, ready)
        self._waiters[fut] = (loop, writable)
        try:
            await fut
        finally:
            if self._waiters.pop(fut, None) is not None:
                if writable:
                    loop.remove_writer(self._fd)
                else:
                    loop.remove_reader(self._fd)

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
        if memfd is None and address is None and not fds:
            frame = core.plain_frame(data)
            if frame is not None:
                if more or core.held:
                    if core.hold(frame) or not more:
                        await self.flush()
                    return
                async with self._send_lock:
                    await self._write(frame)
                return
        if core.held:
            await self.flush()  # keep the order: held messages first
        size = memoryview(data).nbytes
        use_memfd = core.use_memfd(size, memfd)
        try:
            await self._send(data, fds, use_memfd, address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE or memfd is not None or use_memfd or core.stream:
                raise
            if not available():  # pragma: no cover - not Linux
                raise
            await self._send(data, fds, True, address)

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
        out, mfd = self._core.outgoing_buffer(buf, length, fds, address)
        try:
            await self._push(out)
        finally:
            os.close(mfd)

    async def _write(self, frame: bytes) -> None:
        """Write whole frames (the send lock is held)."""
        sock, sent = self._core.sock, 0
        try:
            while sent < len(frame):
                try:
                    sent += sock.send(frame[sent:] if sent else frame)
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
                await self._write(self._core.take_held())

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
        async with self._recv_lock:
            while True:
                if core.decoder is not None:
                    data = core.decoder.next_plain()  # fast path: no descriptors, no memfd
                    if data is not None:
                        return Message(data)
                    msg = core.next_message()
                    if msg is not None:
                        return msg
                try:
                    msg = core.receive_once()
                except BlockingIOError:
                    await self._wait(writable=False)
                    continue
                if msg is not None:
                    return msg

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
            with contextlib.suppress(OSError):
                core.sock.send(core.take_held())
        core.close()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut, (loop, writable) in waiters.items():
            if writable:
                loop.remove_writer(self._fd)
            else:
                loop.remove_reader(self._fd)
            if not fut.done():
                fut.set_exception(AfunixError(errno.EBADF, "the channel was closed"))

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
