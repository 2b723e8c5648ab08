"""Sockets that know their address: ``pair``, ``listen`` and ``connect`` (UNP 15.3-15.6).

:class:`Socket` is a :class:`socket.socket` (everything you know still works)
that also remembers the socket file it bound, and removes that file on
:meth:`Socket.close` if it is still ours. :func:`connect` turns the kernel's
terse errnos into errors that say what is wrong with which path.

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
``tempfile`` and ``shutil`` (which load ``random``, ``bz2``, ``lzma``) by a
datagram client's private reply directory, and the ``ssh://`` transport
(:mod:`afunix._remote`: ``subprocess``, ``shlex``) by the first ``ssh://``
connect, which also defines :class:`RemoteSocket` then.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from ._address import Address, AddressKind, AddressLike
from ._bind import BoundPath, bind_address, describe_file, probe_socket_file, socket_is_bound
from ._errors import (
    AfunixError,
    ListenQueueFull,
    NoReplyAddress,
    NoSuchSocket,
    NotASocket,
    NothingListening,
    UnsupportedFeature,
    WrongSocketType,
    strerror,
)
from ._platform import PLATFORM

if TYPE_CHECKING:
    import ssl as _ssl

    from ._io import TlsSocket
    from ._remote import SshSocket

__all__ = [
    "DatagramSocket",
    "RemoteSocket",
    "Socket",
    "SocketTypeLike",
    "check_tls",
    "connect",
    "connect_nowait",
    "connect_tls",
    "listen",
    "pair",
    "refuse_exposed",
    "requires_client_certificates",
    "socket_type",
    "tcp_of",
    "type_name",
]

SocketTypeLike: TypeAlias = "Literal['stream', 'dgram', 'datagram', 'seqpacket'] | str | int"

_TYPES = {
    "stream": socket.SOCK_STREAM,
    "dgram": socket.SOCK_DGRAM,
    "datagram": socket.SOCK_DGRAM,
    "seqpacket": socket.SOCK_SEQPACKET,
}
_NAMES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
}


def socket_type(value: SocketTypeLike) -> int:
    """Normalise ``"stream"``/``"dgram"``/``"seqpacket"`` or a ``SOCK_*`` constant."""
    if isinstance(value, int):
        if value not in _NAMES:
            raise ValueError(f"unsupported socket type {value}: use stream, dgram or seqpacket")
        return value
    try:
        return _TYPES[value.lower()]
    except KeyError:
        raise ValueError(
            f"unknown socket type {value!r}: use 'stream', 'dgram' or 'seqpacket'"
        ) from None


def type_name(sock_type: int) -> str:
    """``"stream"``, ``"datagram"`` or ``"seqpacket"``."""
    return _NAMES.get(sock_type, f"type {sock_type}")


class Socket(socket.socket):
    """A :class:`socket.socket` that removes the socket file it bound when closed.

    Everything of :class:`socket.socket` works as usual. Extras:

    * :attr:`address` / :attr:`peer_address`: :class:`Address` objects;
    * :meth:`close` unlinks the bound path only if it still names this
      socket (a successor that bound the same path keeps its file);
    * :meth:`detach` hands the descriptor *and* the responsibility for the
      file over: afunix will no longer remove it.
    """

    _bound: BoundPath | None = None
    _private_dir: bytes | None = None

    @property
    def address(self) -> Address:
        """This socket's own address (``getsockname``)."""
        return Address.from_sockaddr(self.family, self.getsockname())

    @property
    def peer_address(self) -> Address:
        """The connected peer's address (``getpeername``)."""
        return Address.from_sockaddr(self.family, self.getpeername())

    @property
    def bound_path(self) -> BoundPath | None:
        """The socket file this object will remove on close, if any."""
        return self._bound

    def close(self) -> None:
        """Close the socket and remove its socket file if it is still ours."""
        try:
            super().close()
        finally:
            # Most sockets (every connected stream client) own no file: leave them
            # quickly, without giving the object an instance dict to store None in.
            if self._bound is not None or self._private_dir is not None:
                self._release_files()

    def _release_files(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None:
            bound.release()
        private, self._private_dir = self._private_dir, None
        if private is not None:
            import shutil  # here, not at the top: it loads bz2 and lzma

            shutil.rmtree(private, ignore_errors=True)

    def detach(self) -> int:
        """Give up the descriptor and the duty to remove the socket file."""
        self._bound = None
        self._private_dir = None
        return super().detach()

    def __repr__(self) -> str:
        try:
            where = self.address.describe()
        except OSError:
            where = "closed"
        return f"<afunix.Socket fd={self.fileno()} {type_name(self.type)} {where}>"


class DatagramSocket(Socket):
    """A datagram :class:`Socket` that refuses to wait for replies it cannot get.

    An unbound Unix datagram socket has no address, so a server cannot reply
    to it (UNP 15.4 point 8): receiving on it would block forever. Every
    receive method here raises :class:`NoReplyAddress` instead.
    """

    _named = False

    def _check_named(self) -> None:
        if self._named or self.family != socket.AF_UNIX:
            return
        if Address.from_sockaddr(self.family, self.getsockname()).kind is AddressKind.UNNAMED:
            raise NoReplyAddress(
                errno.EDESTADDRREQ,
                "this datagram socket is not bound to any address, so no reply can reach it "
                "(UNP 15.4 point 8); use afunix.connect(..., type='dgram') with the default "
                "bind='auto', or bind the socket before sending",
            )
        self._named = True

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        self._check_named()
        return super().recv(bufsize, flags)

    def recvfrom(self, bufsize: int, flags: int = 0, /) -> tuple[bytes, Any]:
        self._check_named()
        return super().recvfrom(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        self._check_named()
        return super().recv_into(buffer, nbytes, flags)

    def recvmsg(
        self, bufsize: int, ancbufsize: int = 0, flags: int = 0, /
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        self._check_named()
        return super().recvmsg(bufsize, ancbufsize, flags)


_REMOTE_SOCKET_DOC = """The :class:`Socket` that :func:`connect` returns for an ``ssh://`` address.

Its peer is the user's ``ssh`` process, which relays to the far socket
(see :class:`afunix._remote.SshSocket`): ``carries_fds`` and
``carries_credentials`` are ``False``, ``peer_address`` is the ``ssh://``
address, and :meth:`close` also ends and reaps ``ssh``.
"""

if TYPE_CHECKING:

    class RemoteSocket(SshSocket, Socket):
        """Defined for real by :func:`_remote_socket_class` on first use (doc there)."""


def _remote_socket_class() -> type[RemoteSocket]:
    """``RemoteSocket(SshSocket, Socket)``, defined on the first ``ssh://`` connect.

    Its base :class:`afunix._remote.SshSocket` comes with ``subprocess`` and
    ``shlex``, which a program that never dials ``ssh://`` need not import.
    ``afunix._sockets.RemoteSocket`` (module ``__getattr__``) defines it too;
    two threads defining it at once keep one class (``setdefault``).
    """
    known = globals().get("RemoteSocket")
    if known is None:
        from ._remote import SshSocket

        made = type(
            "RemoteSocket",
            (SshSocket, Socket),
            {"__doc__": _REMOTE_SOCKET_DOC, "__module__": __name__},
        )
        known = globals().setdefault("RemoteSocket", made)
    return cast("type[RemoteSocket]", known)


def __getattr__(name: str) -> object:
    """``RemoteSocket``: defined on first use (see :func:`_remote_socket_class`)."""
    if name == "RemoteSocket":
        return _remote_socket_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refuse_remote(addr: Address, sock_type: int, listening: bool) -> None:
    """Refuse what :func:`listen`/:func:`connect` cannot do with a ``tls://``/``ssh://`` address."""
    if addr.kind is AddressKind.TLS:
        raise UnsupportedFeature(
            f"{addr}: tls:// needs an ssl.SSLContext, which listen() and connect() do not "
            "take: use Channel.connect(address, ssl=context), Channel.listen(address, "
            "ssl=context), Server(address, handler, ssl=context), or "
            "afunix.lowlevel.connect_tls() for a byte stream"
        )
    if addr.kind is AddressKind.SSH and listening:
        raise UnsupportedFeature(
            f"cannot listen on {addr}: an ssh:// address is reached from this host, not "
            "served; run the server on the far host at that path"
        )
    if addr.kind is AddressKind.SSH and sock_type != socket.SOCK_STREAM:
        raise UnsupportedFeature(
            f"{type_name(sock_type)} sockets are not available over ssh:// ({addr}): "
            "OpenSSH forwards stream sockets only"
        )


def _new_socket(family: int, sock_type: int) -> Socket:
    cls = DatagramSocket if sock_type == socket.SOCK_DGRAM else Socket
    return cls(family, sock_type | socket.SOCK_CLOEXEC)


def pair(type: SocketTypeLike = "stream") -> tuple[Socket, Socket]:
    """``socketpair(AF_UNIX, type)``: two connected, unnamed sockets (UNP 15.3).

    The classic use is a channel between a parent and the child it forks:
    each keeps one end and closes the other. Both ends are close-on-exec;
    pass one to a child program with ``subprocess``'s ``pass_fds``.
    """
    sock_type = socket_type(type)
    # The C socketpair: socket.socketpair() would build two Python sockets only to
    # detach them again (a channel pair is mostly object construction).
    a, b = _socket.socketpair(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        sa = Socket(socket.AF_UNIX, sock_type, 0, a.detach())
        sb = Socket(socket.AF_UNIX, sock_type, 0, b.detach())
    finally:
        a.close()
        b.close()
    return sa, sb


def listen(
    address: AddressLike,
    type: SocketTypeLike = "stream",
    *,
    backlog: int = 128,
    mode: int | None = None,
    owner: str | int | None = None,
    group: str | int | None = None,
    parent_mode: int | None = None,
) -> Socket:
    """Bind *address* safely and listen on it (datagram sockets are bound only).

    Args:
        address: a path, ``@abstract``, ``""`` (Linux autobind) or ``tcp://``.
        type: ``"stream"`` (default), ``"dgram"`` or ``"seqpacket"``.
        backlog: the listen queue length (capped by ``net.core.somaxconn``).
        mode: the socket file's permissions, e.g. ``0o660``. Without it the
            book's rule applies: ``0777`` masked by the umask.
        owner, group: user/group name or id to give the socket file.
        parent_mode: create the missing parent directory with this mode.

    The stale check, the bind and ``listen()`` happen under an ``flock`` of
    ``PATH.lock`` (removed again once the socket listens), so two processes
    starting on one path never both win. ``owner``/``group`` never widen the
    mode; modes and owners are set through a descriptor, never by path.

    The returned :class:`Socket` removes its file on close, if still its own
    and only in the process that bound it (a forked child's close leaves it).
    Raises :class:`AddressInUse` when a live server holds the path (naming it),
    :class:`NotASocket` when another kind of file is there; a stale socket
    file is replaced.
    """
    addr = Address.parse(address)
    sock_type = socket_type(type)
    if addr.kind is AddressKind.TCP and sock_type == socket.SOCK_SEQPACKET:
        raise UnsupportedFeature(f"seqpacket is not available over TCP ({addr})")
    _refuse_remote(addr, sock_type, listening=True)
    sock = _new_socket(addr.family, sock_type)
    try:
        if addr.kind is AddressKind.TCP:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # listen() happens inside bind_address, under the same lock as the stale
        # check and the bind (datagram sockets do not listen).
        sock._bound = bind_address(
            sock,
            addr,
            mode=mode,
            owner=owner,
            group=group,
            parent_mode=parent_mode,
            backlog=None if sock_type == socket.SOCK_DGRAM else backlog,
        )
    except BaseException:
        sock.close()
        raise
    return sock


def refuse_exposed(
    address: AddressLike,
    *,
    allow_remote: bool,
    sock: socket.socket | None = None,
    authenticated: bool = False,
) -> Address:
    """Refuse a ``tcp://`` address other hosts can reach, unless *allow_remote*.

    Plain TCP authenticates nobody: whoever reaches the port may connect and
    send. A ``tls://`` address is refused likewise unless *authenticated* (its
    server context requires client certificates: ``ssl.CERT_REQUIRED``).
    Loopback (``127.0.0.0/8``, ``::1``, a name such as ``localhost`` that
    resolves to those only) is allowed. Without *sock* the name is
    resolved now, before anything is bound; with *sock* (bound by then) its
    own address is checked, so a name that resolved differently at ``bind``
    cannot slip through. Other addresses pass. Returns the parsed address.
    """
    addr = Address.parse(address)
    tls = addr.kind is AddressKind.TLS
    if allow_remote or (addr.kind is not AddressKind.TCP and not tls) or (tls and authenticated):
        return addr
    if sock is not None:
        hosts = [str(sock.getsockname()[0])]
    else:
        try:
            infos = socket.getaddrinfo(addr.host, addr.port, addr.family, socket.SOCK_STREAM)
        except socket.gaierror:
            return addr  # listen() reports the name it cannot resolve
        hosts = [str(info[4][0]) for info in infos]
    exposed = sorted({host for host in hosts if not _is_loopback(host)})
    if exposed:
        why = (
            "and this TLS server does not require client certificates (its context's "
            "verify_mode is not ssl.CERT_REQUIRED), so it authenticates nobody"
            if addr.kind is AddressKind.TLS
            else "and plain TCP has no authentication"
        )
        raise AfunixError(
            errno.EACCES,
            f"refusing to listen on {addr}: {', '.join(exposed)} is not a loopback address, "
            f"{why} (anyone who can reach the port could "
            "connect); listen on 127.0.0.1, ::1 or localhost, reach this host through "
            "ssh:// instead, or pass allow_remote=True (afunix serve --allow-remote) if "
            "every host that can reach it is trusted",
        )
    return addr


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # fe80::1%eth0: no scope
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


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
    sock_type = socket_type(type)
    kind = addr.kind
    if kind is AddressKind.UNNAMED:
        raise AfunixError(errno.EDESTADDRREQ, "cannot connect to an unnamed address")
    if kind is AddressKind.TCP and sock_type == socket.SOCK_SEQPACKET:
        raise UnsupportedFeature(f"seqpacket is not available over TCP ({addr})")
    if kind is AddressKind.SSH or kind is AddressKind.TLS:
        _refuse_remote(addr, sock_type, listening=False)
        return _connect_ssh_retrying(addr, timeout, retries, backoff)
    family = addr.family
    unix = kind is not AddressKind.TCP
    reply_to = bind if sock_type == socket.SOCK_DGRAM and unix else None
    attempt = 0
    while True:
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = _new_socket(family, sock_type)
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

            return connect_ssh(addr, timeout=timeout, cls=_remote_socket_class())
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
    sock = _new_socket(addr.family, sock_type)
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
    from ._io import TlsSocket

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
