"""The broker's clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

::

    from afunix.broker import Client

    with Client("/run/afunix-broker.sock") as broker:
        with broker.open("/srv/data/report.txt") as f:         # like open(..., "rb")
            data = f.read()
        with broker.open("/srv/out/log.txt", os.O_WRONLY | os.O_APPEND) as f:
            f.write(b"one more line\\n")
        names = broker.listdir("/srv/data")

``open(path, flags=os.O_RDONLY, mode=0o666)`` takes ``os.open`` flags (or a
mode string of the built-in ``open``: ``"r"``, ``"wb"``, ``"a"``, ``"x"``,
``"r+"``, ...) and returns a file object, or raises
``OSError(errno, strerror, path)``, so ``FileNotFoundError``,
``PermissionError`` and friends arrive exactly as ``open`` would raise them.
As with ``open``, the process's umask is applied to *mode* before it is sent.
Flags the broker does not support raise ``OSError(EINVAL)`` before anything
is sent.

Failures of the broker itself (not running, killed mid-request, too slow,
speaking nonsense) raise :class:`BrokerError`, an ``OSError`` with the errno
that says which (``ECONNREFUSED``/``ENOENT``, ``ECONNRESET``, ``ETIMEDOUT``,
``EPROTO``), always within ``timeout`` seconds and never with ``SIGPIPE``
(requests are sent with ``MSG_NOSIGNAL``).

A client holds one connection and sends one request at a time (a lock makes
it safe to share between threads); it reconnects once if the broker went
away between two requests.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from typing import IO, Any

from .. import AfunixError, ProtocolError, connect
from .._protocol import CLOSED, NEED_DATA, FrameError, RawMessage
from ..lowlevel import AddressLike, recv_fds, strerror
from . import flags as _flags
from .protocol import KIND_ERROR, Connection, OpenRequest, Reply, decode_reply, encode_request

__all__ = ["AsyncClient", "BrokerError", "Client", "mode_to_flags"]

#: Largest reply frame: header + fixed part + message.
_MAX_REPLY = 8 + 12 + 1024 + 16


class BrokerError(AfunixError):
    """The broker could not answer: not running, gone, too slow, or broke the protocol."""


def mode_to_flags(mode: str) -> int:
    """A built-in ``open`` mode string (``"r"``, ``"wb"``, ``"a+"``, ``"x"``) -> ``os`` flags."""
    chars = set(mode) - {"b", "t"}
    if len(chars & set("rwax")) != 1 or chars - set("rwax+") or len(mode) != len(set(mode)):
        raise ValueError(f"invalid mode: {mode!r}")
    plus = "+" in chars
    if "r" in chars:
        return os.O_RDWR if plus else os.O_RDONLY
    acc = os.O_RDWR if plus else os.O_WRONLY
    if "w" in chars:
        return acc | os.O_CREAT | os.O_TRUNC
    if "a" in chars:
        return acc | os.O_CREAT | os.O_APPEND
    return acc | os.O_CREAT | os.O_EXCL


def _umask() -> int:
    """This process's umask without changing it (``/proc``), else the swap dance."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):  # pragma: no cover - no /proc
        pass
    old = os.umask(0o022)  # pragma: no cover
    os.umask(old)  # pragma: no cover
    return old  # pragma: no cover


def _prepare(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes], flags: int | str, mode: int
) -> tuple[bytes, int, int, str | None, str]:
    """Check locally, as ``open`` would: (abs path, wire flags, mode, text mode, shown)."""
    text_mode: str | None = None
    if isinstance(flags, str):
        text_mode = flags
        osflags = mode_to_flags(flags)
    else:
        osflags = flags
    raw = os.fsencode(path)
    shown = os.fsdecode(raw)
    if b"\0" in raw:
        raise ValueError("embedded null byte")
    if not raw:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown)
    if not raw.startswith(b"/"):
        raw = os.path.abspath(raw)  # lexically, as the shell user means it
    try:
        wire = _flags.from_os_flags(osflags)
    except _flags.FlagError as exc:
        raise OSError(exc.errno, exc.reason, shown) from None
    wmode = (mode & ~_umask() & 0o777) if wire & _flags.Wire.CREATE else 0
    return raw, wire, wmode, text_mode, shown


def _file_object(fd: int, wire: int, text_mode: str | None, buffering: int) -> IO[Any]:
    """Wrap a received descriptor the way ``open`` would have."""
    if text_mode is not None:
        return open(fd, text_mode, buffering=buffering, closefd=True)
    if wire & _flags.Wire.READ and wire & _flags.Wire.WRITE:
        fmode = "a+b" if wire & _flags.Wire.APPEND else "r+b"
    elif wire & _flags.Wire.WRITE:
        fmode = "ab" if wire & _flags.Wire.APPEND else "wb"
    else:
        fmode = "rb"
    # On a descriptor "wb" truncates nothing: the broker already did (or not), as asked.
    return open(fd, fmode, buffering=buffering, closefd=True)


def _raise_for(reply: Reply, shown: str) -> None:
    if reply.kind == KIND_ERROR:
        raise BrokerError(
            reply.errno or errno.EPROTO,
            f"the broker refused the request as malformed: {reply.message} "
            f"[{errno.errorcode.get(reply.errno, reply.errno)}]",
            shown,
        )
    exc = OSError(reply.errno, strerror(reply.errno), shown)
    exc.broker_reason = reply.message  # type: ignore[attr-defined]
    raise exc


class _ClientBase:
    """What the blocking and the asyncio client share: the connection and its framing."""

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._proto: Connection | None = None

    def _adopt(self, sock: socket.socket) -> tuple[socket.socket, Connection]:
        self._sock = sock
        self._proto = Connection(max_size=_MAX_REPLY, max_fds=1)
        return sock, self._proto

    @staticmethod
    def _unreachable(exc: OSError) -> BrokerError:
        return BrokerError(
            exc.errno or errno.ECONNREFUSED, f"cannot reach the broker: {exc.strerror or exc}"
        )

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        if self._proto is not None:
            self._proto.close()
            self._proto = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Client(_ClientBase):
    """A blocking broker client. See the module docs.

    Args:
        address: the broker's socket (path or ``@abstract``).
        timeout: seconds for each request, connecting included.
    """

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        super().__init__(address, timeout=timeout)
        self._lock = threading.Lock()

    # --------------------------------------------------------------- connection
    def _connect(self, deadline: float) -> tuple[socket.socket, Connection]:
        if self._sock is None or self._proto is None:
            try:
                sock = connect(self.address, timeout=max(deadline - time.monotonic(), 0.001))
            except OSError as exc:
                raise self._unreachable(exc) from exc
            return self._adopt(sock)
        return self._sock, self._proto

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ request
    def request(self, path: bytes, wire_flags: int, mode: int = 0) -> tuple[Reply, int | None]:
        """Send one raw request; return the reply and the descriptor (owned by the caller).

        No local checks: this is the protocol as is (tests use it to send what
        a hostile client would).
        """
        with self._lock:
            deadline = time.monotonic() + self.timeout
            for attempt in (0, 1):
                fresh = self._sock is None
                sock, proto = self._connect(deadline)
                frame = encode_request(OpenRequest(proto.new_id(), path, wire_flags, mode))
                try:
                    self._send(sock, frame, deadline)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    refused = _refusal(sock, proto) if fresh else None
                    self.close()  # gone since the last request: reconnect once
                    if refused is not None:
                        return refused, None
                    if attempt:
                        raise BrokerError(
                            exc.errno or errno.EPIPE, "the broker closed the connection"
                        ) from exc
                    continue
                rid = int.from_bytes(frame[12:16], "big")
                return self._receive(sock, proto, rid, deadline)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, sock: socket.socket, frame: bytes, deadline: float) -> None:
        view = memoryview(frame)
        while view:
            sock.settimeout(self._left(deadline))
            try:
                n = sock.send(view, socket.MSG_NOSIGNAL)
            except TimeoutError as exc:
                self.close()
                raise self._timed_out() from exc
            view = view[n:]

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise self._timed_out()
        return left

    def _timed_out(self) -> BrokerError:
        return BrokerError(errno.ETIMEDOUT, f"the broker did not answer within {self.timeout:g}s")

    def _receive(
        self, sock: socket.socket, proto: Connection, rid: int, deadline: float
    ) -> tuple[Reply, int | None]:
        while True:
            try:
                got = proto.next_frame()
            except FrameError as exc:
                self.close()
                raise BrokerError(exc.errno or errno.EPROTO, f"bad reply: {exc.strerror}") from exc
            if isinstance(got, RawMessage):
                try:
                    reply, fd = decode_reply(got)
                except ProtocolError:
                    self.close()
                    raise
                if reply.closing:
                    self.close()
                if reply.id != rid and not (reply.kind == KIND_ERROR and reply.id == 0):
                    if fd is not None:
                        os.close(fd)
                    self.close()
                    raise BrokerError(errno.EPROTO, f"reply to request {reply.id}, expected {rid}")
                return reply, fd
            if got is CLOSED:
                self.close()
                raise BrokerError(
                    errno.ECONNRESET, "the broker closed the connection before answering"
                )
            assert got is NEED_DATA
            sock.settimeout(self._left(deadline))
            try:
                data, fds, _f, _a = recv_fds(sock, 4096, 1)
            except TimeoutError as exc:
                self.close()
                raise self._timed_out() from exc
            except OSError as exc:
                self.close()
                if isinstance(exc, AfunixError):
                    raise BrokerError(exc.errno or errno.EPROTO, str(exc)) from exc
                raise BrokerError(
                    exc.errno or errno.ECONNRESET,
                    f"lost the broker while waiting for the answer: {exc.strerror}",
                ) from exc
            proto.receive_data(data, fds)

    def open_fd(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        flags: int = os.O_RDONLY,
        mode: int = 0o666,
    ) -> int:
        """Like ``os.open``: a descriptor (close-on-exec, owned by the caller)."""
        raw, wire, wmode, _text, shown = _prepare(path, flags, mode)
        reply, fd = self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        return fd

    def open(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        flags: int | str = os.O_RDONLY,
        mode: int = 0o666,
        *,
        buffering: int = -1,
    ) -> IO[Any]:
        """Like ``open``: a file object (binary for ``os`` flags), or ``OSError(errno, ...)``."""
        raw, wire, wmode, text_mode, shown = _prepare(path, flags, mode)
        if wire & _flags.Wire.DIR:
            raise IsADirectoryError(
                errno.EISDIR, "O_DIRECTORY gives no file object: use open_fd() or listdir()", shown
            )
        reply, fd = self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        try:
            return _file_object(fd, wire, text_mode, buffering)
        except BaseException:
            os.close(fd)
            raise

    def listdir(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> list[str]:
        """The names in a directory, through a directory descriptor from the broker."""
        fd = self.open_fd(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)


class AsyncClient(_ClientBase):
    """The asyncio twin of :class:`Client`: ``await client.open(...)``."""

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        super().__init__(address, timeout=timeout)
        self._lock = asyncio.Lock()

    async def _connect(self) -> tuple[socket.socket, Connection]:
        if self._sock is None or self._proto is None:
            loop = asyncio.get_running_loop()
            try:
                sock = await loop.run_in_executor(
                    None, lambda: connect(self.address, timeout=self.timeout)
                )
            except OSError as exc:
                raise self._unreachable(exc) from exc
            sock.setblocking(False)
            return self._adopt(sock)
        return self._sock, self._proto

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def request(
        self, path: bytes, wire_flags: int, mode: int = 0
    ) -> tuple[Reply, int | None]:
        """One raw request (see :meth:`Client.request`)."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._request(path, wire_flags, mode), self.timeout)
            except TimeoutError as exc:
                self.close()
                raise BrokerError(
                    errno.ETIMEDOUT, f"the broker did not answer within {self.timeout:g}s"
                ) from exc
            except BaseException:
                self.close()
                raise

    async def _request(self, path: bytes, wire_flags: int, mode: int) -> tuple[Reply, int | None]:
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            fresh = self._sock is None
            sock, proto = await self._connect()
            rid = proto.new_id()
            frame = encode_request(OpenRequest(rid, path, wire_flags, mode))
            try:
                await _send_all(loop, sock, frame)
            except (BrokenPipeError, ConnectionResetError) as exc:
                refused = _refusal(sock, proto) if fresh else None
                self.close()
                if refused is not None:
                    return refused, None
                if attempt:
                    raise BrokerError(
                        exc.errno or errno.EPIPE, "the broker closed the connection"
                    ) from exc
                continue
            while True:
                try:
                    got = proto.next_frame()
                except FrameError as exc:
                    raise BrokerError(
                        exc.errno or errno.EPROTO, f"bad reply: {exc.strerror}"
                    ) from exc
                if isinstance(got, RawMessage):
                    reply, fd = decode_reply(got)
                    if reply.closing:
                        self.close()
                    if reply.id != rid and not (reply.kind == KIND_ERROR and reply.id == 0):
                        if fd is not None:
                            os.close(fd)
                        raise BrokerError(
                            errno.EPROTO, f"reply to request {reply.id}, expected {rid}"
                        )
                    return reply, fd
                if got is CLOSED:
                    raise BrokerError(
                        errno.ECONNRESET, "the broker closed the connection before answering"
                    )
                data, fds = await _recv(loop, sock)
                proto.receive_data(data, fds)
        raise AssertionError("unreachable")  # pragma: no cover

    async def open_fd(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        flags: int = os.O_RDONLY,
        mode: int = 0o666,
    ) -> int:
        """Like ``os.open``, awaited."""
        raw, wire, wmode, _text, shown = _prepare(path, flags, mode)
        reply, fd = await self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        return fd

    async def open(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        flags: int | str = os.O_RDONLY,
        mode: int = 0o666,
        *,
        buffering: int = -1,
    ) -> IO[Any]:
        """Like ``open``, awaited (the file object itself is an ordinary, blocking one)."""
        raw, wire, wmode, text_mode, shown = _prepare(path, flags, mode)
        if wire & _flags.Wire.DIR:
            raise IsADirectoryError(
                errno.EISDIR, "O_DIRECTORY gives no file object: use open_fd() or listdir()", shown
            )
        reply, fd = await self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        try:
            return _file_object(fd, wire, text_mode, buffering)
        except BaseException:
            os.close(fd)
            raise

    async def listdir(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> list[str]:
        fd = await self.open_fd(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            await _wait(loop, sock, writable=True)
            continue
        view = view[n:]


def _refusal(sock: socket.socket, proto: Connection) -> Reply | None:
    """The error frame a broker sent a new connection before closing it, if any.

    A broker refuses a client past its per-uid connection limit right after
    ``accept`` (``EAGAIN``, "too many connections"); the client's request then
    meets a closed socket, but the reason is waiting to be read.
    """
    sock.setblocking(False)
    try:
        while True:
            got = proto.next_frame()
            if isinstance(got, RawMessage):
                reply, fd = decode_reply(got)
                if fd is not None:
                    os.close(fd)
                return reply if reply.kind == KIND_ERROR else None
            if got is CLOSED:
                return None
            data, fds, _f, _a = recv_fds(sock, 4096, 1)
            proto.receive_data(data, fds)
    except (OSError, FrameError, ProtocolError):
        return None


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            data, fds, _f, _a = recv_fds(sock, 4096, 1)
        except BlockingIOError:
            await _wait(loop, sock, writable=False)
            continue
        except AfunixError as exc:
            raise BrokerError(exc.errno or errno.EPROTO, str(exc)) from exc
        except OSError as exc:
            raise BrokerError(
                exc.errno or errno.ECONNRESET,
                f"lost the broker while waiting for the answer: {exc.strerror}",
            ) from exc
        return data, fds


async def _wait(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
