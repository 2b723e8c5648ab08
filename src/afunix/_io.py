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
from ._cmsg import INT_SIZE, MSG_CMSG_CLOEXEC, MSG_CTRUNC, SCM_RIGHTS, SOL_SOCKET
from ._errors import UnsupportedFeature
from ._platform import NOSIGNAL
from ._protocol import Event
from ._protocol.machine import PACKET_MIN, PLAIN_WORD, WORD, ChannelProtocol, Write
from ._protocol.message import Message

__all__ = [
    "prepare",
    "protocol_for",
    "read_once",
    "receive",
    "set_timeout",
    "try_frame",
    "write_some",
]

_CLOEXEC = MSG_CMSG_CLOEXEC
_KINDS = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
_unpack_word = WORD.unpack_from
_TIMEVAL = struct.Struct("@ll")
_family_of: Callable[[socket.socket], int] = _socket.socket.family.__get__
_type_of: Callable[[socket.socket], int] = _socket.socket.type.__get__


def prepare(sock: socket.socket, *, credentials: bool) -> tuple[int, int, str | None]:
    """Check *sock* is a socket a channel can use: ``(type, packet room, transport)``.

    ``AF_UNIX`` of any type, or TCP (``AF_INET``/``AF_INET6`` stream). The
    packet room (seqpacket and datagram) is the larger socket buffer: a packet
    cannot be bigger than its sender's send buffer, bigger payloads go as
    memfds. *transport* is ``None`` when the socket carries descriptors, else
    its name for error messages (TCP, or a socket whose ``carries_fds``
    attribute is ``False``, such as an ``ssh://`` one): the channel then refuses
    descriptors, memfds and credentials. With *credentials* on a Unix socket,
    ``SO_PASSCRED`` is set. Called once per channel: the send and receive
    paths never ask again.
    """
    try:  # the C attributes: socket.socket's properties build an enum on every read
        family, kind = _family_of(sock), _type_of(sock)
    except TypeError:  # not built on the C socket type: ask it the ordinary way
        family, kind = sock.family, int(sock.type)
    if family != socket.AF_UNIX:
        return kind, 0, _prepare_tcp(sock, family, kind)
    if kind not in _KINDS:
        raise UnsupportedFeature(f"unsupported socket type {kind}")
    if getattr(sock, "carries_fds", True) is False:
        where = getattr(sock, "remote_address", None)
        return kind, 0, str(where) if where else "this socket (its carries_fds is False)"
    if credentials:
        passcred = getattr(socket, "SO_PASSCRED", None)
        if passcred is None:  # pragma: no cover - not Linux
            raise UnsupportedFeature("per-message credentials (SO_PASSCRED) need Linux")
        sock.setsockopt(socket.SOL_SOCKET, passcred, 1)
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
    kind, room, transport = prepare(sock, credentials=credentials)
    return ChannelProtocol(
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
    and exactly one whole simple frame comes (magic, no flags, a length within
    ``max_size``, its descriptors in one well-formed ``SCM_RIGHTS``, no
    ``MSG_CTRUNC``), the message is made here; anything else is the decoder's.
    """
    view: Any = proto.rview
    if proto.idle and view is not None:
        n, anc, flags, _ = sock.recvmsg_into([view], proto.control_space, _CLOEXEC)
        if 8 <= n < len(view):
            word, length = _unpack_word(view)
            if n == 8 + length and length <= proto.max_size:
                if word == PLAIN_WORD and not anc and not flags & MSG_CTRUNC:
                    return Message(bytes(view[8:n]))
                nfds = word - PLAIN_WORD
                if 0 < nfds <= proto.maxfds and len(anc) == 1 and not flags & MSG_CTRUNC:
                    level, kind, data = anc[0]
                    if level == SOL_SOCKET and kind == SCM_RIGHTS and len(data) == INT_SIZE * nfds:
                        return Message(bytes(view[8:n]), list(struct.unpack(f"{nfds}i", data)))
        proto.received(n, anc, flags, None)
    else:
        read_once(sock, proto)
    return proto.next_event()
