"""Servers: one listening socket, a handler, and a concurrency model (UNP 15.5, 15.6).

A handler is a function of one argument. For stream and seqpacket servers
it gets a :class:`Connection` (``model="thread"`` or ``"fork"``) or an
:class:`AsyncConnection` (``model="asyncio"``, the default, with an
``async def`` handler)::

    import afunix

    async def echo(conn: afunix.AsyncConnection) -> None:
        while data := await conn.recv():
            await conn.send(data)

    afunix.Server("/tmp/echo.sock", echo).serve_forever()

    def echo_sync(conn: afunix.Connection) -> None:
        for chunk in conn:              # until the client closes
            conn.send(chunk)

    afunix.Server("/tmp/echo.sock", echo_sync, model="fork").serve_forever()

For datagram servers the handler gets a :class:`Datagram` and returns the
reply (``bytes``) or ``None``; the reply goes to the sender's address, which
exists only if the client bound one (UNP 15.4 point 8).

The models:

``asyncio``
    one event loop, a task per connection; scales to many idle connections.
``thread``
    a thread per connection (``max_clients`` bounds them; past it new
    clients wait in the listen queue).
``fork``
    the book's model: a child process per connection, the listening socket
    closed in the child, ``SIGCHLD`` reaped with a ``waitpid(WNOHANG)`` loop
    and ``accept`` restarted after ``EINTR``. Only the server's *own*
    children are reaped (``waitpid(pid)`` for each, not ``waitpid(-1)``),
    so a library user's ``subprocess`` children keep their exit status.

``SIGTERM`` and ``SIGINT`` (when serving in the main thread) stop accepting,
let connections in flight finish for up to ``shutdown_timeout`` seconds,
then close the rest and remove the socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ._address import Address, AddressLike
from ._sockets import Socket, SocketTypeLike, listen, socket_type

__all__ = [
    "AsyncConnection",
    "Connection",
    "Datagram",
    "Handler",
    "Model",
    "Server",
]

log = logging.getLogger("afunix.server")

Model: TypeAlias = Literal["asyncio", "thread", "fork"]
Handler: TypeAlias = Callable[[Any], Any]
Verifier: TypeAlias = Callable[[socket.socket, Address], bool]

_BUFSIZE = 65536


class Connection:
    """One client connection, for ``thread`` and ``fork`` handlers.

    ``recv`` returns ``b""`` at end of file; iterating yields chunks until
    then. On a seqpacket socket each ``recv`` is one record.
    """

    def __init__(self, sock: socket.socket, peer: Address) -> None:
        self.sock = sock
        self.peer = peer

    def recv(self, bufsize: int = _BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF."""
        return self.sock.recv(bufsize)

    def send(self, data: bytes) -> None:
        """Send all of *data*."""
        self.sock.sendall(data)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class AsyncConnection:
    """One client connection, for ``asyncio`` handlers (stream or seqpacket)."""

    def __init__(self, sock: socket.socket, peer: Address) -> None:
        self.sock = sock
        self.peer = peer
        self._loop = asyncio.get_running_loop()

    async def recv(self, bufsize: int = _BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF."""
        return await self._loop.sock_recv(self.sock, bufsize)

    async def send(self, data: bytes) -> None:
        """Send all of *data*."""
        await self._loop.sock_sendall(self.sock, data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Datagram:
    """A datagram received by a datagram server; return the reply from the handler."""

    data: bytes
    sender: Address


def _is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    )


class Server:
    """A Unix-domain (or TCP) server. See the module docs for handler shapes.

    The socket is bound when the server is constructed, so errors such as
    :class:`AddressInUse` surface at once and :attr:`address` is known before
    serving. Use :meth:`serve_forever` in the foreground, or :meth:`start` /
    :meth:`stop` to run it on a background thread. A ``Server`` is a context
    manager that stops and closes it.
    """

    def __init__(
        self,
        address: AddressLike,
        handler: Handler,
        *,
        type: SocketTypeLike = "stream",
        model: Model = "asyncio",
        backlog: int = 128,
        mode: int | None = None,
        owner: str | int | None = None,
        group: str | int | None = None,
        parent_mode: int | None = None,
        max_clients: int | None = None,
        shutdown_timeout: float = 5.0,
        verify: Verifier | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if model not in ("asyncio", "thread", "fork"):
            raise ValueError(f"unknown model {model!r}: use 'asyncio', 'thread' or 'fork'")
        is_async = _is_async(handler)
        if model == "asyncio" and not is_async:
            raise TypeError(
                "model='asyncio' needs an 'async def' handler; for a plain function pass "
                "model='thread' or model='fork'"
            )
        if model != "asyncio" and is_async:
            raise TypeError(f"model={model!r} needs a plain function, not an 'async def' handler")
        if max_clients is not None and max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.handler = handler
        self.model: Model = model
        self.max_clients = max_clients
        self.shutdown_timeout = shutdown_timeout
        self.verify = verify
        self.type = socket_type(type)
        if sock is not None:
            self.sock: socket.socket = sock
        else:
            self.sock = listen(
                address,
                self.type,
                backlog=backlog,
                mode=mode,
                owner=owner,
                group=group,
                parent_mode=parent_mode,
            )
        self.address: Address = Address.from_sockaddr(self.sock.family, self.sock.getsockname())
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._children: set[int] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_stop: asyncio.Event | None = None
        #: Connections served so far (accepted and handed to a handler).
        self.served = 0
        #: Connections refused by ``verify``.
        self.rejected = 0

    # ---------------------------------------------------------------- control
    def serve_forever(self, *, handle_signals: bool | None = None) -> None:
        """Serve until :meth:`shutdown`, ``SIGTERM`` or ``SIGINT``; then clean up.

        ``handle_signals`` defaults to "when running in the main thread".
        """
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        try:
            if self.model == "asyncio":
                asyncio.run(self._serve_async(handle_signals))
            else:
                self._serve_sync(handle_signals)
        finally:
            self.close()

    def start(self) -> Server:
        """Serve on a background thread; returns once the server is accepting."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"handle_signals": False},
            name=f"afunix-server {self.address.describe()}",
            daemon=True,
        )
        self._thread.start()
        self._ready.wait(10)
        return self

    def shutdown(self) -> None:
        """Ask the server to stop (thread- and signal-safe); returns at once."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        loop, ev = self._loop, self._async_stop
        if loop is not None and ev is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def stop(self, timeout: float | None = None) -> None:
        """:meth:`shutdown`, then wait for a :meth:`start`-ed server to finish."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(self.shutdown_timeout + 5 if timeout is None else timeout)
        self.close()

    def close(self) -> None:
        """Close the listening socket (removing its file if still ours)."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- accepting
    def _verify(self, conn: socket.socket, peer: Address) -> bool:
        if self.verify is None:
            return True
        try:
            ok = self.verify(conn, peer)
        except Exception:
            log.exception("verify() raised for peer %s; refusing it", peer.describe())
            ok = False
        if not ok:
            self.rejected += 1
        return ok

    def _peer(self, raw: Any) -> Address:
        try:
            return Address.from_sockaddr(self.sock.family, raw)
        except OSError:  # pragma: no cover - unusual family
            return Address.unnamed()

    @contextlib.contextmanager
    def _signals(self, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.shutdown())
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ------------------------------------------------------ thread/fork models
    def _serve_sync(self, handle_signals: bool) -> None:
        sel = selectors.DefaultSelector()
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        workers: set[threading.Thread] = set()
        conns: set[socket.socket] = set()
        lock = threading.Lock()
        # Thread model: a slot per client; without a free slot we do not accept,
        # so new clients wait in the listen queue.
        slots = (
            threading.BoundedSemaphore(self.max_clients)
            if self.max_clients and self.model == "thread"
            else None
        )
        old_chld = None
        if self.model == "fork" and handle_signals:
            old_chld = signal.signal(signal.SIGCHLD, lambda *_: self._reap())
        try:
            with self._signals(handle_signals):
                self._ready.set()
                while not self._stop.is_set():
                    if self.model == "fork":
                        self._reap()
                        if self.max_clients and len(self._children) >= self.max_clients:
                            time.sleep(0.005)  # leave new clients in the listen queue
                            continue
                    if slots is not None and not slots.acquire(timeout=0.1):
                        continue
                    dispatched = False
                    try:
                        dispatched = self._accept_and_dispatch(sel, workers, conns, lock, slots)
                    finally:
                        if slots is not None and not dispatched:
                            slots.release()
                    workers = {w for w in workers if w.is_alive()}
        finally:
            sel.close()
            self._stop_accepting()
            self._drain_sync(workers, conns, lock)
            if old_chld is not None:
                signal.signal(signal.SIGCHLD, old_chld)

    def _accept_and_dispatch(
        self,
        sel: selectors.BaseSelector,
        workers: set[threading.Thread],
        conns: set[socket.socket],
        lock: threading.Lock,
        slots: threading.BoundedSemaphore | None,
    ) -> bool:
        """Wait briefly for a client; hand it to a thread or child.

        Returns whether a thread took over the slot (it releases it when done).
        """
        events = sel.select(timeout=0.25)
        if not any(key.fileobj is self.sock for key, _ in events):
            return False
        if self.type == socket.SOCK_DGRAM:
            self._serve_datagram_sync()
            return False
        try:
            conn, raw = self.sock.accept()  # EINTR is retried (PEP 475)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; pausing briefly", exc)
                time.sleep(0.1)
                return False
            raise
        conn.setblocking(True)
        peer = self._peer(raw)
        if not self._verify(conn, peer):
            conn.close()
            return False
        self.served += 1
        if self.model == "fork":
            self._fork_child(conn, peer)
            return False
        with lock:
            conns.add(conn)
        t = threading.Thread(
            target=self._run_thread, args=(conn, peer, conns, lock, slots), daemon=True
        )
        workers.add(t)
        t.start()
        return True

    def _serve_datagram_sync(self) -> None:
        try:
            data, raw = self.sock.recvfrom(_BUFSIZE)
        except (BlockingIOError, InterruptedError):
            return
        sender = self._peer(raw)
        self.served += 1
        if self.model == "fork":
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child; measured through its effects
                code = 0
                try:
                    self._after_fork(keep_listener=True)  # the reply leaves through it
                    self._reply(data, sender)
                except BaseException:
                    log.exception("datagram handler failed")
                    code = 1
                finally:
                    os._exit(code)
            self._children.add(pid)
        else:
            self._reply(data, sender)

    def _reply(self, data: bytes, sender: Address) -> None:
        try:
            reply = self.handler(Datagram(data, sender))
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
            return
        if reply is None:
            return
        if sender.kind.value == "unnamed":
            log.warning(
                "cannot reply to a datagram from an unbound socket (UNP 15.4 point 8); "
                "the client must bind an address"
            )
            return
        try:
            self.sock.sendto(reply, sender.sockaddr)
        except OSError as exc:
            log.warning("reply to %s failed: %s", sender.describe(), exc)

    def _run_thread(
        self,
        conn: socket.socket,
        peer: Address,
        conns: set[socket.socket],
        lock: threading.Lock,
        slots: threading.BoundedSemaphore | None,
    ) -> None:
        try:
            self.handler(Connection(conn, peer))
        except Exception:
            log.exception("handler raised for peer %s", peer.describe())
        finally:
            with lock:
                conns.discard(conn)
            conn.close()
            if slots is not None:
                slots.release()

    def _after_fork(self, keep_listener: bool = False) -> None:
        """In a forked child: drop the listener (without removing its file)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self._wake_r.close()
        self._wake_w.close()
        if keep_listener:
            return
        # Close the inherited listening descriptor but keep the file: it is the
        # parent's. detach() makes Socket.close() forget the path.
        fd = self.sock.detach() if isinstance(self.sock, Socket) else self.sock.fileno()
        with contextlib.suppress(OSError):
            os.close(fd)

    def _fork_child(self, conn: socket.socket, peer: Address) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child; measured through its effects
            code = 0
            try:
                self._after_fork()
                self.handler(Connection(conn, peer))
            except BaseException:
                log.exception("handler raised for peer %s", peer.describe())
                code = 1
            finally:
                with contextlib.suppress(OSError):
                    conn.close()
                os._exit(code)
        self._children.add(pid)
        conn.close()  # the parent's copy; the child has its own

    def _reap(self) -> None:
        """``waitpid(pid, WNOHANG)`` for each of our children (the book's SIGCHLD loop)."""
        for pid in list(self._children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                self._children.discard(pid)
                log.debug("child %d terminated", pid)

    def _stop_accepting(self) -> None:
        """Close a stream/seqpacket listener (removing its file) before draining.

        While connections in flight finish, new clients must not queue on a
        listener nobody accepts from: with the file gone they get ``ENOENT`` at
        once. A datagram socket stays open: replies still leave through it.
        """
        if self.type != socket.SOCK_DGRAM:
            self.sock.close()

    def _drain_sync(
        self, workers: set[threading.Thread], conns: set[socket.socket], lock: threading.Lock
    ) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        if self.model == "fork":
            while self._children and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.01)
            for pid in list(self._children):
                log.warning("child %d still running at shutdown; terminating it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for pid in list(self._children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._children.discard(pid)
            return
        for t in list(workers):
            t.join(max(deadline - time.monotonic(), 0))
        with lock:
            leftovers = list(conns)
        for conn in leftovers:
            log.warning("closing connection still open at shutdown")
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(workers):
            t.join(1.0)

    # ----------------------------------------------------------- asyncio model
    async def _serve_async(self, handle_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._async_stop = stop = asyncio.Event()
        if self._stop.is_set():
            stop.set()
        self.sock.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(self.max_clients) if self.max_clients else None
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.shutdown)
        try:
            self._ready.set()
            stopper = asyncio.ensure_future(stop.wait())
            while not stop.is_set():
                if limit is not None:
                    await limit.acquire()
                if self.type == socket.SOCK_DGRAM:
                    getter: Awaitable[Any] = loop.sock_recvfrom(self.sock, _BUFSIZE)
                else:
                    getter = loop.sock_accept(self.sock)
                fut = asyncio.ensure_future(getter)
                done, _ = await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if fut not in done:
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await fut
                    if limit is not None:
                        limit.release()
                    break
                try:
                    first, raw = fut.result()
                except OSError as exc:
                    if limit is not None:
                        limit.release()
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed: %s; pausing briefly", exc)
                        await asyncio.sleep(0.1)
                        continue
                    raise
                peer = self._peer(raw)
                if self.type == socket.SOCK_DGRAM:
                    task = asyncio.ensure_future(self._async_datagram(first, peer, limit))
                else:
                    conn: socket.socket = first
                    if not self._verify(conn, peer):
                        conn.close()
                        if limit is not None:
                            limit.release()
                        continue
                    task = asyncio.ensure_future(self._async_conn(conn, peer, limit))
                self.served += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            stopper.cancel()
            self._stop_accepting()
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=self.shutdown_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    log.warning("cancelled %d connections still open at shutdown", len(pending))
                    await asyncio.wait(pending, timeout=1.0)
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._loop = None

    async def _async_conn(
        self, conn: socket.socket, peer: Address, limit: asyncio.Semaphore | None
    ) -> None:
        try:
            await self.handler(AsyncConnection(conn, peer))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler raised for peer %s", peer.describe())
        finally:
            conn.close()
            if limit is not None:
                limit.release()

    async def _async_datagram(
        self, data: bytes, sender: Address, limit: asyncio.Semaphore | None
    ) -> None:
        try:
            reply = await self.handler(Datagram(data, sender))
            if reply is not None:
                if sender.kind.value == "unnamed":
                    log.warning("cannot reply to a datagram from an unbound socket")
                else:
                    await asyncio.get_running_loop().sock_sendto(self.sock, reply, sender.sockaddr)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
        finally:
            if limit is not None:
                limit.release()


# ---------------------------------------------------------------- handlers
def echo(conn: Connection) -> None:
    """The classic echo handler for ``thread``/``fork`` stream and seqpacket servers."""
    for chunk in conn:
        conn.send(chunk)


async def async_echo(conn: AsyncConnection) -> None:
    """The classic echo handler for ``asyncio`` stream and seqpacket servers."""
    while chunk := await conn.recv():
        await conn.send(chunk)


def datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender."""
    return dgram.data


async def async_datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender (asyncio model)."""
    return dgram.data


def echo_handler(model: Model, sock_type: int) -> Handler:
    """The echo handler that fits *model* and *sock_type*."""
    if sock_type == socket.SOCK_DGRAM:
        return async_datagram_echo if model == "asyncio" else datagram_echo
    return async_echo if model == "asyncio" else echo
