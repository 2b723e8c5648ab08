"""Linux: ``SO_PEERCRED``, ``SO_PEERGROUPS``, ``SO_PEERPIDFD``, ``SCM_CREDENTIALS``, ``/proc``.

The thin system-call layer under :mod:`afunix._creds`; it returns plain
values (never :class:`~afunix.PeerCredentials`) so that it imports nothing
of afunix's public types.

* ``SO_PEERCRED`` gives the peer's pid and *effective* uid/gid, recorded by
  the kernel when the connection was made (``connect``/``socketpair``), not
  when it is asked;
* ``SO_PEERGROUPS`` (Linux 4.13+) the peer's supplementary groups, also from
  connect time;
* ``SO_PEERPIDFD`` (Linux 6.5+) a pidfd for the peer: a handle that names that
  one process forever, unlike a pid number, which the kernel recycles;
* ``SO_PASSCRED`` + ``SCM_CREDENTIALS``: credentials attached by the kernel to
  every message, the only way for datagram sockets (they have no
  connection). A sender may attach its own ``struct ucred``; the kernel
  accepts only its own pid and its real, effective or saved ids unless it has
  ``CAP_SYS_ADMIN`` (pid) or ``CAP_SETUID``/``CAP_SETGID`` (ids). Default
  per-message ids are the sender's *real* uid and gid.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

from .._credstructs import UCRED_SIZE, DecodedCredentials, build_ucred, parse_ucred

NAME = "linux"
#: How the peer's identity is obtained on a connected socket.
PEER_MECHANISM = "SO_PEERCRED"
#: How per-message credentials travel.
MESSAGE_MECHANISM: str | None = "SCM_CREDENTIALS"

SOL_SOCKET = socket.SOL_SOCKET
SO_PEERCRED: int = getattr(socket, "SO_PEERCRED", 17)
SO_PASSCRED: int = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS: int = getattr(socket, "SCM_CREDENTIALS", 2)
# Newer than the socket module of Python 3.11; values from <asm-generic/socket.h>.
SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)
SO_PASSPIDFD: int = getattr(socket, "SO_PASSPIDFD", 76)
SO_PEERPIDFD: int = getattr(socket, "SO_PEERPIDFD", 77)
SCM_PIDFD: int = getattr(socket, "SCM_PIDFD", 4)

#: The uid/gid the kernel reports for "no credentials" (``INVALID_UID``).
_INVALID_ID = 0xFFFFFFFF
#: ``NGROUPS_MAX`` on Linux.
_NGROUPS_MAX = 65536

#: Ancillary space needed to receive one ``SCM_CREDENTIALS`` (and one ``SCM_PIDFD``).
CREDENTIALS_SPACE = socket.CMSG_SPACE(UCRED_SIZE) + socket.CMSG_SPACE(4)

# Whether SO_PEERPIDFD / SO_PASSPIDFD work on this kernel; learnt on first use.
_has_peer_pidfd: bool | None = None


def peer(sock: socket.socket, want_pidfd: bool) -> tuple[DecodedCredentials, int | None]:
    """``SO_PEERCRED`` (+ ``SO_PEERGROUPS``, + ``SO_PEERPIDFD`` if *want_pidfd*).

    Returns the decoded ids and a new close-on-exec pidfd (or ``None``); the
    caller owns the pidfd.
    """
    raw = sock.getsockopt(SOL_SOCKET, SO_PEERCRED, UCRED_SIZE)
    creds = parse_ucred(raw)
    if creds.pid is None and creds.uid == _INVALID_ID:
        # Unconnected sockets (and connect()ed datagram sockets) have no peer
        # credentials; the kernel then reports pid 0 and uid/gid -1.
        raise OSError(errno.ENOTCONN, "no peer credentials")
    groups = _peer_groups(sock)
    pidfd = _peer_pidfd(sock) if want_pidfd else None
    return (
        DecodedCredentials("ucred", creds.pid, creds.uid, creds.gid, groups),
        pidfd,
    )


def peer_uid(sock: socket.socket) -> int:
    """The peer's effective uid at ``connect`` time: one ``SO_PEERCRED``, no groups, no
    pidfd (cheap enough for every accepted connection, before anything else)."""
    return parse_ucred(sock.getsockopt(SOL_SOCKET, SO_PEERCRED, UCRED_SIZE)).uid


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """``SO_PEERGROUPS``: the buffer grows on ``ERANGE`` (Python cannot read the needed size)."""
    count = 64
    while True:
        try:
            raw = sock.getsockopt(SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE and count < _NGROUPS_MAX:
                count *= 4
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.ENODATA, errno.EINVAL):
                return None  # Linux < 4.13, or no credentials
            raise
        n = len(raw) // 4
        return tuple(struct.unpack(f"={n}I", raw[: 4 * n]))


def _peer_pidfd(sock: socket.socket) -> int | None:
    global _has_peer_pidfd
    if _has_peer_pidfd is False:
        return None
    try:
        raw = sock.getsockopt(SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            _has_peer_pidfd = False  # Linux < 6.5
            return None
        if exc.errno in (errno.ESRCH, errno.ENODATA):
            return None  # the peer is gone (kernels before 6.16 cannot name it then)
        raise
    _has_peer_pidfd = True
    fd: int = struct.unpack("=i", raw)[0]
    return fd


def has_pidfd() -> bool | None:
    """Whether ``SO_PEERPIDFD`` worked (``None``: not tried yet)."""
    return _has_peer_pidfd


# ------------------------------------------------------------ pidfd queries
def pidfd_exited(pidfd: int, timeout: float | None = 0.0) -> bool:
    """Whether the process behind *pidfd* has exited (waiting up to *timeout* s).

    A pidfd becomes readable when its process exits (even before it is
    reaped), so this is a ``poll`` for ``POLLIN``.
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    ms = None if timeout is None else max(int(timeout * 1000), 0)
    return bool(poller.poll(ms))


def pidfd_pid(pidfd: int) -> int | None:
    """The pid the pidfd names, from ``/proc/self/fdinfo`` (``None`` once reaped)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None
    return None


# ------------------------------------------------------- facts from /proc
def process_facts(
    pid: int, pidfd: int | None
) -> tuple[str | None, tuple[str, ...] | None, str | None, bool]:
    """Read exe, cmdline and cgroup of *pid* from ``/proc``.

    Returns ``(exe, cmdline, cgroup, verified)``. With a pidfd the facts are
    read first and the pidfd checked *afterwards*: if its process is still
    alive then, the pid number could not have been recycled while we read,
    so the facts are the peer's (``verified``). Raises ``ProcessLookupError``
    if the process is gone.
    """
    if pidfd is not None and pidfd_exited(pidfd):
        raise ProcessLookupError(errno.ESRCH, f"pid {pid} has exited")
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"pid {pid} has exited") from None
    try:
        exe = _readlink(dirfd, "exe")
        cmdline = _read(dirfd, "cmdline")
        cgroup = _read(dirfd, "cgroup")
    finally:
        os.close(dirfd)
    if pidfd is not None and pidfd_exited(pidfd):
        raise ProcessLookupError(errno.ESRCH, f"pid {pid} exited while afunix read /proc")
    args = (
        tuple(a.decode(errors="replace") for a in cmdline.rstrip(b"\0").split(b"\0"))
        if cmdline
        else None
    )
    return exe, args, _unified_cgroup(cgroup), pidfd is not None


def _readlink(dirfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dirfd)
    except OSError:  # EACCES for another user's process, ENOENT for a zombie
        return None


def _read(dirfd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                break
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _unified_cgroup(raw: bytes | None) -> str | None:
    if not raw:
        return None
    lines = raw.decode(errors="replace").splitlines()
    if len(lines) == 1 and lines[0].startswith("0::"):
        return lines[0][3:]  # cgroup v2: just the path
    return ";".join(lines)  # v1 or hybrid: every hierarchy


# ------------------------------------------------- per-message credentials
def enable_passcred(sock: socket.socket, on: bool, pidfd: bool) -> None:
    """``SO_PASSCRED`` (and ``SO_PASSPIDFD`` when *pidfd*) on a receiving socket."""
    sock.setsockopt(SOL_SOCKET, SO_PASSCRED, int(on))
    if on and pidfd:
        sock.setsockopt(SOL_SOCKET, SO_PASSPIDFD, 1)  # ENOPROTOOPT before Linux 6.5
    elif not on:
        try:
            sock.setsockopt(SOL_SOCKET, SO_PASSPIDFD, 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise


def credentials_item(pid: int | None, uid: int | None, gid: int | None) -> tuple[int, int, bytes]:
    """The ``SCM_CREDENTIALS`` item a sender attaches; ``None`` means "my own".

    "My own" is what the kernel always accepts: this process's pid and its
    real uid and gid (the same ids it would attach by itself).
    """
    return (
        SOL_SOCKET,
        SCM_CREDENTIALS,
        build_ucred(
            os.getpid() if pid is None else pid,
            os.getuid() if uid is None else uid,
            os.getgid() if gid is None else gid,
        ),
    )


def decode_cmsg(level: int, kind: int, data: bytes) -> DecodedCredentials | None:
    """Decode an ``SCM_CREDENTIALS`` item; ``None`` if the item is something else."""
    if level == SOL_SOCKET and kind == SCM_CREDENTIALS:
        return parse_ucred(data)
    return None


def is_pidfd_cmsg(level: int, kind: int) -> bool:
    """Whether an ancillary item is ``SCM_PIDFD`` (a pidfd of the sender)."""
    return level == SOL_SOCKET and kind == SCM_PIDFD


# -------------------------------------------- who holds a socket path


def _socket_inodes(path: bytes) -> set[int]:
    """Inodes of listening sockets bound to *path*, from ``/proc/net/unix``."""
    inodes: set[int] = set()
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)  # header
            for line in f:
                fields = line.rstrip(b"\n").split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path
                if len(fields) == 8 and fields[7] == path:
                    inodes.add(int(fields[6]))
    except OSError:
        return set()
    return inodes


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def find_socket_holder(path: bytes) -> str | None:
    """Describe a process that has a socket bound at *path* open, if visible.

    Returns ``"pid N (command line)"`` or ``None`` when the holder cannot be
    seen (another user's process without privilege, or another PID namespace).
    """
    inodes = _socket_inodes(path)
    if not inodes:
        return None
    targets = {f"socket:[{ino}]" for ino in inodes}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # pragma: no cover - /proc always listable on Linux
        return None
    for pid in sorted(pids):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link in targets:
                who = "this process" if pid == me else _cmdline(pid)
                return f"pid {pid} ({who})"
    return None
