"""What is at a Unix socket address: the verdict of ``afunix probe``.

:func:`probe` looks at the file (``stat``), asks the kernel which socket is
bound to it (:mod:`afunix.diag`), and tries one non-blocking ``connect``,
reading the server's credentials (``SO_PEERCRED``) and closing at once: the
server sees a client that connects and leaves, nothing that hangs on.

Verdicts, each with its exit status in ``afunix probe`` (:data:`EXIT_STATUS`):

=============  ====  ==========================================================
``live``       0     a server answers (or its accept queue is full)
``nothing``    3     no file at the path / no socket bound to the abstract name
``not-socket`` 4     a file that is not a socket (regular file, directory, ...)
``stale``      5     a socket file nobody is bound to any more
``starting``   6     a socket is bound to the file but does not listen yet
``denied``     7     this user may not reach the file or connect to it
=============  ====  ==========================================================
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass, field

from . import diag as _diag
from ._address import Address, AddressKind
from ._bind import describe_file

__all__ = ["DUMPS", "EXIT_STATUS", "ProbeResult", "probe"]

EXIT_STATUS = {
    "live": 0,
    "nothing": 3,
    "not-socket": 4,
    "stale": 5,
    "starting": 6,
    "denied": 7,
}

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_TYPES = (int(socket.SOCK_STREAM), int(socket.SOCK_SEQPACKET), int(socket.SOCK_DGRAM))


@dataclass
class ProbeResult:
    """The verdict on one address, with what could be learnt on the way.

    ``server`` is ``(pid, uid, gid)`` from ``SO_PEERCRED`` (the listener's
    credentials when it called ``listen``), ``None`` when no connection was
    made or the socket type carries none. ``accept_queue``/``backlog`` are a
    listener's waiting connections and its ``listen()`` backlog.
    """

    address: str
    verdict: str
    detail: str
    type: str | None = None
    inode: int | None = None
    holders: list[_diag.Holder] = field(default_factory=list)
    server: tuple[int, int, int] | None = None
    accept_queue: int | None = None
    backlog: int | None = None
    queue_full: bool = False

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.verdict]


DUMPS = 3
"""How many dumps :func:`probe` reads before it concludes no socket is bound.

A netlink dump comes in batches, and the kernel resumes each batch by position
in a hash bucket: when other sockets close meanwhile (a busy host), a socket
can be skipped once. Seen in the test suite under load; a second dump finds it.
"""


def _bound_socket(addr: Address, st: os.stat_result | None) -> _diag.UnixSocketInfo | None:
    """The socket bound at *addr*, looked for in up to :data:`DUMPS` dumps."""
    for _ in range(DUMPS):
        found = _find_bound(addr, st)
        if found is not None:
            return found
    return None


def _find_bound(addr: Address, st: os.stat_result | None) -> _diag.UnixSocketInfo | None:
    """The socket bound at *addr* (not an accepted connection sharing its name)."""
    sockets, source = _diag.dump_or_fallback()
    best = None
    for info in sockets:
        if st is not None and source == "sock_diag":
            match = info.vfs == (st.st_ino, st.st_dev)
        else:
            match = info.name == addr.sockaddr and info.state != _diag.TCP_ESTABLISHED
        if match and info.state != _diag.TCP_ESTABLISHED and (best is None or info.listening):
            best = info
    return best


def _connect(
    addr: Address, first: int | None
) -> tuple[str, int | None, tuple[int, int, int] | None]:
    """Try each socket type: ``(outcome, type, credentials)``; outcome an errno name or "ok"."""
    order = ([first] if first else []) + [t for t in _TYPES if t != first]
    for kind in order:
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(addr.sockaddr)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, gid = _UCRED.unpack(raw)
            return "ok", kind, ((pid, uid, gid) if pid > 0 else None)
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                continue
            return errno.errorcode.get(exc.errno or 0, "EIO"), kind, None
        finally:
            sock.close()
    return "EPROTOTYPE", None, None  # pragma: no cover - no type fits


def _file_verdict(addr: Address) -> tuple[ProbeResult | None, os.stat_result | None]:
    path = addr.filesystem_path
    if path is None:
        return None, None
    text = str(addr)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ProbeResult(text, "nothing", f"no file at {text}"), None
    except PermissionError:
        return ProbeResult(
            text,
            "denied",
            f"permission denied reaching {text}: a directory on the way "
            "is closed to this user; run as its owner or root",
        ), None
    if not stat.S_ISSOCK(st.st_mode):
        return ProbeResult(
            text, "not-socket", f"{text} is {describe_file(st, path)}, not a socket"
        ), st
    return None, st


def probe(addr: Address) -> ProbeResult:
    """Say what is at *addr* (a path or an abstract name); see the module doc."""
    if addr.kind not in (AddressKind.PATH, AddressKind.ABSTRACT):
        raise ValueError(f"probe takes a socket path or @abstract name, not {addr.describe()!r}")
    early, st = _file_verdict(addr)
    if early is not None:
        return early
    text = str(addr)
    bound = _bound_socket(addr, st)
    if bound is None and addr.kind is AddressKind.ABSTRACT:
        return ProbeResult(text, "nothing", f"no socket is bound to the abstract name {text}")
    result = ProbeResult(text, "stale", "")
    if bound is not None:
        result.inode = bound.inode
        result.type = bound.type_name
        result.holders = _diag.holders().get(bound.inode, [])
        if bound.listening:
            result.accept_queue, result.backlog = bound.rqueue, bound.wqueue
    outcome, kind, creds = _connect(addr, bound.type if bound else None)
    if kind is not None and result.type is None:
        result.type = _diag.TYPE_NAMES.get(kind)
    _judge(result, outcome, creds, bound)
    return result


def _judge(
    result: ProbeResult,
    outcome: str,
    creds: tuple[int, int, int] | None,
    bound: _diag.UnixSocketInfo | None,
) -> None:
    text = result.address
    if outcome == "ok":
        result.verdict, result.server = "live", creds
        result.detail = f"a {result.type} server answers at {text}"
    elif outcome == "EAGAIN":
        result.verdict, result.queue_full = "live", True
        result.detail = f"a server listens at {text} but its accept queue is full"
    elif outcome in ("EACCES", "EPERM"):
        result.verdict = "denied"
        result.detail = (
            f"permission denied connecting to {text}: the socket file's mode or an LSM "
            "refuses this user; run as a user the server admits"
        )
    elif outcome == "ECONNREFUSED" and bound is not None:
        result.verdict = "starting"
        result.detail = f"a {result.type} socket is bound to {text} but does not listen yet"
    elif outcome in ("ECONNREFUSED", "ENOENT") and bound is None and result.address[0] != "@":
        result.verdict, result.type = "stale", None
        result.detail = (
            f"{text} is a socket file nobody is bound to (its server is gone); "
            "a server binding there replaces it, or remove it"
        )
    else:
        result.verdict = "nothing"
        result.detail = f"nothing answers at {text} ({outcome})"
