"""Sockets that know their address: ``pair`` and ``listen`` (UNP 15.3-15.6).

:class:`Socket` is a :class:`socket.socket` (everything you know still works)
that also remembers the socket file it bound, and removes that file on
:meth:`Socket.close` if it is still ours. The client side (``connect``, which
turns the kernel's terse errnos into errors that say what is wrong with which
path, and its ``tls://`` kin) is :mod:`afunix._connect`; it builds its sockets
with :func:`new_socket` and refuses what it cannot dial with :func:`refuse_remote`.

Cheap to import: what only some calls need is imported by them, not here:
``shutil`` (which loads ``bz2`` and ``lzma``) by the close of a datagram
client's private reply directory, and the ``ssh://`` transport
(:mod:`afunix._remote`: ``subprocess``, ``shlex``) by the first ``ssh://``
connect, which also defines :class:`RemoteSocket` then.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import socket
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from ._address import Address, AddressKind, AddressLike
from ._bind import BoundPath, bind_address
from ._errors import AfunixError, NoReplyAddress, UnsupportedFeature

if TYPE_CHECKING:
    from ._remote import SshSocket

__all__ = [
    "DatagramSocket",
    "RemoteSocket",
    "Socket",
    "SocketTypeLike",
    "listen",
    "new_socket",
    "pair",
    "refuse_exposed",
    "refuse_remote",
    "remote_socket_class",
    "socket_type",
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


_REMOTE_SOCKET_DOC = """The :class:`Socket` that :func:`afunix.connect` returns for an
``ssh://`` address.

Its peer is the user's ``ssh`` process, which relays to the far socket
(see :class:`afunix._remote.SshSocket`): ``carries_fds`` and
``carries_credentials`` are ``False``, ``peer_address`` is the ``ssh://``
address, and :meth:`close` also ends and reaps ``ssh``.
"""

if TYPE_CHECKING:

    class RemoteSocket(SshSocket, Socket):
        """Defined for real by :func:`remote_socket_class` on first use (doc there)."""


def remote_socket_class() -> type[RemoteSocket]:
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
    """``RemoteSocket``: defined on first use (see :func:`remote_socket_class`)."""
    if name == "RemoteSocket":
        return remote_socket_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def refuse_remote(addr: Address, sock_type: int, listening: bool) -> None:
    """Refuse what :func:`listen`/:func:`afunix.connect` cannot do with a ``tls://`` or
    ``ssh://`` address."""
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


def new_socket(family: int, sock_type: int) -> Socket:
    """A close-on-exec :class:`Socket` (:class:`DatagramSocket` for datagrams)."""
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
    refuse_remote(addr, sock_type, listening=True)
    sock = new_socket(addr.family, sock_type)
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
