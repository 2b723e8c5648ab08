"""The control-message codec (sans-IO): ``SCM_RIGHTS``, ``SCM_CREDENTIALS``, ``SCM_PIDFD``.

The one place of afunix that turns descriptors into control data and back:
:func:`fd_numbers` is the only conversion of the caller's descriptors (ints,
files, sockets) to numbers, :func:`rights` and :func:`credentials` build what
``sendmsg`` sends, :func:`decode`, :func:`fds_only` and :func:`fds_in` read
what ``recvmsg`` returned. No socket I/O happens here. The socket layer (:mod:`afunix._fds`) calls
``sendmsg``/``recvmsg`` and hands this module what the kernel returned; this
module turns it into typed items, checks it, and on any error closes every
descriptor that arrived, so a bad message never leaks a descriptor (UNP 15.7).

Two levels, both tested with tables of bytes:

* **items** <-> ``(level, type, data)`` triples, the form CPython's
  ``socket.sendmsg``/``socket.recvmsg`` use: :func:`encode`, :func:`decode`.
* triples <-> a raw control buffer, the bytes a C program sees in
  ``msg_control`` (``struct cmsghdr`` + data, padded to ``CMSG_SPACE``):
  :func:`pack_buffer`, :func:`unpack_buffer`.

Rules (STYLE.md practice 3): the receive buffer is sized with ``CMSG_SPACE``
(:func:`control_space`); ``MSG_CTRUNC`` is an error (:class:`ControlTruncated`);
an unexpected level, type or length is an error (:class:`UnexpectedControl`);
either way every descriptor already received is closed before raising.

``SCM_CREDENTIALS`` carries a Linux ``struct ucred`` (``pid_t pid; uid_t uid;
gid_t gid``, three native 32-bit integers); it appears on a socket with
``SO_PASSCRED`` set and is what the credentials module builds on.
"""

from __future__ import annotations

import errno
import functools
import os
import socket as _constants  # constants and the pure CMSG_* size functions only; no I/O
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from ._credstructs import DecodedCredentials
from ._errors import ProtocolError, TooManyFds
from ._peer import PeerCredentials
from ._platform import PLATFORM, Backend

__all__ = [
    "INT_SIZE",
    "MSG_CMSG_CLOEXEC",
    "MSG_CTRUNC",
    "NATIVE_LAYOUT",
    "SCM_CREDENTIALS",
    "SCM_MAX_FD",
    "SCM_PIDFD",
    "SCM_RIGHTS",
    "SOL_SOCKET",
    "UCRED",
    "ControlError",
    "ControlItem",
    "ControlTruncated",
    "Credentials",
    "FdLike",
    "Layout",
    "Rights",
    "Triple",
    "UnexpectedControl",
    "close_fds",
    "control_space",
    "credentials",
    "decode",
    "encode",
    "exact_rights",
    "fd_numbers",
    "fds_and_credentials",
    "fds_in",
    "fds_only",
    "fileno_of",
    "pack_buffer",
    "rights",
    "rights_space",
    "split_credentials",
    "unpack_buffer",
]

SOL_SOCKET: int = _constants.SOL_SOCKET
#: A plain int: ``&`` with the socket module's enum flag costs a microsecond per message.
_MSG_CTRUNC: int = int(_constants.MSG_CTRUNC)
#: The same, public: the channel core (``_protocol.machine``, ``_io``) tests it on every receive.
MSG_CTRUNC: int = _MSG_CTRUNC
#: Received descriptors are close-on-exec from the start (0 where it does not exist).
MSG_CMSG_CLOEXEC: int = int(getattr(_constants, "MSG_CMSG_CLOEXEC", 0))
SCM_RIGHTS: int = _constants.SCM_RIGHTS
#: Linux only; ``-1`` (never matches a real type) elsewhere.
SCM_CREDENTIALS: int = getattr(_constants, "SCM_CREDENTIALS", -1)
#: Linux >= 6.5 ``SO_PASSPIDFD``: a pidfd, i.e. a *descriptor*, which must be
#: closed like ``SCM_RIGHTS`` ones if it shows up unasked.
SCM_PIDFD: int = getattr(_constants, "SCM_PIDFD", 0x04 if PLATFORM.name == "linux" else -1)
#: How the kernel attaches a sender's credentials here (PeerCredentials.mechanism).
_MECHANISM = PLATFORM.backend.MESSAGE_MECHANISM or ""

#: Linux's limit of descriptors per ``sendmsg`` (``SCM_MAX_FD`` in ``include/net/scm.h``).
SCM_MAX_FD: Final = 253

INT_SIZE = struct.calcsize("i")
#: ``struct ucred``: pid_t, uid_t, gid_t.
UCRED = struct.Struct("iII")

Triple: TypeAlias = tuple[int, int, bytes]


class ControlError(ProtocolError):
    """The control data of a received message was unusable (its descriptors are closed).

    ``fds_closed`` is how many received descriptors afunix closed because of it.
    """

    fds_closed: int

    def __init__(self, message: str, err: int = errno.EPROTO, fds_closed: int = 0) -> None:
        super().__init__(message, err)
        self.fds_closed = fds_closed


class ControlTruncated(ControlError):
    """``MSG_CTRUNC``: the receiver had less room for control data than the sender sent.

    The kernel discarded (closed) the descriptors that did not fit; afunix
    closed the ones that did, so nothing leaks, but the message's descriptors
    are lost. Make room for more (``maxfds``) or have the peer send fewer.
    """

    def __init__(self, message: str, fds_closed: int = 0) -> None:
        super().__init__(message, errno.EMSGSIZE, fds_closed)


class UnexpectedControl(ControlError):
    """A control message of an unexpected level/type, or with a malformed length."""


@dataclass(frozen=True, slots=True)
class Rights:
    """``SCM_RIGHTS``: descriptors. Received ones are owned by whoever holds this."""

    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Credentials:
    """``SCM_CREDENTIALS``: the sender's ``struct ucred`` as the kernel vouches for it."""

    pid: int
    uid: int
    gid: int


ControlItem: TypeAlias = Rights | Credentials


# ---------------------------------------------------------------------------
# The caller's descriptors -> numbers -> control data (sending)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike: TypeAlias = "int | _HasFileno"


def fileno_of(obj: FdLike) -> int:
    """The descriptor number of an ``int``, a file or a socket; refuses closed ones."""
    if isinstance(obj, bool):
        raise TypeError("a bool is not a descriptor")
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"{obj!r} has no open descriptor (is it closed?)")
    return fd


def fd_numbers(fds: Iterable[FdLike]) -> list[int]:
    """The descriptor numbers of *fds* (ints, files, sockets): the only conversion.

    Refuses bools, closed files and more than :data:`SCM_MAX_FD` descriptors
    (:class:`~afunix.TooManyFds`). The numbers are only good while the objects
    they came from are alive: a sender keeps *fds* referenced until the
    ``sendmsg`` that carries them has returned (a file collected earlier closes
    its descriptor, and the number may name another file by then).
    """
    if (type(fds) is tuple or type(fds) is list) and len(fds) == 1:  # the common case
        (one,) = fds
        if type(one) is int and one >= 0:
            return [one]
    numbers = [fileno_of(f) for f in fds]
    if len(numbers) > SCM_MAX_FD:
        raise TooManyFds(len(numbers), SCM_MAX_FD)
    return numbers


_INT = struct.Struct("i")


def rights(fds: Sequence[int]) -> Triple:
    """The ``SCM_RIGHTS`` control message of descriptor numbers *fds* (see :func:`fd_numbers`)."""
    data = _INT.pack(fds[0]) if len(fds) == 1 else struct.pack(f"{len(fds)}i", *fds)
    return (SOL_SOCKET, SCM_RIGHTS, data)


def credentials(
    pid: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    *,
    backend: Backend = PLATFORM.backend,
) -> Triple:
    """The credentials control message this system sends (Linux ``SCM_CREDENTIALS``,
    BSD ``SCM_CREDS``): *pid*/*uid*/*gid* claimed, or this process's own when ``None``.

    *backend* is this system's (:data:`afunix._platform.PLATFORM`); tests pass another.
    """
    return backend.credentials_item(pid, uid, gid)


def split_credentials(
    triples: Iterable[Triple], *, backend: Backend = PLATFORM.backend
) -> tuple[DecodedCredentials | None, int | None, list[Triple]]:
    """Take the credential items out of what ``recvmsg`` returned.

    Returns the sender's credentials as the platform backend parses them
    (``SCM_CREDENTIALS``, ``SCM_CREDS``...), the pidfd of an ``SCM_PIDFD``
    that came with them (the caller owns it; closed here if no credentials
    came), and every other item untouched. On an error the pidfd is closed.
    """
    decoded: DecodedCredentials | None = None
    pidfd: int | None = None
    rest: list[Triple] = []
    try:
        for level, kind, data in triples:
            if backend.is_pidfd_cmsg(level, kind):
                for fd in fds_in([(SOL_SOCKET, SCM_PIDFD, data)]):
                    if pidfd is None:
                        pidfd = fd
                    else:  # pragma: no cover - the kernel sends one
                        os.close(fd)
                continue
            dec = backend.decode_cmsg(level, kind, data)
            if dec is None:
                rest.append((level, kind, data))
            elif decoded is None:
                decoded = dec
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    if decoded is None and pidfd is not None:
        os.close(pidfd)
        pidfd = None
    return decoded, pidfd, rest


def fds_and_credentials(
    ancdata: list[Triple], msg_flags: int, room: int
) -> tuple[list[int], PeerCredentials | None]:
    """Descriptors and the sender's credentials, in whatever form this system's kernel
    attaches them (Linux ``SCM_CREDENTIALS``, the BSDs' ``SCM_CREDS``: the platform
    backend parses them, as :func:`afunix.lowlevel.recv_credentials` does), for a
    channel's ``recvmsg`` with room for *room* descriptors.

    A pidfd (``SCM_PIDFD``, when someone set ``SO_PASSPIDFD`` on the socket) is
    closed at once: on a stream one read's credentials may go with several
    messages, so no message could own it; the pid, uid and gid stay. Errors
    close every descriptor that came.
    """
    try:
        decoded, pidfd, rest = split_credentials(ancdata)
    except Exception as exc:  # split_credentials closed the pidfd; close the rest
        close_fds(fds_in([t for t in ancdata if t[1] != SCM_PIDFD]))
        raise UnexpectedControl(f"malformed credentials from the kernel: {exc}") from exc
    if pidfd is not None:
        os.close(pidfd)
    fds = fds_only(rest, msg_flags, room=room) if rest or msg_flags & MSG_CTRUNC else []
    if decoded is None:
        return fds, None
    return fds, PeerCredentials(
        decoded.pid, decoded.uid, decoded.gid, decoded.groups, mechanism=_MECHANISM
    )


# ---------------------------------------------------------------------------
# Sizes


def rights_space(nfds: int) -> int:
    """``CMSG_SPACE(nfds * sizeof(int))``: room for one ``SCM_RIGHTS`` of *nfds* (0 -> 0)."""
    if nfds < 0:
        raise ValueError(f"negative descriptor count {nfds}")
    return NATIVE_LAYOUT.space(nfds * INT_SIZE) if nfds else 0


@functools.lru_cache(maxsize=64)
def control_space(maxfds: int, credentials: bool = False) -> int:
    """The ``recvmsg`` control buffer size for up to *maxfds* descriptors (+ credentials).

    Each control message needs its own ``CMSG_SPACE``; a sum of them is what
    the kernel needs to deliver all of them without ``MSG_CTRUNC``. Cached: a
    channel asks once per connection.
    """
    size = rights_space(maxfds)
    if credentials and SCM_CREDENTIALS >= 0:
        size += NATIVE_LAYOUT.space(UCRED.size)
    return size


# ---------------------------------------------------------------------------
# Items <-> triples


def encode(items: Iterable[ControlItem]) -> list[Triple]:
    """Items -> the ``(level, type, data)`` list that ``socket.sendmsg`` takes.

    Descriptors are sent as native ``int`` arrays; an empty :class:`Rights`
    is dropped (a zero-length ``SCM_RIGHTS`` is pointless and some systems
    reject it).
    """
    out: list[Triple] = []
    for item in items:
        if isinstance(item, Rights):
            if item.fds:
                for fd in item.fds:
                    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                        raise ValueError(f"not a descriptor number: {fd!r}")
                out.append(rights(item.fds))
        elif isinstance(item, Credentials):
            if SCM_CREDENTIALS < 0:  # pragma: no cover - not Linux
                raise ValueError("SCM_CREDENTIALS exists on Linux only")
            out.append((SOL_SOCKET, SCM_CREDENTIALS, UCRED.pack(item.pid, item.uid, item.gid)))
        else:
            raise TypeError(f"not a control item: {item!r}")
    return out


def fds_in(triples: Iterable[Triple]) -> list[int]:
    """Every descriptor number inside *triples* (``SCM_RIGHTS`` and ``SCM_PIDFD``).

    Whole ints only: a truncated trailing fragment is no descriptor.
    """
    fds: list[int] = []
    for level, kind, data in triples:
        if level == SOL_SOCKET and kind in (SCM_RIGHTS, SCM_PIDFD):
            whole = len(data) - len(data) % INT_SIZE
            fds.extend(struct.unpack(f"{whole // INT_SIZE}i", data[:whole]))
    return fds


def exact_rights(triples: list[Triple], nfds: int) -> list[int] | None:
    """The *nfds* descriptors of *triples* when they are exactly one well-formed
    ``SCM_RIGHTS`` item carrying that many; else ``None``, and :func:`decode` (through
    the protocol) says what is wrong. The lean receive's test (``_io.py_recv_frame``)."""
    if len(triples) == 1:
        level, kind, data = triples[0]
        if level == SOL_SOCKET and kind == SCM_RIGHTS and len(data) == INT_SIZE * nfds:
            return list(struct.unpack(f"{nfds}i", data))
    return None


def close_fds(fds: Iterable[int]) -> int:
    """Close every descriptor, ignoring ones already closed. Returns how many were closed."""
    closed = 0
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            continue
        closed += 1
    return closed


def decode(
    triples: Sequence[Triple],
    msg_flags: int = 0,
    *,
    room: int | None = None,
    accept_credentials: bool = True,
) -> list[ControlItem]:
    """What ``recvmsg`` returned -> items, or an error with every descriptor closed.

    Args:
        triples: the ancillary data list of ``socket.recvmsg``.
        msg_flags: its flags; ``MSG_CTRUNC`` there raises :class:`ControlTruncated`.
        room: how many descriptors the receiver made room for, only to say
            so in the error message.
        accept_credentials: whether ``SCM_CREDENTIALS`` is expected.

    Raises :class:`ControlTruncated` or :class:`UnexpectedControl`; before
    raising, every descriptor in *triples* is closed, whatever its item.
    """
    try:
        return _decode(triples, msg_flags, room, accept_credentials)
    except ControlError as exc:
        exc.fds_closed = close_fds(fds_in(triples))
        exc.strerror = _with_closed(exc.strerror or "", exc.fds_closed)
        exc.args = (exc.errno, exc.strerror)
        raise


def fds_only(
    triples: Sequence[Triple], msg_flags: int = 0, *, room: int | None = None
) -> list[int]:
    """The descriptors of what ``recvmsg`` returned, checked as :func:`decode` checks
    them (it raises the same errors, every descriptor closed).

    The common case, one well-formed ``SCM_RIGHTS`` and no truncation, is
    answered without building items; anything else goes through :func:`decode`.
    """
    if len(triples) == 1 and not msg_flags & _MSG_CTRUNC:
        level, kind, data = triples[0]
        n = len(data) // INT_SIZE
        if (
            level == SOL_SOCKET
            and kind == SCM_RIGHTS
            and n
            and n * INT_SIZE == len(data)
            and (room is None or n <= room)
        ):
            return list(struct.unpack(f"{n}i", data))
    items = decode(triples, msg_flags, room=room)
    return [fd for item in items if isinstance(item, Rights) for fd in item.fds]


def _with_closed(message: str, n: int) -> str:
    if n == 0:
        return message
    return f"{message}; the {n} descriptor(s) that did arrive were closed"


def _decode(
    triples: Sequence[Triple], msg_flags: int, room: int | None, accept_credentials: bool
) -> list[ControlItem]:
    truncated = bool(msg_flags & _MSG_CTRUNC)
    got = len(fds_in(triples))
    # CMSG_SPACE pads to the alignment, so the kernel may fit one descriptor more
    # than asked for; *room* is a hard limit all the same.
    if truncated or (room is not None and got > room):
        if room == 0:
            what = "the receiver made no room for descriptors"
        elif room is not None:
            what = f"the receiver had room for {room} descriptor(s)"
        else:
            what = "the receiver's control buffer was too small"
        how = (
            "the kernel truncated the control data (MSG_CTRUNC) and discarded the rest"
            if truncated
            else f"{got} arrived"
        )
        raise ControlTruncated(
            f"{what} but the sender passed more: {how}, so this message's descriptors "
            "are lost. Receive with room for more descriptors (maxfds=) or have the "
            "peer send fewer"
        )
    items: list[ControlItem] = []
    for level, kind, data in triples:
        if level != SOL_SOCKET:
            raise UnexpectedControl(
                f"unexpected control message level {level} (type {kind}); only "
                f"SOL_SOCKET ({SOL_SOCKET}) is expected on a Unix-domain socket"
            )
        if kind == SCM_RIGHTS:
            if len(data) % INT_SIZE or not data:
                raise UnexpectedControl(
                    f"malformed SCM_RIGHTS: {len(data)} bytes of data is not a whole, "
                    f"non-zero number of {INT_SIZE}-byte descriptors"
                )
            items.append(Rights(struct.unpack(f"{len(data) // INT_SIZE}i", data)))
        elif kind == SCM_CREDENTIALS and accept_credentials:
            if len(data) != UCRED.size:
                raise UnexpectedControl(
                    f"malformed SCM_CREDENTIALS: {len(data)} bytes of data, "
                    f"expected a {UCRED.size}-byte struct ucred"
                )
            items.append(Credentials(*UCRED.unpack(data)))
        else:
            name = {SCM_CREDENTIALS: "SCM_CREDENTIALS", SCM_PIDFD: "SCM_PIDFD"}.get(kind)
            raise UnexpectedControl(
                f"unexpected control message SOL_SOCKET type {kind}"
                + (f" ({name})" if name else "")
                + "; is an option such as SO_PASSCRED/SO_PASSPIDFD/SO_PASSSEC set on "
                "this socket by someone else?"
            )
    return items


# ---------------------------------------------------------------------------
# Triples <-> raw control buffer (struct cmsghdr layout)


@dataclass(frozen=True, slots=True)
class Layout:
    """How ``struct cmsghdr`` looks on a system: the ``cmsg_len`` field and alignment.

    Linux: ``size_t cmsg_len; int cmsg_level; int cmsg_type;`` aligned to
    ``sizeof(size_t)``. The BSDs: ``socklen_t cmsg_len`` (32 bits).
    """

    len_format: str  # struct code of cmsg_len: "Q"/"I" (64/32-bit size_t) or "I" (socklen_t)
    align: int
    byteorder: str = "="

    @property
    def header(self) -> struct.Struct:
        return struct.Struct(f"{self.byteorder}{self.len_format}ii")

    def aligned(self, n: int) -> int:
        """``CMSG_ALIGN(n)``."""
        return (n + self.align - 1) & ~(self.align - 1)

    def length(self, datalen: int) -> int:
        """``CMSG_LEN(datalen)``: header (aligned) plus data, no trailing padding."""
        return self.aligned(self.header.size) + datalen

    def space(self, datalen: int) -> int:
        """``CMSG_SPACE(datalen)``: header and data, each padded to the alignment."""
        return self.aligned(self.header.size) + self.aligned(datalen)


def _native_layout() -> Layout:
    # The alignment follows from the C library's own CMSG_SPACE; the width of
    # cmsg_len is the one fact that differs by family (size_t vs socklen_t).
    hdr = _constants.CMSG_LEN(0)
    align = _constants.CMSG_SPACE(1) - hdr
    size_t = "Q" if struct.calcsize("N") == 8 else "I"
    layout = Layout(size_t if PLATFORM.name == "linux" else "I", align)
    if layout.length(0) != hdr:  # pragma: no cover - would be a porting bug
        raise ImportError(f"cmsghdr layout mismatch: CMSG_LEN(0)={hdr}, computed {layout}")
    return layout


#: The layout of this system's ``struct cmsghdr``.
NATIVE_LAYOUT = _native_layout()


def pack_buffer(triples: Iterable[Triple], layout: Layout = NATIVE_LAYOUT) -> bytes:
    """Triples -> a raw ``msg_control`` buffer, each message padded to ``CMSG_SPACE``."""
    out = bytearray()
    for level, kind, data in triples:
        out += layout.header.pack(layout.length(len(data)), level, kind)
        out += bytes(layout.aligned(layout.header.size) - layout.header.size)
        out += data
        out += bytes(layout.space(len(data)) - layout.length(len(data)))
    return bytes(out)


def unpack_buffer(buf: bytes, msg_flags: int = 0, layout: Layout = NATIVE_LAYOUT) -> list[Triple]:
    """A raw ``msg_control`` buffer -> triples (``CMSG_FIRSTHDR``/``CMSG_NXTHDR`` walk).

    A ``cmsg_len`` shorter than a header, or one running past the buffer
    without ``MSG_CTRUNC`` being set, is :class:`UnexpectedControl`; with
    ``MSG_CTRUNC`` the last message is cut at the buffer's end (the data that
    is there is returned, so :func:`decode` can close its descriptors and
    report the truncation). On error every descriptor found so far is closed.
    """
    triples: list[Triple] = []
    hsize = layout.header.size
    data_off = layout.aligned(hsize)
    pos = 0
    try:
        while len(buf) - pos >= hsize:
            cmsg_len, level, kind = layout.header.unpack_from(buf, pos)
            if cmsg_len < data_off:
                raise UnexpectedControl(
                    f"malformed control message at offset {pos}: cmsg_len {cmsg_len} is "
                    f"shorter than its {data_off}-byte header"
                )
            end = pos + cmsg_len
            if end > len(buf):
                if not msg_flags & _MSG_CTRUNC:
                    triples.append((level, kind, bytes(buf[pos + data_off :])))
                    raise UnexpectedControl(
                        f"malformed control message at offset {pos}: cmsg_len {cmsg_len} "
                        f"runs past the {len(buf)}-byte buffer"
                    )
                triples.append((level, kind, bytes(buf[pos + data_off :])))
                break
            triples.append((level, kind, bytes(buf[pos + data_off : end])))
            pos += layout.space(cmsg_len - data_off)
    except ControlError as exc:
        exc.fds_closed = close_fds(fds_in(triples))
        exc.strerror = _with_closed(exc.strerror or "", exc.fds_closed)
        exc.args = (exc.errno, exc.strerror)
        raise
    return triples
