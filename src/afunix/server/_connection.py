"""What a handler gets: :class:`Connection`, :class:`AsyncConnection`, :class:`Datagram`.

Each connection knows its client (address and kernel credentials) and the
server's :class:`~afunix.Limits`; the runners (``_threads``, ``_async``)
build them and log how each one ended (:func:`log_handler_failure`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from .._address import Address
from .._backends import asyncio_loop, in_trio, notify_closing, wait_readable, wait_writable
from .._creds import PeerCredentials, peer_credentials
from .._errors import PeerError, PeerTimeout, UnsupportedFeature
from .._limits import DEFAULT_LIMITS, Limits
from .._peer import TlsPeer
from .._platform import NOSIGNAL
from ..aio import AsyncChannel
from ..channel import Channel

__all__ = [
    "BUFSIZE",
    "AsyncConnection",
    "Connection",
    "Datagram",
    "Handler",
    "Model",
    "describe_peer",
    "log_handler_failure",
    "peer_address",
]

log = logging.getLogger("afunix.server")

#: How the server runs handlers: an event loop, a thread or a child per client.
Model: TypeAlias = Literal["asyncio", "thread", "fork"]
#: A handler: called with a connection (or a datagram, returning the reply).
Handler: TypeAlias = Callable[[Any], Any]

#: Bytes a ``recv`` asks for unless told (and the largest datagram a server reads).
BUFSIZE = 65536


class _Peer:
    """What both connection kinds know about the client: its address and credentials."""

    sock: socket.socket
    peer: Address
    limits: Limits
    _credentials: PeerCredentials | None
    _who: str | None = None

    def __init__(
        self,
        sock: socket.socket,
        peer: Address,
        credentials: PeerCredentials | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._credentials = credentials
        self.limits = limits

    def describe(self) -> str:
        """``pid 12 uid 1000 gid 1000`` (from the kernel) or the address, for logs.

        Worked out once and remembered, so it still answers after the socket closed.
        """
        if self._who is None:
            tls = self.tls_peer
            if tls is not None:
                self._who = f"{tls.describe()} at {self.peer.describe()}"
            else:
                self._who = self._ask_kernel() or describe_peer(self._credentials, self.peer)
        return self._who

    def _ask_kernel(self) -> str | None:
        """:meth:`describe` from credentials read now (not kept), if not read before."""
        sock = self.sock
        if self._credentials is not None or sock.family != socket.AF_UNIX or sock.fileno() < 0:
            return None
        try:
            with peer_credentials(sock, pidfd=False) as creds:
                return describe_peer(creds, self.peer)
        except OSError:
            return None

    @property
    def credentials(self) -> PeerCredentials:
        """The client's identity as the kernel saw it at connect time (UNP 15.8).

        pid, uid, gid, supplementary groups and, on Linux 6.5+, a pidfd (see
        :class:`~afunix.PeerCredentials`). Read on first use, or already read
        when the server has a ``policy``; the pidfd is closed with the
        connection. Raises :class:`~afunix.UnsupportedFeature` over TCP and
        TLS (over TLS, :attr:`tls_peer` says who the client is).
        """
        if self._credentials is None:
            if self.tls_peer is not None or getattr(self.sock, "carries_fds", True) is False:
                raise UnsupportedFeature(
                    f"{self.peer.describe()} has no kernel credentials: they exist only for "
                    "Unix-domain sockets; over tls:// the client's identity is its "
                    "certificate, conn.tls_peer"
                )
            self._credentials = peer_credentials(self.sock)
        return self._credentials

    @property
    def tls_peer(self) -> TlsPeer | None:
        """Over ``tls://``: the client's verified certificate (a :class:`~afunix.TlsPeer`,
        what ``PeerPolicy(tls_names=...)`` judged); ``None`` without one and over
        other transports."""
        return getattr(self.sock, "tls_peer", None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection (and the client's pidfd, if it was read)."""
        self.sock.close()
        if self._credentials is not None:
            self._credentials.close()


class Connection(_Peer):
    """One client connection, for ``thread`` and ``fork`` handlers.

    ``recv`` returns ``b""`` at end of file; iterating yields chunks until
    then. On a seqpacket socket each ``recv`` is one record.
    :attr:`credentials` says who the client is.
    """

    def recv(self, bufsize: int = BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF.

        Raises :class:`~afunix.PeerTimeout` after ``idle_timeout`` of silence.
        """
        timeout = self.limits.idle_timeout
        if timeout is None:
            return self.sock.recv(bufsize)
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(bufsize)
        except TimeoutError:
            raise PeerTimeout(f"client idle for more than {timeout:g}s") from None
        finally:
            self.sock.settimeout(None)

    def send(self, data: bytes) -> None:
        """Send all of *data*; :class:`~afunix.PeerTimeout` if the client stops reading."""
        timeout = self.limits.send_timeout
        if timeout is None:
            self.sock.sendall(data, NOSIGNAL)
            return
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data, NOSIGNAL)
        except TimeoutError:
            raise PeerTimeout(f"client did not read for more than {timeout:g}s") from None
        finally:
            self.sock.settimeout(None)

    def channel(self, **options: Any) -> Channel:
        """This connection as a message :class:`~afunix.Channel` (descriptors included).

        The server's :class:`Limits` apply (message size, descriptors per message
        and in flight, and ``idle_timeout``/``send_timeout`` as the channel's own:
        :class:`~afunix.PeerTimeout` says which ran out); ``options`` override
        them. The channel owns the socket.
        """
        self.describe()  # while the socket is surely open, for the logs
        return Channel.from_socket(self.sock, **{**self.limits.channel_options(), **options})

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk


class AsyncConnection(_Peer):
    """One client connection, for ``async def`` handlers (stream or seqpacket),
    under asyncio or trio (and anyio on either).

    :attr:`credentials` says who the client is. One task at a time may
    receive (and one send): under trio a second one gets ``BusyResourceError``.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: Address,
        credentials: PeerCredentials | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(sock, peer, credentials, limits)
        #: The running asyncio loop; ``None`` under trio.
        self._loop = asyncio_loop()
        if self._loop is None:
            in_trio()  # (raises outside both)
            sock.setblocking(False)

    async def recv(self, bufsize: int = BUFSIZE) -> bytes:
        """Receive up to *bufsize* bytes (one record on seqpacket); ``b""`` at EOF.

        Raises :class:`~afunix.PeerTimeout` after ``idle_timeout`` of silence.
        """
        timeout = self.limits.idle_timeout
        if self._loop is None:
            return await self._recv_trio(bufsize, timeout)
        if timeout is None:
            return await self._loop.sock_recv(self.sock, bufsize)
        try:
            return await asyncio.wait_for(self._loop.sock_recv(self.sock, bufsize), timeout)
        except TimeoutError:
            raise PeerTimeout(f"client idle for more than {timeout:g}s") from None

    async def send(self, data: bytes) -> None:
        """Send all of *data*; :class:`~afunix.PeerTimeout` if the client stops reading."""
        timeout = self.limits.send_timeout
        if self._loop is None:
            await self._send_trio(data, timeout)
            return
        if timeout is None:
            await self._loop.sock_sendall(self.sock, data)
            return
        try:
            await asyncio.wait_for(self._loop.sock_sendall(self.sock, data), timeout)
        except TimeoutError:
            raise PeerTimeout(f"client did not read for more than {timeout:g}s") from None

    async def _recv_trio(self, bufsize: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.sock.recv(bufsize)
            except BlockingIOError:
                pass
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not await wait_readable(self.sock.fileno(), left):
                raise PeerTimeout(f"client idle for more than {timeout:g}s")

    async def _send_trio(self, data: bytes, timeout: float | None) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view, NOSIGNAL) :]
                continue
            except BlockingIOError:
                pass
            if not await wait_writable(self.sock.fileno(), timeout):  # (no progress that long)
                raise PeerTimeout(f"client did not read for more than {timeout:g}s")

    def close(self) -> None:
        """Close the connection; under trio its waiting tasks wake with ``EBADF``."""
        if self._loop is None and self.sock.fileno() >= 0:
            notify_closing(self.sock.fileno())
        super().close()

    def channel(self, **options: Any) -> AsyncChannel:
        """This connection as an :class:`~afunix.AsyncChannel` (see :meth:`Connection.channel`).

        From then on use only the channel: it buffers what it has read, and it
        keeps the socket registered with the event loop while it is being read.
        """
        self.describe()
        return AsyncChannel.from_socket(self.sock, **{**self.limits.channel_options(), **options})

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk


@dataclass(frozen=True)
class Datagram:
    """A datagram received by a datagram server; return the reply from the handler.

    ``credentials`` is the sender's identity, attached to this very datagram
    by the kernel (Linux ``SO_PASSCRED``/``SCM_CREDENTIALS``: pid and real
    uid/gid at send time, no groups, no pidfd); ``None`` where the system
    has no per-message credentials.
    """

    data: bytes
    sender: Address
    credentials: PeerCredentials | None = None


def describe_peer(creds: PeerCredentials | None, address: Address) -> str:
    """A peer for the logs: its kernel credentials where known, else its address."""
    if creds is not None:
        return f"pid {creds.pid} uid {creds.uid} gid {creds.gid}"
    return address.describe()


def peer_address(sock: socket.socket, raw: Any) -> Address:
    """The client's address from what ``accept``/``recvfrom`` on *sock* returned (*raw*)."""
    try:
        return Address.from_sockaddr(sock.family, raw)
    except OSError:  # pragma: no cover - unusual family
        return Address.unnamed()


def log_handler_failure(exc: BaseException, who: str) -> None:
    """Log a connection's end once: a misbehaving peer briefly, a bug with its traceback."""
    if isinstance(exc, PeerError):
        log.warning("closed connection from %s: %s", who, exc)
    elif isinstance(exc, TimeoutError):  # a channel's socket timeout (Limits)
        log.warning("closed connection from %s: timed out waiting for the client", who)
    elif isinstance(exc, ConnectionError | EOFError):
        log.info("connection from %s ended: %s", who, exc or type(exc).__name__)
    else:
        log.error("handler raised for peer %s", who, exc_info=exc)
