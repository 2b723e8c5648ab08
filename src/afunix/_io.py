"""The system calls of channel traffic, and nothing else (design guide, section 4.4).

The only module where a channel's bytes meet its socket: every send passes
``MSG_NOSIGNAL`` (a gone peer is ``BrokenPipeError``, never ``SIGPIPE``),
every receive ``MSG_CMSG_CLOEXEC`` (received descriptors are close-on-exec
from the first instant). What to send and what a receive means is decided by
:class:`~afunix._protocol.machine.ChannelProtocol`; these functions only carry it out,
on blocking and non-blocking sockets alike (``BlockingIOError`` goes to the
caller, which waits).

:func:`receive` is the lean path (section 8): on a frame boundary one
``recvmsg_into``; when exactly one whole simple frame came, the message is
built right here, else the bytes go to the protocol's decoder.
"""

from __future__ import annotations

import _socket
import socket
import struct
from collections.abc import Callable
from typing import Any

from ._address import Address
from ._cmsg import (
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    SCM_MAX_FD,
    Triple,
    exact_rights,
    rights,
)
from ._core import ccore
from ._creds import enable_credentials
from ._errors import UnsupportedFeature
from ._platform import NOSIGNAL
from ._protocol import Event
from ._protocol.framing import PLAIN_WORD, WORDS
from ._protocol.machine import PACKET_MIN, ChannelProtocol
from ._protocol.message import NO_FDS, Message
from ._protocol.write import OPEN as OPEN_STATE
from ._protocol.write import Write
from ._tlsio import BUFFERED_ONLY, TlsSocket

__all__ = [
    "frame_limit",
    "prepare",
    "protocol_for",
    "py_recv_frame",
    "py_send_frame",
    "read_once",
    "receive",
    "receive_tls",
    "receiver_for",
    "recv_frame",
    "send_frame",
    "set_timeout",
    "try_frame",
    "write_some",
]

_CLOEXEC = MSG_CMSG_CLOEXEC
_KINDS = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
_unpack_word = WORDS.unpack_from
_TIMEVAL = struct.Struct("@ll")
_pack_words = WORDS.pack
_new = object.__new__
_INT_MAX = 2**31 - 1
_family_of: Callable[[socket.socket], int] = _socket.socket.family.__get__
_type_of: Callable[[socket.socket], int] = _socket.socket.type.__get__
_new_protocol = object.__new__
_STREAM, _AF_UNIX = int(socket.SOCK_STREAM), int(socket.AF_UNIX)


def prepare(sock: socket.socket, *, credentials: bool) -> tuple[int, int, str | None]:
    """Check *sock* is a socket a channel can use: ``(type, packet room, transport)``.

    ``AF_UNIX`` of any type, or TCP (``AF_INET``/``AF_INET6`` stream). The
    packet room (seqpacket and datagram) is the larger socket buffer: a packet
    cannot be bigger than its sender's send buffer, bigger payloads go as
    memfds. *transport* is ``None`` when the socket carries descriptors, else
    its name for error messages (TCP, or a socket whose ``carries_fds``
    attribute is ``False``, such as an ``ssh://`` one): the channel then refuses
    descriptors, memfds and credentials. With *credentials* on a Unix socket,
    the kernel is asked to attach them (:func:`afunix.lowlevel.enable_credentials`).
    Called once per channel: the send and receive paths never ask again.
    """
    try:  # the C attributes: socket.socket's properties build an enum on every read
        family, kind = _family_of(sock), _type_of(sock)
    except TypeError:  # not built on the C socket type: ask it the ordinary way
        if isinstance(sock, TlsSocket):  # (credentials=True: refused by the protocol)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return socket.SOCK_STREAM, 0, sock.transport
        family, kind = sock.family, int(sock.type)
    if family != socket.AF_UNIX:
        return kind, 0, _prepare_tcp(sock, family, kind)
    if kind not in _KINDS:
        raise UnsupportedFeature(f"unsupported socket type {kind}")
    if getattr(sock, "carries_fds", True) is False:
        where = getattr(sock, "remote_address", None)
        return kind, 0, str(where) if where else "this socket (its carries_fds is False)"
    if credentials:
        enable_credentials(sock)  # the platform's way (Linux SO_PASSCRED, BSD LOCAL_CREDS)
    if kind == socket.SOCK_STREAM:
        return kind, 0, None
    room = max(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        PACKET_MIN,
    )
    return kind, room, None


def protocol_for(
    sock: socket.socket,
    *,
    max_size: int,
    maxfds: int,
    memfd_threshold: int | None,
    accept_memfd: bool,
    credentials: bool,
    max_fds_in_flight: int | None,
    recv_bufsize: int,
    fd_room: int | None = None,
    discard_fds: bool = False,
) -> ChannelProtocol:
    """:func:`prepare` *sock*, then the :class:`ChannelProtocol` for what it is and carries.

    The one place both shells (``Channel``, ``AsyncChannel``) build their protocol,
    so what a transport may carry (descriptors over TCP or ``ssh://``: refused) is
    decided the same way for both.
    """
    try:  # a Unix stream socket, the common case, without a call to prepare()
        kind = _type_of(sock)
        plain = kind == _STREAM and not credentials and _family_of(sock) == _AF_UNIX
    except TypeError:  # not built on the C socket type (prepare asks it otherwise)
        plain = False
    if plain and getattr(sock, "carries_fds", True) is not False:
        room, transport = 0, None
    else:
        kind, room, transport = prepare(sock, credentials=credentials)
    # Made and then initialised: calling a class with keywords packs them into a
    # dict (CPython 3.11's type call), a method call does not (0.6 us a channel).
    proto = _new_protocol(ChannelProtocol)
    proto.__init__(  # type: ignore[misc]
        kind,
        max_size=max_size,
        maxfds=maxfds,
        memfd_threshold=memfd_threshold,
        accept_memfd=accept_memfd,
        credentials=credentials,
        max_fds_in_flight=max_fds_in_flight,
        recv_bufsize=recv_bufsize,
        packet_bufsize=room,
        fd_room=fd_room,
        discard_fds=discard_fds,
        carries_fds=transport is None,
        transport=transport or "",
    )
    return proto


def _prepare_tcp(sock: socket.socket, family: int, kind: int) -> str:
    """Check a TCP socket, set ``TCP_NODELAY``; its name, e.g. ``TCP (tcp://10.0.0.2:7000)``."""
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        raise UnsupportedFeature(
            "a channel needs an AF_UNIX socket, or a TCP one (AF_INET/AF_INET6 stream); "
            f"this one is {_name(socket.AddressFamily, family)} {_name(socket.SocketKind, kind)}"
        )
    # Channel traffic is small messages, often request and response: with Nagle's
    # algorithm a small frame waits until the peer acknowledged the previous one,
    # and the peer's delayed ACK makes that up to 40 ms (Linux) per round trip.
    # Batching is explicit instead: send(..., more=True) writes many frames at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return f"TCP ({Address.from_sockaddr(family, sock.getpeername())})"
    except OSError:  # not connected (yet): every use will say so
        return "TCP"


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


def set_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """``SO_RCVTIMEO``/``SO_SNDTIMEO``: a blocking call on *sock* gives up with ``EAGAIN``
    after *seconds* (``None``: never). Per direction, unlike ``settimeout``: a
    sender and a receiver in two threads each keep their own."""
    whole = 0.0 if seconds is None else max(seconds, 1e-6)
    sec = int(whole)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, int((whole - sec) * 1e6)))


def write_some(sock: socket.socket, out: Write) -> bool:
    """One ``sendmsg`` of *out*; ``True`` when all of it went."""
    return out.advance(sock.sendmsg(out.buffers, out.ancdata, NOSIGNAL, *out.to))


def try_frame(sock: socket.socket, frame: bytes, proto: ChannelProtocol) -> Write | None:
    """One ``send`` of a whole plain frame; ``None`` when all went, else the rest."""
    sent = sock.send(frame, NOSIGNAL)
    return None if sent == len(frame) else proto.rest_of(frame, sent)


def read_once(sock: socket.socket, proto: ChannelProtocol) -> None:
    """One ``recvmsg_into`` where the protocol says, reported to it."""
    n, anc, flags, address = sock.recvmsg_into([proto.recv_into()], proto.control_space, _CLOEXEC)
    proto.received(n, anc, flags, address)


def receive(sock: socket.socket, proto: ChannelProtocol) -> Message | Event:
    """One receive: a message, :data:`NEED_DATA` (read again) or ``CLOSED``.

    When the protocol is idle (a stream on a frame boundary, nothing buffered)
    the core's :func:`recv_frame` reads, and makes the message when exactly one
    whole simple frame came; anything else is the decoder's.
    """
    view: Any = proto.rview
    if proto.idle and view is not None:
        got = recv_frame(sock, view, proto.control_space, proto.max_size, proto.maxfds)
        if type(got) is tuple:
            proto.received(got[0], got[1], got[2], None)
        elif got is None:  # (compiled core) a socket with a timeout: its own call waits
            read_once(sock, proto)
        else:
            return got  # type: ignore[no-any-return]
    else:
        read_once(sock, proto)
    return proto.next_event()


def frame_limit(sock: Any, proto: ChannelProtocol) -> int:
    """The largest payload a shell may give :func:`send_frame` on *sock* (``-1``: none).

    Streams only (a packet may need the memfd resend), never ``tls://`` (the
    core writes to the descriptor), up to the protocol's plain limit.
    """
    return -1 if not proto.stream or isinstance(sock, TlsSocket) else proto.plain_limit


def py_recv_frame(
    sock: socket.socket, buf: memoryview, ancbufsize: int, max_size: int, maxfds: int
) -> Message | tuple[int, list[Triple], int]:
    """One ``recvmsg_into`` into *buf* (a ``memoryview``, as the protocol's ``rview``):
    the message when exactly one whole simple frame came.

    Simple: magic, no flags, a length within *max_size* and *buf* not filled
    (more may be waiting), its ``0 < n <= maxfds`` descriptors in one
    well-formed ``SCM_RIGHTS``, no ``MSG_CTRUNC``. Anything else is returned raw,
    ``(nbytes, ancdata, msg_flags)``, for :meth:`ChannelProtocol.received`. The
    reference of the compiled core's ``recv_frame``, which replaces it when it runs
    (and which returns ``None``, having read nothing, where a socket in non-blocking
    mode, one with a timeout, has nothing: the Python socket's own call then waits
    as its timeout says, as it does here).
    """
    n, anc, flags, _ = sock.recvmsg_into([buf], ancbufsize, _CLOEXEC)
    if 8 <= n < len(buf):
        word, length = _unpack_word(buf)
        if n == 8 + length and length <= max_size and not flags & MSG_CTRUNC:
            if word == PLAIN_WORD:
                if not anc:  # plain_message(), inline
                    msg: Message = _new(Message)
                    msg.data = buf[8:n].tobytes()
                    msg.address = msg.credentials = msg._payload = None
                    msg._fds = NO_FDS
                    return msg
            elif (
                0 < (nfds := word - PLAIN_WORD) <= maxfds
                and (fds := exact_rights(anc, nfds)) is not None
            ):
                return Message(buf[8:n].tobytes(), fds)
    return n, anc, flags


def py_send_frame(sock: socket.socket, data: Any, fds: Any, limit: int) -> int:
    """Send one small plain frame of *data* with descriptor numbers *fds*: the bytes sent.

    Only when *data* is ``bytes`` or ``bytearray`` of at most *limit* bytes and
    *fds* a tuple or list of at most 253 non-negative ``int`` s; else ``-1`` and
    nothing is done (the protocol takes the message: files, sockets, checks and
    errors). One ``send``/``sendmsg`` with ``MSG_NOSIGNAL``, the descriptors with
    its first byte; ``-1`` too where a non-blocking socket has no room (the
    protocol's path then waits for it). The reference of the compiled core's
    ``send_frame`` (which answers ``-1`` for any socket in non-blocking mode, one
    with a timeout too: the protocol's path then waits as the timeout says).
    """
    kind = type(data)
    if (kind is not bytes and kind is not bytearray) or len(data) > limit:
        return -1
    kind = type(fds)
    if (kind is not tuple and kind is not list) or len(fds) > SCM_MAX_FD:
        return -1
    for fd in fds:
        if type(fd) is not int or not 0 <= fd <= _INT_MAX:
            return -1
    header = _pack_words(PLAIN_WORD + len(fds), len(data))
    try:
        if fds:
            return sock.sendmsg([header, data], [rights(fds)], NOSIGNAL)
        return sock.send(header + data, NOSIGNAL)
    except BlockingIOError:
        if sock.gettimeout() == 0.0:  # non-blocking: the protocol's path waits for room
            return -1
        raise  # SO_SNDTIMEO ran out


#: The core's functions: compiled where built (see :mod:`afunix._core`), else the above.
recv_frame: Callable[..., Any] = py_recv_frame
send_frame: Callable[[Any, Any, Any, int], int] = py_send_frame
if ccore is not None:
    recv_frame, send_frame = ccore.recv_frame, ccore.send_frame


def receive_tls(sock: Any, proto: ChannelProtocol) -> Message | Event:
    """:func:`receive` for a :class:`TlsSocket`: one read, then what it left buffered.

    A TLS read may leave plaintext (or whole records) in the TLS object that the
    socket will never signal again; it goes to the protocol at once, so the
    shells find it with ``next_event`` (the protocol is not idle then) instead
    of waiting for a readiness that does not come.
    """
    read_once(sock, proto)
    while sock.buffered and proto.state is OPEN_STATE:
        try:
            n, anc, flags, address = sock.recvmsg_into([proto.recv_into()], 0, BUFFERED_ONLY)
        except BlockingIOError:  # only part of a record: the socket brings the rest
            break
        proto.received(n, anc, flags, address)
        if not n:
            break
    return proto.next_event()


def receiver_for(sock: Any) -> Callable[[Any, ChannelProtocol], Message | Event]:
    """The receive function of a channel on *sock*: :func:`receive_tls` or :func:`receive`."""
    return receive_tls if isinstance(sock, TlsSocket) else receive
