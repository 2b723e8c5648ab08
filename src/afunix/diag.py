"""Every Unix socket on the host, from the kernel's ``sock_diag`` (Linux).

Two halves, as in h11:

* **sans-IO**: :func:`build_request` makes the ``_SOCK_DIAG_BY_FAMILY`` request
  (``struct nlmsghdr`` + ``struct unix_diag_req``) and :func:`parse_messages`
  turns the kernel's reply bytes (``struct unix_diag_msg`` + attributes) into
  :class:`UnixSocketInfo` values. No sockets; tested with tables of bytes.
* **I/O**: :func:`dump` sends the request on a ``_NETLINK_SOCK_DIAG`` socket and
  reads the reply; :func:`holders` maps socket inodes to the processes that
  hold them, from the ``socket:[INODE]`` links in ``/proc/*/fd``.

Why not ``/proc/net/unix``: it has no peer, no queue lengths, no owner and no
file inode. Why not pyroute2's ``DiagSocket``: it loses abstract names and
the owner uid, and the library's runtime is stdlib-only (docs/architecture.md).

The kernel side is ``net/unix/diag.c``; the structures are in
``<linux/unix_diag.h>`` and ``<linux/netlink.h>``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "SHOW_ALL",
    "STATE_NAMES",
    "TCP_CLOSE",
    "TCP_ESTABLISHED",
    "TCP_LISTEN",
    "TYPE_NAMES",
    "Holder",
    "UnixSocketInfo",
    "build_request",
    "dump",
    "dump_or_fallback",
    "holders",
    "kernel_dev_to_user",
    "parse_messages",
    "parse_proc_net_unix",
    "parse_unix_diag_msg",
]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x01
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

_UDIAG_SHOW_NAME = 0x01
_UDIAG_SHOW_VFS = 0x02
_UDIAG_SHOW_PEER = 0x04
_UDIAG_SHOW_ICONS = 0x08
_UDIAG_SHOW_RQLEN = 0x10
_UDIAG_SHOW_UID = 0x40
SHOW_ALL = (
    _UDIAG_SHOW_NAME
    | _UDIAG_SHOW_VFS
    | _UDIAG_SHOW_PEER
    | _UDIAG_SHOW_ICONS
    | _UDIAG_SHOW_RQLEN
    | _UDIAG_SHOW_UID
)

_UNIX_DIAG_NAME = 0
_UNIX_DIAG_VFS = 1
_UNIX_DIAG_PEER = 2
_UNIX_DIAG_ICONS = 3
_UNIX_DIAG_RQLEN = 4
_UNIX_DIAG_UID = 7

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_U32_PAIR = struct.Struct("=II")

TYPE_NAMES: dict[int, str] = {
    int(socket.SOCK_STREAM): "stream",
    int(socket.SOCK_DGRAM): "dgram",
    int(socket.SOCK_SEQPACKET): "seqpacket",
}
STATE_NAMES: dict[int, str] = {
    TCP_LISTEN: "listening",
    TCP_ESTABLISHED: "connected",
    TCP_CLOSE: "unconnected",
}


def _align(n: int) -> int:
    return (n + 3) & ~3


@dataclass
class UnixSocketInfo:
    """One Unix socket as ``sock_diag`` reports it.

    ``name`` is the raw ``sun_path`` bytes: empty for an unnamed socket, a
    leading NUL for an abstract name. ``rqueue``/``wqueue`` are, for a
    listener, the connections waiting in its accept queue and its backlog;
    otherwise the bytes queued to read and the bytes sent but not yet read by
    the peer. ``vfs`` is ``(inode, dev)`` of the socket file a path socket was
    bound to (``dev`` as ``os.stat`` reports it). ``uid`` is the socket's
    owner (Linux 5.3 and later). ``pending`` lists, for a listener, the inodes
    of the clients whose connections wait in its accept queue.
    """

    inode: int
    type: int
    state: int
    name: bytes = b""
    vfs: tuple[int, int] | None = None
    peer: int | None = None
    pending: list[int] = field(default_factory=list)
    rqueue: int | None = None
    wqueue: int | None = None
    uid: int | None = None

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type{self.type}")

    @property
    def state_name(self) -> str:
        """``listening``, ``connected`` or ``unconnected``.

        Linux marks *both* ends of a datagram ``connect`` established, so a
        datagram server that a client once connected to looks connected
        forever; without a peer it is reported ``unconnected``.
        """
        if self.state == TCP_ESTABLISHED and self.type == socket.SOCK_DGRAM and self.peer is None:
            return "unconnected"
        return STATE_NAMES.get(self.state, f"state{self.state}")

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN

    @property
    def address(self) -> str | None:
        """``/path``, ``@name`` (abstract) or ``None`` (unnamed).

        Undecodable bytes are kept as lone surrogates (``surrogateescape``).
        """
        if not self.name:
            return None
        if self.name[0] == 0:
            return "@" + self.name[1:].decode(errors="surrogateescape")
        return self.name.decode(errors="surrogateescape")


def build_request(seq: int = 1, *, show: int = SHOW_ALL, states: int = 0xFFFFFFFF) -> bytes:
    """The dump request for every Unix socket in *states* (a bit mask of ``1 << TCP_*``)."""
    body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, states, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    head = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
    )
    return head + body


def kernel_dev_to_user(kdev: int) -> int:
    """The kernel's internal ``dev_t`` (major << 20 | minor) as ``os.stat`` reports it."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def _apply_attribute(info: UnixSocketInfo, kind: int, data: bytes) -> None:
    if kind == _UNIX_DIAG_NAME:
        # A path's length may count its terminating NUL (as bind() was told); an
        # abstract name's NULs are part of it.
        info.name = data if data[:1] == b"\0" else data.split(b"\0", 1)[0]
    elif kind == _UNIX_DIAG_VFS and len(data) >= _U32_PAIR.size:
        ino, kdev = _U32_PAIR.unpack_from(data)
        info.vfs = (ino, kernel_dev_to_user(kdev))
    elif kind == _UNIX_DIAG_PEER and len(data) >= _U32.size:
        info.peer = _U32.unpack_from(data)[0] or None
    elif kind == _UNIX_DIAG_ICONS:
        info.pending = [v for (v,) in _U32.iter_unpack(data[: len(data) // 4 * 4])]
    elif kind == _UNIX_DIAG_RQLEN and len(data) >= _U32_PAIR.size:
        info.rqueue, info.wqueue = _U32_PAIR.unpack_from(data)
    elif kind == _UNIX_DIAG_UID and len(data) >= _U32.size:
        info.uid = _U32.unpack_from(data)[0]
    # other attributes (MEMINFO, SHUTDOWN, ...) are not asked for and ignored


def parse_unix_diag_msg(payload: bytes) -> UnixSocketInfo:
    """One ``struct unix_diag_msg`` and its attributes (the netlink header removed)."""
    if len(payload) < _UNIX_DIAG_MSG.size:
        raise ValueError(f"unix_diag_msg of {len(payload)} bytes, need {_UNIX_DIAG_MSG.size}")
    _family, type_, state, _pad, ino, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(payload)
    info = UnixSocketInfo(inode=ino, type=type_, state=state)
    pos = _UNIX_DIAG_MSG.size
    while pos + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, pos)
        if length < _RTATTR.size or pos + length > len(payload):
            raise ValueError(f"attribute of length {length} at offset {pos} overruns the message")
        _apply_attribute(info, kind, payload[pos + _RTATTR.size : pos + length])
        pos += _align(length)
    return info


def parse_messages(data: bytes) -> tuple[list[UnixSocketInfo], bool]:
    """Parse one ``recv`` of the reply: the sockets in it and whether the dump is done.

    Raises ``OSError`` with the kernel's errno on ``_NLMSG_ERROR`` (for example
    ``ENOENT`` when the kernel has no ``unix_diag``), ``ValueError`` on bytes
    that are not a well-formed reply.
    """
    found: list[UnixSocketInfo] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise ValueError(
                f"netlink message of length {length} at offset {pos} overruns the reply"
            )
        body = data[pos + _NLMSGHDR.size : pos + length]
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
            if code:
                raise OSError(code, f"sock_diag refused the request: {os.strerror(code)}")
            return found, True  # an ACK
        if kind == _SOCK_DIAG_BY_FAMILY:
            found.append(parse_unix_diag_msg(body))
        pos += _align(length)
    return found, False


def dump() -> list[UnixSocketInfo]:
    """Every Unix socket in this network namespace, from the kernel.

    Raises ``OSError`` when ``sock_diag`` is unavailable (no ``unix_diag``
    module, a seccomp filter, ...); :func:`dump_or_fallback` falls back to
    ``/proc/net/unix`` then.
    """
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
    ) as nl:
        nl.sendto(build_request(), (0, 0))
        found: list[UnixSocketInfo] = []
        while True:
            batch, done = parse_messages(nl.recv(1 << 16))
            found.extend(batch)
            if done:
                return found


def parse_proc_net_unix(text: bytes) -> list[UnixSocketInfo]:
    """The fallback: ``/proc/net/unix`` (inode, type, state and name only)."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) < 7:
            continue
        # Num RefCount Protocol Flags Type St Inode [Path]
        flags, type_, st, ino = (
            int(fields[3], 16),
            int(fields[4], 16),
            int(fields[5], 16),
            int(fields[6]),
        )
        state = TCP_LISTEN if flags & 0x10000 else (TCP_ESTABLISHED if st == 3 else TCP_CLOSE)
        name = fields[7] if len(fields) == 8 else b""
        if name.startswith(b"@"):
            name = b"\0" + name[1:]
        found.append(UnixSocketInfo(inode=ino, type=type_, state=state, name=name))
    return found


def dump_or_fallback() -> tuple[list[UnixSocketInfo], str]:
    """:func:`dump`, or ``/proc/net/unix`` when ``sock_diag`` fails; and which one served."""
    try:
        return dump(), "sock_diag"
    except OSError:
        with open("/proc/net/unix", "rb") as f:
            return parse_proc_net_unix(f.read()), "/proc/net/unix"


@dataclass(frozen=True)
class Holder:
    """A process holding a socket open: its pid, command name (``comm``) and uid."""

    pid: int
    command: str
    uid: int


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode(errors="replace").strip()
    except OSError:
        return None


def holders() -> dict[int, list[Holder]]:
    """Socket inode -> the processes holding it, from ``/proc/*/fd``.

    Processes this user may not inspect (another user's, without root) are
    left out, so a socket may have no visible holder. Each process is listed
    once per socket however many descriptors it has on it.
    """
    found: dict[int, list[Holder]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        inodes = set()
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
        if not inodes:
            continue
        holder = Holder(pid, _read_text(f"/proc/{pid}/comm") or "?", uid)
        for ino in inodes:
            found.setdefault(ino, []).append(holder)
    for listed in found.values():
        listed.sort(key=lambda h: h.pid)
    return found
