"""The broker's clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio, trio).

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
(a channel sends with ``MSG_NOSIGNAL``).

Both clients speak through a channel (:class:`afunix.Channel`,
:class:`afunix.AsyncChannel`: it frames each body and carries the
descriptor). :class:`AsyncClient` runs under asyncio and under trio (and
anyio on either). A client holds one connection and sends one request at a
time (a lock makes it safe to share between threads, or tasks); it
reconnects once if the broker went away between two requests.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from typing import IO, Any

from .. import AfunixError, AsyncChannel, Channel, PeerTimeout, ProtocolError
from ..lowlevel import AddressLike, close_fds, strerror
from . import flags as _flags
from .protocol import KIND_ERROR, OpenRequest, Reply, decode_reply, encode_request, next_id

__all__ = ["AsyncClient", "BrokerError", "Client", "mode_to_flags"]

#: Largest reply body accepted (the fixed part, a 1024-byte message, and some slack).
_MAX_REPLY = 12 + 1024 + 24
#: The channel's ``max_size``, which bounds both ways: the longest request a broker may
#: accept (``max_request_bytes`` is at most 1 MiB); replies are held to ``_MAX_REPLY``.
_MAX_SIZE = 1 << 20


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
    """What the blocking and the asynchronous client share: the channel options,
    request ids, and what a reply means."""

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._chan: Channel | AsyncChannel | None = None
        self._rid = 0

    def _options(self) -> dict[str, Any]:
        """The channel: one descriptor at most per reply (room for one: a broker
        attaching more is cut off), small replies, no memfds, sends bounded."""
        return {
            "max_size": _MAX_SIZE,
            "maxfds": 1,
            "fd_room": 1,
            "memfd_threshold": None,
            "accept_memfd": False,
            "send_timeout": self.timeout,
        }

    def _body(self, path: bytes, wire_flags: int, mode: int) -> tuple[int, bytes]:
        self._rid = rid = next_id(self._rid)
        return rid, encode_request(OpenRequest(rid, path, wire_flags, mode))

    def _left(self, deadline: float) -> float:
        """Seconds left until *deadline*; past it, the connection is closed and the
        request fails with ``ETIMEDOUT``."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise self._timed_out()
        return left

    @staticmethod
    def _unreachable(exc: OSError) -> BrokerError:
        return BrokerError(
            exc.errno or errno.ECONNREFUSED, f"cannot reach the broker: {exc.strerror or exc}"
        )

    def _timed_out(self) -> BrokerError:
        return BrokerError(errno.ETIMEDOUT, f"the broker did not answer within {self.timeout:g}s")

    def _lost(self, exc: BaseException) -> BaseException:
        """What a failed receive of the reply means (the connection is closed)."""
        self.close()
        if isinstance(exc, PeerTimeout):
            return self._timed_out()
        if isinstance(exc, EOFError):
            return BrokerError(
                errno.ECONNRESET, "the broker closed the connection before answering"
            )
        if isinstance(exc, ProtocolError):  # a bad frame, MSG_CTRUNC
            return BrokerError(exc.errno or errno.EPROTO, f"bad reply: {exc.strerror}")
        if isinstance(exc, OSError):
            return BrokerError(
                exc.errno or errno.ECONNRESET,
                f"lost the broker while waiting for the answer: {exc.strerror}",
            )
        return exc

    def _reply(
        self, body: bytes | memoryview, fds: list[int], rid: int
    ) -> tuple[Reply, int | None]:
        """The reply to request *rid* and its descriptor (the caller's)."""
        if len(body) > _MAX_REPLY:
            close_fds(fds)
            self.close()
            raise BrokerError(
                errno.EMSGSIZE,
                f"bad reply: {len(body)} bytes, more than the {_MAX_REPLY} a reply has",
            )
        try:
            reply, fd = decode_reply(body, fds)
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

    def _gone(self, exc: OSError, attempt: int, refused: Reply | None) -> Reply | None:
        """The request could not be sent (the broker closed the connection): the
        refusal it left, or ``None`` to reconnect once; raised the second time."""
        self.close()
        if refused is not None or not attempt:
            return refused
        raise BrokerError(exc.errno or errno.EPIPE, "the broker closed the connection") from exc

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()


class Client(_ClientBase):
    """A blocking broker client. See the module docs.

    Args:
        address: the broker's socket (path or ``@abstract``).
        timeout: seconds for each request, connecting included.
    """

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        super().__init__(address, timeout=timeout)
        self._lock = threading.Lock()

    def _connect(self, deadline: float) -> Channel:
        chan = self._chan
        if chan is None:
            try:
                chan = Channel.connect(
                    self.address, timeout=max(deadline - time.monotonic(), 0.001), **self._options()
                )
            except OSError as exc:
                raise self._unreachable(exc) from exc
            self._chan = chan
        assert isinstance(chan, Channel)
        return chan

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
                fresh = self._chan is None
                chan = self._connect(deadline)
                rid, body = self._body(path, wire_flags, mode)
                try:
                    chan.send(body)
                except PeerTimeout as exc:
                    self.close()
                    raise self._timed_out() from exc
                except (BrokenPipeError, ConnectionResetError) as exc:
                    refused = self._gone(exc, attempt, _refusal(chan, deadline) if fresh else None)
                    if refused is not None:
                        return refused, None
                    continue
                left = self._left(deadline)
                try:
                    msg = chan.recv(timeout=left)
                except (OSError, EOFError) as exc:
                    raise self._lost(exc) from exc
                with msg:
                    return self._reply(msg.data, msg.take_fds(), rid)
        raise AssertionError("unreachable")  # pragma: no cover

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
        _no_directory(wire, shown)
        reply, fd = self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        return _wrap(fd, wire, text_mode, buffering)

    def listdir(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> list[str]:
        """The names in a directory, through a directory descriptor from the broker."""
        return _names(self.open_fd(path, os.O_RDONLY | os.O_DIRECTORY))


class AsyncClient(_ClientBase):
    """The asynchronous twin of :class:`Client`: ``await client.open(...)``, under
    asyncio or trio (and anyio on either); one event loop per client."""

    def __init__(self, address: AddressLike, *, timeout: float = 10.0) -> None:
        super().__init__(address, timeout=timeout)
        self._lock: Any = None  # made at first use, for the running event loop

    async def _connect(self, deadline: float) -> AsyncChannel:
        chan = self._chan
        if chan is None:
            try:
                chan = await AsyncChannel.connect(
                    self.address, timeout=max(deadline - time.monotonic(), 0.001), **self._options()
                )
            except OSError as exc:
                raise self._unreachable(exc) from exc
            self._chan = chan
        assert isinstance(chan, AsyncChannel)
        return chan

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def request(
        self, path: bytes, wire_flags: int, mode: int = 0
    ) -> tuple[Reply, int | None]:
        """One raw request (see :meth:`Client.request`)."""
        if self._lock is None:
            self._lock = _new_lock()
        async with self._lock:
            try:
                return await self._request(path, wire_flags, mode)
            except BaseException:
                self.close()  # cancelled, or failed: a late reply must not meet the next request
                raise

    async def _request(self, path: bytes, wire_flags: int, mode: int) -> tuple[Reply, int | None]:
        deadline = time.monotonic() + self.timeout
        for attempt in (0, 1):
            fresh = self._chan is None
            chan = await self._connect(deadline)
            rid, body = self._body(path, wire_flags, mode)
            try:
                await chan.send(body)
            except PeerTimeout as exc:
                raise self._timed_out() from exc
            except (BrokenPipeError, ConnectionResetError) as exc:
                refusal = await _arefusal(chan, deadline) if fresh else None
                refused = self._gone(exc, attempt, refusal)
                if refused is not None:
                    return refused, None
                continue
            left = self._left(deadline)
            try:
                msg = await chan.recv(timeout=left)
            except (OSError, EOFError) as exc:
                raise self._lost(exc) from exc
            with msg:
                return self._reply(msg.data, msg.take_fds(), rid)
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
        _no_directory(wire, shown)
        reply, fd = await self.request(raw, wire, wmode)
        if fd is None:
            _raise_for(reply, shown)
        assert fd is not None
        return _wrap(fd, wire, text_mode, buffering)

    async def listdir(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> list[str]:
        return _names(await self.open_fd(path, os.O_RDONLY | os.O_DIRECTORY))


def _no_directory(wire: int, shown: str) -> None:
    if wire & _flags.Wire.DIR:
        raise IsADirectoryError(
            errno.EISDIR, "O_DIRECTORY gives no file object: use open_fd() or listdir()", shown
        )


def _wrap(fd: int, wire: int, text_mode: str | None, buffering: int) -> IO[Any]:
    try:
        return _file_object(fd, wire, text_mode, buffering)
    except BaseException:
        os.close(fd)
        raise


def _names(fd: int) -> list[str]:
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _refused(msg: Any) -> Reply | None:
    """The error reply in *msg*, if it is one (any descriptor closed)."""
    with msg:
        try:
            reply, fd = decode_reply(msg.data, msg.take_fds())
        except ProtocolError:
            return None
    if fd is not None:
        os.close(fd)
    return reply if reply.kind == KIND_ERROR else None


def _refusal(chan: Channel, deadline: float) -> Reply | None:
    """The error frame a broker sent a new connection before closing it, if any.

    A broker refuses a client past its per-uid connection limit right after
    ``accept`` (``EAGAIN``, "too many connections"); the client's request then
    meets a closed socket, but the reason is waiting to be read (and the broker
    closed its end: the receive does not wait).
    """
    try:
        return _refused(chan.recv(timeout=max(deadline - time.monotonic(), 0.0)))
    except (OSError, EOFError):
        return None


async def _arefusal(chan: AsyncChannel, deadline: float) -> Reply | None:
    """:func:`_refusal`, awaited."""
    try:
        return _refused(await chan.recv(timeout=max(deadline - time.monotonic(), 0.0)))
    except (OSError, EOFError):
        return None


def _new_lock() -> Any:
    """A lock of the running event loop: trio's under trio, else asyncio's.

    (Asked of the running task, as :class:`afunix.AsyncChannel` does: trio is
    imported only by a program that runs it, so this never loads it.)
    """
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_task():
        return trio.Lock()
    import asyncio

    return asyncio.Lock()
