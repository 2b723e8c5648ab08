"""The asynchronous face of :mod:`afunix.channel`: :class:`AsyncChannel` (asyncio, trio).

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
under asyncio the channel waits for readiness with ``add_reader``/``add_writer``
(:mod:`afunix._backends.asyncio`); its reader callback receives for the
waiting tasks. Under trio (and anyio on trio) receiving tasks take turns
under a fair lock, each waiting with ``wait_readable`` (:mod:`afunix._backends.trio`).
Every decision is :class:`~afunix._protocol.machine.ChannelProtocol`'s,
every system call :mod:`afunix._io`'s: this class locks, waits and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._address import Address, AddressLike
from ._backends import asyncio_loop, in_trio, new_lock, notify_closing, to_thread, wait_writable
from ._backends.asyncio import Waiter
from ._cmsg import SCM_MAX_FD, FdLike
from ._connect import check_tls, connect, connect_nowait, connect_tls
from ._errors import AfunixError
from ._io import (
    frame_limit,
    protocol_for,
    receive,
    receiver_for,
    recv_frame,
    send_frame,
    try_frame,
    write_some,
)
from ._memfd import MEMFD_THRESHOLD, MemfdBuffer
from ._peer import TlsPeer
from ._protocol import CLOSED, DEFAULT_MAX_SIZE, NEED_DATA
from ._protocol.framing import hold_frame
from ._protocol.machine import HOLD_MAX, RECV_BUFSIZE, ChannelProtocol
from ._protocol.message import Message
from ._protocol.timeouts import ReceiveWait, check_timeouts, timed_out
from ._protocol.write import BROKEN, OPEN, Write
from ._sockets import SocketTypeLike, listen, pair, type_name
from ._tlsio import TlsSocket

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = ["AsyncChannel"]


def _attempt(sock: socket.socket, proto: ChannelProtocol) -> Any:
    """The reader callback's receive: a result, or ``None`` to wait (holds no channel)."""
    receiver = receiver_for(sock)
    inline = receiver is receive

    def attempt(read: bool) -> Any:
        if not proto.idle:
            event = proto.next_event()
            if event is not NEED_DATA:
                return event
        if not read:
            return None
        try:
            if inline and (view := proto.rview) is not None and proto.idle:
                # The lean receive (see _io.receive), inline: one simple frame is the
                # message; None: nothing there yet (the socket is non-blocking).
                got = recv_frame(sock, view, proto.control_space, proto.max_size, proto.maxfds)
                if type(got) is not tuple:
                    return got
                proto.received(got[0], got[1], got[2], None)
                event = proto.next_event()
            else:
                event = receiver(sock, proto)
        except BlockingIOError:
            return None
        return None if event is NEED_DATA else event

    return attempt


class AsyncChannel:
    """Messages with descriptors over one Unix-domain socket (or TCP), for asyncio.

    The arguments are those of :class:`~afunix.Channel` (and so are the rules
    over ``tcp://`` and ``ssh://``: no descriptors, memfds or credentials). Concurrent
    :meth:`send` calls never interleave; concurrent :meth:`recv` calls are
    served in the order they came. :meth:`close` wakes any task waiting on
    the channel with an ``EBADF`` error. A message taken for a task cancelled
    before it ran goes to the next receiver, never lost.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        maxfds: int = SCM_MAX_FD,
        memfd_threshold: int | None = MEMFD_THRESHOLD,
        recv_bufsize: int = RECV_BUFSIZE,
        credentials: bool = False,
        max_fds_in_flight: int | None = None,
        accept_memfd: bool = True,
        idle_timeout: float | None = None,
        message_timeout: float | None = None,
        send_timeout: float | None = None,
        fd_room: int | None = None,
        discard_fds: bool = False,
    ) -> None:
        check_timeouts(idle_timeout, message_timeout, send_timeout)
        self._proto = proto = protocol_for(
            sock,
            max_size=max_size,
            maxfds=maxfds,
            memfd_threshold=memfd_threshold,
            accept_memfd=accept_memfd,
            credentials=credentials,
            max_fds_in_flight=max_fds_in_flight,
            recv_bufsize=recv_bufsize,
            fd_room=fd_room,
            discard_fds=discard_fds,
        )
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        #: Largest payload the core's send_frame takes (-1: none), and whether with descriptors.
        self._frame_limit = frame_limit(sock, proto)
        self._fds_fast = proto.carries_fds
        self._waiter = Waiter(self._fd, _attempt(sock, proto))
        if isinstance(sock, TlsSocket) and sock.buffered:
            # Records that came with the handshake (or before a byte-level reader
            # made this channel) are decrypted here, not signalled by the socket again.
            self._waiter.ready = True
        self._send_lock: Any = None  # made at first contention (asyncio's or trio's)
        self._recv_lock: Any = None  # trio only: receiving tasks take turns
        self._trio = False  # used under trio: warn trio's waiters before closing
        #: Tasks in the locked send path (writing, or waiting to).
        self._senders = 0
        self._idle_timeout = idle_timeout
        self._message_timeout = message_timeout
        self._send_timeout = send_timeout
        self._timed = idle_timeout is not None or message_timeout is not None

    # -- opening ---------------------------------------------------------------

    @classmethod
    def from_socket(cls, sock: socket.socket, **options: Any) -> AsyncChannel:
        """Wrap *sock* (made non-blocking; ``AF_UNIX`` or connected TCP); the channel owns it."""
        return cls(sock, **options)

    @classmethod
    async def connect(
        cls,
        address: AddressLike,
        type: SocketTypeLike = "stream",
        *,
        timeout: float | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **options: Any,
    ) -> AsyncChannel:
        """Connect with :func:`afunix.connect` and wrap the socket.

        One non-blocking connect first; only when it would wait (a full listen
        queue makes a Unix connect wait in the kernel) or needs
        :func:`afunix.connect`'s patience does it go to a worker thread, as
        ``tcp://``, ``tls://`` (connect and handshake, with *ssl* and
        *server_hostname* as for :meth:`Channel.connect`) and ``ssh://`` (an
        ``ssh`` login) always do.
        """
        sock: Any
        if check_tls(Address.parse(address), ssl):
            assert ssl is not None  # (check_tls refuses tls:// without it)
            sock = await to_thread(
                functools.partial(
                    connect_tls, address, ssl, timeout=timeout, server_hostname=server_hostname
                )
            )
        else:
            sock = connect_nowait(address, type)
        if sock is None:
            sock = await to_thread(functools.partial(connect, address, type, timeout=timeout))
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

    # -- using ---------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (do not read or write it directly)."""
        return self._sock

    @property
    def type(self) -> str:
        return type_name(self._proto.kind)

    @property
    def closed(self) -> bool:
        return self._proto.state is not OPEN

    @property
    def tls_peer(self) -> TlsPeer | None:
        """Over ``tls://``: the peer's verified certificate; see :attr:`Channel.tls_peer`."""
        return getattr(self._sock, "tls_peer", None)

    def fileno(self) -> int:
        return self._sock.fileno()

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
        proto = self._proto
        if self._senders:  # someone is writing: in line behind them
            await self._write(None, (data, fds, memfd, address, more))
            return
        if memfd is None and address is None and proto.state is OPEN:
            # One small frame: the core sends it (of ints) or holds it (without
            # descriptors), or says -1 (not its case, or no room: the protocol takes it).
            if not more:
                if not proto.holding and (self._fds_fast or not fds):
                    sent = send_frame(self._sock, data, fds, self._frame_limit)
                    if sent >= 0:
                        if sent < len(data) + 8:  # (descriptors went with the first byte)
                            await self._write(proto.rest_of(data, sent, len(fds)))  # type: ignore[arg-type]
                        return
            elif not fds and (held := hold_frame(proto.held, data, self._frame_limit)) >= 0:
                proto.holding = True
                if held >= HOLD_MAX:
                    await self.flush()
                return
        out = proto.send(data, fds, memfd=memfd, address=address, more=more)
        if isinstance(out, bytes):  # uncontended small message: one send, no lock
            frame = out
            try:
                out = try_frame(self._sock, frame, proto)
            except BlockingIOError:
                out = proto.rest_of(frame, 0)
        if out is not None:
            await self._write(out)

    async def send_buffer(
        self, buf: MemfdBuffer, length: int, fds: Iterable[FdLike] = (), *, address: Any = None
    ) -> None:
        """Seal *buf* and send it as the payload; see :meth:`Channel.send_buffer`."""
        if self._senders:
            await self._write(None, (buf, length, fds, address))
            return
        await self._write(self._proto.send_buffer(buf, length, fds, address=address))

    async def flush(self) -> None:
        """Write the messages held by ``send(..., more=True)`` now."""
        if self._senders:
            await self._write(None, ())
        else:
            out = self._proto.flush()
            if out is not None:
                await self._write(out)

    async def _write(self, out: Write | None, later: tuple[Any, ...] = ()) -> None:
        """Write *out* (or, in line behind other senders, what *later* makes) and what
        is queued behind it, under the send lock."""
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = new_lock()
        proto = self._proto
        self._senders += 1
        try:
            async with lock:
                if out is None:
                    out = self._make(later)
                while out is not None:
                    await self._write_one(out)
                    out = proto.next_write() if proto.queued else None
        finally:
            self._senders -= 1

    def _make(self, later: tuple[Any, ...]) -> Write | None:
        proto = self._proto
        if not later:
            return proto.flush()
        if len(later) == 4:
            buf, length, fds, address = later
            return proto.send_buffer(buf, length, fds, address=address)
        data, fds, memfd, address, more = later
        out = proto.send(data, fds, memfd=memfd, address=address, more=more)
        if isinstance(out, bytes):
            return proto.rest_of(out, 0)
        return out

    async def _write_one(self, out: Write) -> None:
        proto, sock = self._proto, self._sock
        while True:
            try:
                if write_some(sock, out):
                    if out.owned:
                        proto.write_done(out)  # (the refs go with the Write, right after)
                    return
                continue
            except BlockingIOError:
                pass  # wait outside the handler (no "during handling of" context)
            except BaseException as exc:
                again = proto.write_failed(out, exc)
                if again is None:
                    if proto.state is BROKEN:
                        self.close()  # half a message went out: the framing is lost
                    raise
                out = again
                continue
            try:
                await self._writable()
            except BaseException as exc:
                proto.write_failed(out, exc)
                if proto.state is BROKEN:
                    self.close()
                raise

    async def _writable(self) -> None:
        if self._proto.state is not OPEN:
            raise _closed()
        loop = asyncio_loop()
        if loop is None:  # trio (outside both runtimes, in_trio raises)
            in_trio()
            self._trio = True
            if not await wait_writable(self._fd, self._send_timeout):
                raise timed_out("send", self._send_timeout)
            return
        waiter = self._waiter
        fut = waiter.writable(loop)
        try:
            if self._send_timeout is None:
                await fut
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), self._send_timeout)
                except TimeoutError:
                    raise timed_out("send", self._send_timeout) from None
        finally:
            waiter.forget_writer(fut)

    async def recv(self, *, timeout: float | None = None) -> Message:
        """Receive one message. ``EOFError`` when the peer has closed.

        *timeout*: see :meth:`Channel.recv` (``PeerTimeout`` with ``expired == "call"``).
        """
        proto = self._proto
        if proto.holding:
            await self.flush()  # a reply may depend on what we hold
        waiter = self._waiter
        if not waiter.receivers and (waiter.ready or not proto.idle):
            # Nobody else is receiving: a message decoded already is ours, and when
            # data came while nobody waited, one receive takes it without a loop turn.
            read, waiter.ready = waiter.ready, False
            try:
                event = waiter.attempt(read)
            except BaseException:
                if proto.state is BROKEN:
                    self.close()
                raise
            if event is not None:
                if event is CLOSED:
                    raise EOFError("the peer closed the channel")
                return event  # type: ignore[no-any-return]
        if proto.state is not OPEN:
            raise _closed()
        until = None
        if timeout is not None:
            if not timeout >= 0:
                raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
            until = time.monotonic() + timeout
        loop = asyncio_loop()
        if loop is None:  # trio (outside both runtimes, in_trio raises)
            in_trio()
            return await self._recv_trio(until, timeout)
        fut = waiter.receive(loop)
        try:
            timed = self._timed or until is not None
            event = await (fut if not timed else self._timed_wait(fut, until, timeout))
        except asyncio.CancelledError:
            self._rescue(fut)
            raise
        except BaseException:
            if proto.state is BROKEN:
                self.close()
            raise
        if event is CLOSED:
            raise EOFError("the peer closed the channel")
        return event  # type: ignore[no-any-return]

    def _rescue(self, fut: asyncio.Future[Any]) -> None:
        """A receiver was cancelled: a message already taken for it goes to the next one."""
        self._waiter.forget(fut)
        if not fut.done():
            fut.cancel()
        if not fut.cancelled() and fut.exception() is None:
            result = fut.result()
            if isinstance(result, Message) and not self._waiter.give_back(result):
                self._proto.push_back(result)

    async def _timed_wait(
        self, fut: asyncio.Future[Any], until: float | None, timeout: float | None
    ) -> Any:
        """*fut* within the idle timeout, and once a message began, the message timeout;
        and all of it by *until* (the call's ``timeout``), if given."""
        proto = self._proto
        wait = ReceiveWait(
            self._idle_timeout, self._message_timeout, time.monotonic(), until, timeout, poll=True
        )
        while True:
            limit = wait.limit(proto.receiving, time.monotonic())
            done, _ = await asyncio.wait([fut], timeout=limit)
            if done:
                return fut.result()
            error = wait.expired(proto.receiving)
            if error is not None:
                self._rescue(fut)
                raise error

    async def _recv_trio(self, until: float | None, timeout: float | None) -> Message:
        """:meth:`recv` under trio: receivers take turns under a fair lock, each
        receiving and waiting for readability until a message (or the end) comes.

        The idle timeout counts from the call, waiting for the turn included;
        the message timeout from the moment a message has begun; the call's
        *timeout* (by *until*) bounds all of it.
        """
        from ._backends import trio as trio_rt

        self._trio = True
        proto = self._proto
        idle, message = self._idle_timeout, self._message_timeout
        wait = ReceiveWait(idle, message, time.monotonic(), until, timeout)
        lock = self._recv_lock
        if lock is None:
            lock = self._recv_lock = new_lock()
        if not await trio_rt.acquire(lock, wait.limit(False, wait.start)):
            error = wait.expired(False)  # (no limit: the turn is waited for, however long)
            assert error is not None
            raise error
        try:
            while True:
                if proto.state is not OPEN:
                    raise _closed()
                try:
                    event = self._waiter.attempt(True)
                except BaseException:
                    if proto.state is BROKEN:
                        self.close()
                    raise
                if event is not None:
                    break
                limit = wait.limit(proto.receiving, time.monotonic())
                if not await trio_rt.wait_ready(self._fd, False, limit):  # (no read meanwhile)
                    error = wait.expired(proto.receiving)
                    if error is not None:
                        raise error
        finally:
            lock.release()
        if event is CLOSED:
            raise EOFError("the peer closed the channel")
        return event  # type: ignore[no-any-return]

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
        proto = self._proto
        if proto.state is OPEN and proto.holding:
            out = proto.flush()
            if out is not None:
                with contextlib.suppress(OSError):
                    write_some(self._sock, out)
                proto.write_done(out)
        try:
            self._waiter.close()  # before the socket closes: see Waiter.close
            if self._trio:
                notify_closing(self._fd)  # trio's waiters wake with EBADF
        finally:
            proto.close()
            self._sock.close()

    def __del__(self) -> None:
        # A channel nobody closed is being collected (its socket closes next, with a
        # ResourceWarning): take its reader off the loop, whose selector would
        # otherwise keep the descriptor number for a socket that is gone.
        waiter = getattr(self, "_waiter", None)  # None: __init__ failed early
        if waiter is not None and waiter.loop is not None:
            try:  # no module globals here: they may be gone at interpreter exit
                waiter.stop_reading()
            except (RuntimeError, OSError):  # pragma: no cover - a loop of another thread
                pass

    async def aclose(self) -> None:
        """Flush held messages, then close."""
        try:
            if self._proto.holding and self._proto.state is OPEN:
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


def _closed() -> OSError:
    return AfunixError(errno.EBADF, "the channel is closed")
