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

from ._cmsg import INT_SIZE, MSG_CMSG_CLOEXEC, MSG_CTRUNC, SCM_RIGHTS, SOL_SOCKET
from ._errors import UnsupportedFeature
from ._platform import NOSIGNAL
from ._protocol import Event
from ._protocol.machine import PACKET_MIN, PLAIN_WORD, WORD, ChannelProtocol, Write
from ._protocol.message import Message

__all__ = ["prepare", "read_once", "receive", "set_timeout", "try_frame", "write_some"]

_CLOEXEC = MSG_CMSG_CLOEXEC
_KINDS = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
_unpack_word = WORD.unpack_from
_TIMEVAL = struct.Struct("@ll")
_family_of: Callable[[socket.socket], int] = _socket.socket.family.__get__
_type_of: Callable[[socket.socket], int] = _socket.socket.type.__get__


def prepare(sock: socket.socket, *, credentials: bool) -> tuple[int, int]:
    """Check *sock* is an ``AF_UNIX`` socket a channel can use; ``(type, packet room)``.

    The packet room (seqpacket and datagram) is the larger socket buffer: a
    packet cannot be bigger than its sender's send buffer, bigger payloads go
    as memfds. With *credentials*, ``SO_PASSCRED`` is set.
    """
    try:  # the C attributes: socket.socket's properties build an enum on every read
        family, kind = _family_of(sock), _type_of(sock)
    except TypeError:  # not built on the C socket type: ask it the ordinary way
        family, kind = sock.family, int(sock.type)
    if family != socket.AF_UNIX:
        raise UnsupportedFeature(
            "descriptor passing needs an AF_UNIX socket; this one is "
            f"{socket.AddressFamily(family).name}"
        )
    if kind not in _KINDS:
        raise UnsupportedFeature(f"unsupported socket type {kind}")
    if credentials:
        passcred = getattr(socket, "SO_PASSCRED", None)
        if passcred is None:  # pragma: no cover - not Linux
            raise UnsupportedFeature("per-message credentials (SO_PASSCRED) need Linux")
        sock.setsockopt(socket.SOL_SOCKET, passcred, 1)
    if kind == socket.SOCK_STREAM:
        return kind, 0
    room = max(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        PACKET_MIN,
    )
    return kind, room


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
