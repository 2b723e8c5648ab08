"""``tls://`` for channels and servers: :class:`TlsSocket` and :func:`tls_error`.

``ssl.SSLSocket`` has no sendmsg/recvmsg_into, the calls a channel is made of.
:class:`TlsSocket` drives an ``ssl.SSLObject`` through two memory BIOs over a plain
TCP socket and offers the socket calls the shells, the servers and :mod:`afunix._io`
use (sendmsg, send, sendall, recvmsg_into, recv, recv_into, the socket's options), so
``ChannelProtocol`` keeps making every decision: it sees a transport that carries no
descriptors, named "TLS (tls://...)" by ``_io.prepare``. ``ssl`` is imported by the
first TLS connection, not by ``import afunix``. Public as
``afunix.lowlevel.TlsSocket``; :func:`afunix._io.receive_tls` is its receive.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time
from typing import Any

from ._address import Address
from ._errors import AfunixError, UnsupportedFeature
from ._peer import TlsPeer
from ._platform import NOSIGNAL

__all__ = ["BUFFERED_ONLY", "TlsSocket", "tls_error"]

#: Most ciphertext read from the socket, and most plaintext encrypted, per call.
_TLS_CHUNK = 256 * 1024
#: recv_into/recvmsg_into flag: decrypt only what is here, never touch the socket.
BUFFERED_ONLY = socket.MSG_DONTWAIT


class TlsSocket:
    """A TLS connection over a connected TCP socket (which it owns), for channels and servers.

    Made by :meth:`client` or :meth:`server`, which shake hands (blocking), or by
    :meth:`wrap` and :meth:`handshake_step` (event loops). The ``ssl.SSLContext``
    decides what is verified: mutual TLS is a server context with ``verify_mode =
    ssl.CERT_REQUIRED``. Blocking or not, as its socket is: ``BlockingIOError``
    means "wait for the socket" as for a plain one, and :attr:`buffered` says that
    data is here although the socket may not become readable. Descriptors and
    credentials cannot cross (``carries_fds`` is ``False``).

    One sender and one receiver may work at once (a channel's two locks, or the
    command line's two threads): the TLS object is used under a lock of its own,
    never during a socket call, and the ciphertext going out under another.
    """

    carries_fds = False
    carries_credentials = False

    def __init__(self, sock: socket.socket, tls: Any, incoming: Any, outgoing: Any, where: str):
        self.raw = sock
        self._tls = tls
        self._in = incoming
        self._out = outgoing
        self._lock = threading.Lock()  # the TLS object and its BIOs: never two threads
        self._wlock = threading.Lock()  # the ciphertext on its way out
        self._unsent: Any = b""  # ciphertext read from the TLS object, not sent yet
        self._owed = 0  # plaintext taken whose ciphertext did not all go (0 or 1 byte)
        self._eof = False
        #: ``TLS (tls://host:port)``: how error messages name this transport.
        self.transport = f"TLS ({where})"
        #: ``tls://host:port`` of the peer.
        self.remote_address = where
        #: The peer's verified certificate (:class:`~afunix.TlsPeer`), ``None`` without one.
        self.tls_peer: TlsPeer | None = None

    # -- making one ----------------------------------------------------------------

    @classmethod
    def wrap(
        cls, sock: socket.socket, context: Any, server_side: bool, hostname: str | None, where: str
    ) -> TlsSocket:
        """Wrap connected *sock* without shaking hands yet (see :meth:`handshake_step`)."""
        import ssl

        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"ssl= must be an ssl.SSLContext, not {type(context).__name__}")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=hostname
        )
        return cls(sock, tls, incoming, outgoing, where)

    @classmethod
    def client(
        cls,
        sock: socket.socket,
        context: Any,
        hostname: str | None,
        where: str,
        timeout: float | None,
    ) -> TlsSocket:
        """Wrap connected *sock* as the client and shake hands within *timeout* seconds."""
        made = cls.wrap(sock, context, False, hostname, where)
        made.handshake(timeout)
        return made

    @classmethod
    def server(
        cls, sock: socket.socket, context: Any, where: str, timeout: float | None
    ) -> TlsSocket:
        """Wrap accepted *sock* as the server and shake hands within *timeout* seconds."""
        made = cls.wrap(sock, context, True, None, where)
        made.handshake(timeout)
        return made

    def handshake(self, timeout: float | None) -> None:
        """Shake hands, waiting with ``poll`` (the socket may be blocking or not)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (want := self.handshake_step()) is not None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise AfunixError(
                    errno.ETIMEDOUT,
                    f"TLS handshake with {self.remote_address} did not finish within "
                    f"{timeout:g} s (is the peer speaking TLS?)",
                )
            poller = select.poll()
            poller.register(self.raw, select.POLLOUT if want == "write" else select.POLLIN)
            poller.poll(None if left is None else max(int(left * 1000), 1))

    def handshake_step(self) -> str | None:
        """One non-blocking step of the handshake: ``None`` when done, else what to wait
        for, ``"read"`` or ``"write"``. A failure is explained (:func:`tls_error`)."""
        import ssl

        while True:
            if not self._send_out(wait=False):
                return "write"
            try:
                with self._lock:
                    self._tls.do_handshake()
            except ssl.SSLWantReadError:
                if self._out.pending:
                    continue
                if not self._pull():
                    return "read"
                continue
            except ssl.SSLError as exc:
                with contextlib.suppress(OSError):
                    self._send_out(wait=False)  # the alert: the peer learns why
                raise tls_error(exc, self.remote_address, "handshake") from exc
            if not self._send_out(wait=False):
                return "write"  # (the rest of the last flight goes with the next step)
            with self._lock:
                cert, version = self._tls.getpeercert(), self._tls.version()
            if cert:
                self.tls_peer = TlsPeer.from_certificate(cert, version)
            return None

    def _send_out(self, *, wait: bool) -> bool:
        """Send the ciphertext the TLS object made; ``True`` when all of it went.

        *wait*: as the socket does (blocking: waits; non-blocking or timed out:
        ``BlockingIOError``, the rest kept). Else ``MSG_DONTWAIT``: ``False`` for a
        rest, or while another thread is sending.
        """
        if not wait:
            if not self._wlock.acquire(blocking=False):
                return False
        else:
            self._wlock.acquire()
        try:
            return self._send_locked(wait)
        finally:
            self._wlock.release()

    def _send_locked(self, wait: bool) -> bool:
        flags = NOSIGNAL if wait else NOSIGNAL | socket.MSG_DONTWAIT
        while True:
            if not self._unsent:
                with self._lock:
                    if not self._out.pending:
                        return True
                    self._unsent = memoryview(self._out.read())
            try:
                sent = self.raw.send(self._unsent, flags)
            except BlockingIOError:
                if wait:
                    raise
                return False
            self._unsent = self._unsent[sent:]

    def _pull(self) -> bool:
        """Read the ciphertext that is there, without waiting; ``False`` if none."""
        try:
            data = self.raw.recv(_TLS_CHUNK, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self._feed(data)
        return True

    def _feed(self, data: bytes) -> None:
        with self._lock:
            if data:
                self._in.write(data)
            else:  # end of file: the TLS object says whether it was a clean close
                self._in.write_eof()

    # -- sending -------------------------------------------------------------------

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        """Encrypt *buffers* and send; how many plaintext bytes were taken.

        What the TLS object took is committed. When its ciphertext cannot all go
        (a full socket), the last byte is not reported: the caller calls again
        with the rest and waits meanwhile, and that call sends what was left and
        reports the byte (OpenSSL's rule for a retried write, made explicit).
        """
        if ancdata:
            raise UnsupportedFeature(f"control data cannot cross {self.transport}")
        if self._owed:
            self._send_out(wait=True)
            owed, self._owed = self._owed, 0
            return owed
        taken = 0
        try:
            with self._lock:
                for buf in buffers:
                    view = memoryview(buf).cast("B")
                    while view and taken < _TLS_CHUNK:
                        n = self._tls.write(view[: _TLS_CHUNK - taken])
                        taken += n
                        view = view[n:]
                    if taken >= _TLS_CHUNK:
                        break
        except OSError as exc:
            raise tls_error(exc, self.remote_address, "write") from exc
        try:
            self._send_out(wait=True)
        except (BlockingIOError, TimeoutError):  # (a timeout: settimeout or SO_SNDTIMEO)
            if not taken:
                raise
            self._owed = 1
            return taken - 1
        return taken

    def send(self, data: Any, flags: int = 0) -> int:
        return self.sendmsg([data])

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self.sendmsg([view]) :]

    # -- receiving -----------------------------------------------------------------

    @property
    def buffered(self) -> bool:
        """Whether plaintext, or ciphertext to decrypt, is here already: a receive may
        find data although the socket will not become readable for it."""
        with self._lock:
            return bool(self._tls.pending() or self._in.pending)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt into *buffer*: what is here first, reading the socket only when
        nothing is (then as much as is ready, up to its size). ``0`` at end of file.
        With :data:`BUFFERED_ONLY` the socket is never read (``BlockingIOError``)."""
        import ssl

        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        want, got = len(view), 0
        while got < want:
            try:
                with self._lock:
                    n = self._tls.read(want - got, view[got:])
            except ssl.SSLWantReadError:
                if got or self._eof:
                    return got
                if flags & BUFFERED_ONLY:
                    raise BlockingIOError(errno.EAGAIN, "no TLS data here yet") from None
                self._feed(self.raw.recv(_TLS_CHUNK))  # waits as the socket does
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True  # a close_notify, or a bare end of file (ragged)
                return got
            except ssl.SSLError as exc:
                raise tls_error(exc, self.remote_address, "read") from exc
            if not n:
                self._eof = True
                return got
            got += n
        with contextlib.suppress(OSError):  # a key update may want an answer
            self._send_out(wait=False)
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buf = bytearray(bufsize)
        del buf[self.recv_into(buf, bufsize, flags) :]
        return bytes(buf)

    def recvmsg_into(
        self, buffers: Any, ancbufsize: int = 0, flags: int = 0
    ) -> tuple[int, list[Any], int, Any]:
        """:meth:`recv_into` the first buffer; control data never comes."""
        return self.recv_into(buffers[0], 0, flags), [], 0, None

    # -- the socket's own ------------------------------------------------------------

    @property
    def peer_address(self) -> Address:
        """The peer's ``tls://host:port``."""
        return Address.parse(self.remote_address)

    @property
    def family(self) -> int:
        return self.raw.family

    @property
    def type(self) -> int:
        return self.raw.type

    def fileno(self) -> int:
        return self.raw.fileno()

    def gettimeout(self) -> float | None:
        return self.raw.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self.raw.getsockopt(*args)

    def getpeername(self) -> Any:
        return self.raw.getpeername()

    def getsockname(self) -> Any:
        return self.raw.getsockname()

    def shutdown(self, how: int) -> None:
        """``SHUT_WR`` (and ``SHUT_RDWR``) say so in TLS first (``close_notify``)."""
        if how != socket.SHUT_RD:
            self._close_notify()
        self.raw.shutdown(how)

    def _close_notify(self) -> None:
        import ssl

        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            with contextlib.suppress(ssl.SSLWantReadError), self._lock:
                self._tls.unwrap()  # our close_notify; the peer's may come later
            self._send_out(wait=False)

    def close(self) -> None:
        """Say goodbye in TLS (``close_notify``, without waiting) and close the socket."""
        if self.raw.fileno() >= 0:
            self._close_notify()
        self.raw.close()

    def __enter__(self) -> TlsSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        who = f" peer {self.tls_peer.describe()}" if self.tls_peer else ""
        return f"<afunix TlsSocket fd={self.raw.fileno()} {self.remote_address}{who}>"


def tls_error(exc: OSError, where: str, during: str) -> AfunixError:
    """An ``ssl`` error as an :class:`~afunix.AfunixError` that says what to do.

    ``EACCES`` when a certificate was missing or not trusted, ``EPROTO`` otherwise.
    """
    text = str(exc)
    upper = text.upper()
    if "CERTIFICATE_REQUIRED" in upper or "PEER_DID_NOT_RETURN" in upper:
        return AfunixError(
            errno.EACCES,
            f"TLS {during} with {where} failed: {text}; the server requires a client "
            "certificate: load one into the client's ssl= context (load_cert_chain)",
        )
    if "VERIFY_FAILED" in upper or "UNKNOWN_CA" in upper or "BAD_CERTIFICATE" in upper:
        return AfunixError(
            errno.EACCES,
            f"TLS {during} with {where} failed: {text}; the certificate is not signed by "
            "a CA the other side trusts (load_verify_locations), or names another host",
        )
    return AfunixError(
        errno.EPROTO,
        f"TLS {during} with {where} failed: {text}; check both sides' certificates, "
        "CAs and TLS versions",
    )
