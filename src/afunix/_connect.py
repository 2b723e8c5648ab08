"""The client side: ``connect`` and its kin (UNP 15.4-15.6).

:func:`connect` returns a connected :class:`~afunix._sockets.Socket` and turns
the kernel's terse errnos into errors that say what is wrong with which path.
:func:`connect_nowait` is the first, non-blocking try of
:meth:`afunix.AsyncChannel.connect`; :func:`connect_tls` and the ``tls://``
helpers (:func:`tcp_of`, :func:`check_tls`, :func:`requires_client_certificates`)
serve channels and servers over TLS.

Full listen queues (15.4 point 6). The book describes BSD, where a client
gets ``ECONNREFUSED`` at once when the server's queue is full. Linux differs:
a blocking ``connect`` waits for room, a non-blocking one fails with
``EAGAIN``, and ``ECONNREFUSED`` means that *nothing listens* (a stale file).
:func:`connect` with ``timeout=`` waits for room in the kernel (a blocking
connect bounded by ``SO_SNDTIMEO``, so it is woken in turn with the other
waiting clients) until the deadline and then raises :class:`ListenQueueFull`;
with ``retries=`` it retries transient failures (full queue, server
restarting) with exponential backoff.

Cheap to import: what only some calls need is imported by them, not here:
``tempfile`` (which loads ``random``, ``shutil``, ``bz2``, ``lzma``) by a
datagram client's private reply directory, and the ``ssh://`` transport
(:mod:`afunix._remote`: ``subprocess``, ``shlex``) by the first ``ssh://``
connect.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Literal

from ._address import Address, AddressKind, AddressLike
from ._bind import bind_address, describe_file, probe_socket_file, socket_is_bound
from ._errors import (
    AfunixError,
    ListenQueueFull,
    NoSuchSocket,
    NotASocket,
    NothingListening,
    UnsupportedFeature,
    WrongSocketType,
    strerror,
)
from ._platform import PLATFORM
from ._sockets import (
    Socket,
    SocketTypeLike,
    new_socket,
    refuse_remote,
    remote_socket_class,
    socket_type,
    type_name,
)

if TYPE_CHECKING:
    import ssl as _ssl

    from ._tlsio import TlsSocket

__all__ = [
    "check_tls",
    "connect",
    "connect_nowait",
    "connect_tls",
    "requires_client_certificates",
    "tcp_of",
]


def _explain_connect_error(exc: OSError, addr: Address, sock_type: int) -> OSError:
    """Turn a failed ``connect`` into an error that says what is wrong."""
    err = exc.errno or errno.EIO
    where = addr.describe()
    if addr.kind is AddressKind.TCP:
        return AfunixError(err, f"cannot connect to {where}: {strerror(err)}")
    path = addr.filesystem_path
    if err == errno.ENOENT:
        return NoSuchSocket(
            err,
            f"cannot connect to {where}: no such socket (is the server running? "
            "is the path right?)",
            where,
        )
    if err == errno.ECONNREFUSED:
        if path is not None:
            try:
                st = os.lstat(path)
            except OSError:
                st = None
            if st is not None and not stat.S_ISSOCK(st.st_mode):
                return NotASocket(
                    err, f"cannot connect to {where}: it is {describe_file(st, path)}", where
                )
            return NothingListening(
                err,
                f"cannot connect to {where}: nothing is listening there (a stale socket "
                "file left by a server that exited); start the server",
                where,
            )
        return NothingListening(
            err, f"cannot connect to {where}: nothing is listening on that name", where
        )
    if err == errno.EAGAIN:
        return ListenQueueFull(
            err,
            f"cannot connect to {where}: the server's listen queue is full (it is alive "
            "but not accepting fast enough); retry, or raise its backlog",
            where,
        )
    if err == errno.EPROTOTYPE:
        theirs = None
        if path is not None:
            _, theirs = probe_socket_file(path)
        what = f"it is a {type_name(theirs)} socket" if theirs else "it is of another type"
        return WrongSocketType(
            err,
            f"cannot connect a {type_name(sock_type)} socket to {where}: {what}; "
            "use the server's socket type",
            where,
        )
    if err in (errno.EACCES, errno.EPERM):
        return AfunixError(
            err,
            f"cannot connect to {where}: permission denied (the socket file needs write "
            "permission, and every directory above it search permission, for this user)",
            where,
        )
    if err == errno.ENOTDIR:
        return NoSuchSocket(
            err, f"cannot connect to {where}: a component of the path is not a directory", where
        )
    return AfunixError(err, f"cannot connect to {where}: {strerror(err)}", where)


_TRANSIENT = (ListenQueueFull, NothingListening, NoSuchSocket)
_PATH = AddressKind.PATH
_AF_UNIX = socket.AF_UNIX
_STREAM_CLOEXEC = socket.SOCK_STREAM | socket.SOCK_CLOEXEC


# How long connect() waits for a socket that is bound but not listening yet (a
# server between bind() and listen()) before it reports that nothing listens.
STARTING_GRACE = 2.0


def _connect_once(sock: socket.socket, addr: Address, deadline: float | None) -> None:
    """Connect; wait briefly for a server that is between ``bind()`` and ``listen()``.

    Such a socket refuses connections exactly like a stale file. When the
    kernel says a socket is bound there (:func:`socket_is_bound`), the refusal
    is retried for up to :data:`STARTING_GRACE` seconds (or the deadline)
    instead of being reported as a stale file.
    """
    if addr.kind is AddressKind.TCP:
        _connect_tcp(sock, addr, deadline)
        return
    until: float | None = None
    delay = 0.0005
    while True:
        try:
            _connect_unix(sock, addr, deadline)
            return
        except ConnectionRefusedError:
            now = time.monotonic()
            if not socket_is_bound(addr.sockaddr, sock.type):
                raise  # a stale file (or a name nothing is bound to)
            if until is None:
                until = now + STARTING_GRACE
                if deadline is not None:
                    until = min(until, deadline)
            if now >= until:
                raise NothingListening(
                    errno.ECONNREFUSED,
                    f"cannot connect to {addr.describe()}: a socket is bound there but has "
                    f"not called listen() within {STARTING_GRACE:g} s (a server stuck while "
                    "starting, or one that never listens); check the server",
                    addr.describe(),
                ) from None
            time.sleep(min(delay, max(until - now, 0.0)))
            delay = min(delay * 2, 0.02)


def _connect_tcp(sock: socket.socket, addr: Address, deadline: float | None) -> None:
    if deadline is not None:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        sock.connect(addr.sockaddr)
    except TimeoutError as exc:
        raise AfunixError(
            errno.ETIMEDOUT, f"cannot connect to {addr.describe()}: timed out"
        ) from exc
    finally:
        sock.settimeout(None)


def _connect_unix(sock: socket.socket, addr: Address, deadline: float | None) -> None:
    """Connect; with a deadline, Linux's wait for room in a full queue is bounded by it."""
    if deadline is None:
        sock.connect(addr.sockaddr)
        return
    # Wait for room in a full listen queue in the kernel, bounded by SO_SNDTIMEO
    # (Linux's unix_stream_connect waits that long, then fails with EAGAIN), not by
    # polling: a poller loses every free slot to clients already waiting in the
    # kernel, which the kernel wakes one at a time, in order. A flood of connects
    # from another user then delays this client by the few waiters ahead of it, not
    # by as long as the flood lasts.
    if sock.gettimeout() is not None:  # (a socket.setdefaulttimeout(): no ioctl otherwise)
        sock.setblocking(True)
    try:
        while True:
            # At least one attempt, even at the deadline: the kernel's answer (refused,
            # no such file, ...) says more than "timed out" would.
            left = max(deadline - time.monotonic(), 1e-6)
            sec = int(left)
            usec = max(int((left - sec) * 1_000_000), 1 if not sec else 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(sec, usec))
            try:
                sock.connect(addr.sockaddr)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _queue_full(addr) from None
                continue  # woken early: wait the rest
            try:
                sock.getpeername()  # a connect interrupted by a signal (EINTR) "succeeds"
                return  # in CPython's retry without connecting a Unix socket: check
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
    finally:
        if sock.fileno() >= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))


_TIMEVAL = struct.Struct("@ll")


def _queue_full(addr: Address) -> ListenQueueFull:
    return ListenQueueFull(
        errno.EAGAIN,
        f"cannot connect to {addr.describe()}: timed out waiting for room "
        "in the server's full listen queue (the server is alive but not "
        "accepting); retry later or raise its backlog",
        addr.describe(),
    )


def connect(
    address: AddressLike,
    type: SocketTypeLike = "stream",
    *,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 0.05,
    bind: AddressLike | Literal["auto", "autobind"] | None = "auto",
) -> Socket:
    """Connect to a server and return a connected :class:`Socket`.

    Args:
        address: where the server is (a path, ``@name``, ``tcp://host:port``,
            ``ssh://[user@]host[:port]/path``: a Unix socket on another host
            through the user's ``ssh``, which ``$AFUNIX_SSH`` may name; see
            :mod:`afunix._remote`).
        type: ``"stream"`` (default), ``"dgram"`` or ``"seqpacket"``.
        timeout: bound the connect itself. On Linux a full listen queue makes
            a blocking connect wait; with a timeout that wait ends in
            :class:`ListenQueueFull`. The socket returned is blocking.
        retries: how many more attempts after a transient failure (full
            queue, nothing listening yet, socket file missing while a server
            restarts), sleeping ``backoff``, ``2*backoff``, ... in between.
        bind: datagram sockets only, where replies come to (UNP 15.4 point 8):
            ``"auto"`` binds a unique path in a fresh private directory that
            is removed on close; ``"autobind"`` lets Linux pick a unique
            abstract name; an address binds there; ``None`` leaves the socket
            unbound (it can send but never receive replies).

    A server between ``bind()`` and ``listen()`` refuses connections just
    like a stale file; when the kernel shows a socket bound there, connect
    waits for it to listen (up to :data:`STARTING_GRACE` seconds, or the
    timeout) instead of reporting a stale file.

    Errors say which of these it is, and keep the errno: :class:`NoSuchSocket`,
    :class:`NotASocket`, :class:`NothingListening` (stale file),
    :class:`ListenQueueFull`, :class:`WrongSocketType`, permission denied.
    """
    addr = Address.parse(address)
    attempt = 0
    if addr.kind is _PATH and timeout is None and type == "stream":
        # The common case, a stream to a socket file with no deadline: straight to
        # the kernel, as attempt 0 of the loop below. A refusal goes to that loop
        # (which waits for a server between bind() and listen()); other errors are
        # explained, and retried when transient, as the loop does.
        sock = Socket(_AF_UNIX, _STREAM_CLOEXEC)
        try:
            sock.connect(addr.raw)
            return sock
        except ConnectionRefusedError:
            sock.close()
        except OSError as exc:
            sock.close()
            err = _explain_connect_error(exc, addr, socket.SOCK_STREAM)
            if attempt >= retries or not isinstance(err, _TRANSIENT):
                raise err from exc
            time.sleep(backoff)
            attempt = 1
        except BaseException:
            sock.close()
            raise
    sock_type = socket_type(type)
    kind = addr.kind
    if kind is AddressKind.UNNAMED:
        raise AfunixError(errno.EDESTADDRREQ, "cannot connect to an unnamed address")
    if kind is AddressKind.TCP and sock_type == socket.SOCK_SEQPACKET:
        raise UnsupportedFeature(f"seqpacket is not available over TCP ({addr})")
    if kind is AddressKind.SSH or kind is AddressKind.TLS:
        refuse_remote(addr, sock_type, listening=False)
        return _connect_ssh_retrying(addr, timeout, retries, backoff)
    family = addr.family
    unix = kind is not AddressKind.TCP
    reply_to = bind if sock_type == socket.SOCK_DGRAM and unix else None
    while True:
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = new_socket(family, sock_type)
        try:
            if reply_to is not None:
                _bind_reply_address(sock, reply_to)
            try:
                _connect_once(sock, addr, deadline)
            except AfunixError:
                raise
            except OSError as exc:
                raise _explain_connect_error(exc, addr, sock_type) from exc
        except _TRANSIENT:
            sock.close()
            if attempt >= retries:
                raise
            time.sleep(backoff * (2**attempt))
            attempt += 1
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def _connect_ssh_retrying(
    addr: Address, timeout: float | None, retries: int, backoff: float
) -> Socket:
    """``ssh://``: one ``ssh`` per attempt; a refused connect is retried like a local one."""
    attempt = 0
    while True:
        try:
            from ._remote import connect_ssh  # here: it imports subprocess and shlex

            return connect_ssh(addr, timeout=timeout, cls=remote_socket_class())
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED or attempt >= retries:
                raise
        time.sleep(backoff * (2**attempt))
        attempt += 1


def connect_nowait(address: AddressLike, type: SocketTypeLike = "stream") -> Socket | None:
    """One non-blocking connect to a Unix stream or seqpacket *address*, or ``None``.

    The first try of :meth:`afunix.AsyncChannel.connect`: a connected,
    non-blocking socket when the server's queue had room; ``None`` when the
    connect would wait (``EAGAIN``: a full queue), was refused (perhaps a server
    between ``bind()`` and ``listen()``) or is not a Unix stream/seqpacket one:
    then :func:`connect` decides, in a thread. Other errors are explained as
    :func:`connect` explains them.
    """
    addr = Address.parse(address)
    sock_type = socket_type(type)
    if not addr.is_unix or addr.kind is AddressKind.UNNAMED or sock_type == socket.SOCK_DGRAM:
        return None  # tcp://, ssh:// (a process to start), tls://: connect() decides
    sock = new_socket(addr.family, sock_type)
    try:
        sock.setblocking(False)
        sock.connect(addr.sockaddr)
    except (BlockingIOError, ConnectionRefusedError, InterruptedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise _explain_connect_error(exc, addr, sock_type) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_of(addr: Address) -> Address:
    """The ``tcp://`` address beneath a ``tls://`` one (others as they are)."""
    return Address.tcp(addr.host, addr.port or 0) if addr.kind is AddressKind.TLS else addr


def check_tls(addr: Address, context: object) -> bool:
    """Whether *addr* is ``tls://``, checked against ``ssl=`` *context*: a ``tls://``
    address needs an ``ssl.SSLContext``, and a context needs a ``tls://`` address."""
    tls = addr.kind is AddressKind.TLS
    if tls and context is None:
        raise UnsupportedFeature(
            f"{addr}: tls:// needs ssl=, an ssl.SSLContext with this side's certificate "
            "(and, for mutual TLS, the CA whose client certificates it accepts)"
        )
    if context is not None and not tls:
        raise AfunixError(
            errno.EINVAL, f"ssl= is for tls:// addresses, not {addr.describe()}; write tls://"
        )
    if context is not None:
        import ssl

        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"ssl= must be an ssl.SSLContext, not {type(context).__name__}")
    return tls


def requires_client_certificates(context: object) -> bool:
    """Whether a server *context* authenticates its clients (``verify_mode`` is
    ``ssl.CERT_REQUIRED``): then ``tls://`` may listen beyond loopback without
    ``allow_remote``."""
    import ssl

    return isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


def connect_tls(
    address: AddressLike,
    ssl: _ssl.SSLContext,
    *,
    timeout: float | None = None,
    server_hostname: str | None = None,
    retries: int = 0,
    backoff: float = 0.05,
) -> TlsSocket:
    """Connect to a ``tls://host:port`` server and shake hands: a TLS byte stream.

    *ssl* decides what is verified (``ssl.create_default_context()`` checks the
    server's certificate against the system's CAs and its name against *host*;
    ``load_verify_locations`` for your own CA, ``load_cert_chain`` for a client
    certificate, which a mutual-TLS server requires). *server_hostname* is the
    name to check instead of *host*. *timeout* bounds the connect and the
    handshake together. The result (:class:`~afunix.lowlevel.TlsSocket`) has
    ``send``, ``sendall``, ``recv``, ``shutdown``, ``close``, ``fileno`` and
    ``tls_peer`` (the server's certificate, a :class:`~afunix.TlsPeer`);
    :meth:`afunix.Channel.connect` with ``ssl=`` gives messages instead.
    """
    from ._tlsio import TlsSocket

    addr = Address.parse(address)
    if addr.kind is not AddressKind.TLS:
        raise UnsupportedFeature(
            f"connect_tls() needs a tls://host:port address, not {addr.describe()}"
        )
    check_tls(addr, ssl)
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = connect(tcp_of(addr), timeout=timeout, retries=retries, backoff=backoff)
    try:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        return TlsSocket.client(sock, ssl, server_hostname or addr.host, str(addr), left)
    except BaseException:
        sock.close()
        raise


def _bind_reply_address(sock: Socket, bind: AddressLike | str) -> None:
    """Give a datagram client an address so that replies can reach it."""
    if bind == "autobind":
        if not PLATFORM.has_autobind:
            raise UnsupportedFeature(f"autobind is not available on {PLATFORM.name}")
        sock.bind(b"")
        return
    if bind == "auto":
        # A fresh directory with an unguessable name: searchable (so a server of
        # another user can reply) but not listable; removed on close.
        import tempfile  # here, not at the top: it loads random, shutil, bz2, lzma

        private = tempfile.mkdtemp(prefix="afx-", dir=tempfile.gettempdir()).encode()
        os.chmod(private, 0o711)
        sock._private_dir = private
        sock._bound = bind_address(sock, Address.path(os.path.join(private, b"c.sock")), lock=False)
        return
    sock._bound = bind_address(sock, Address.parse(bind))
