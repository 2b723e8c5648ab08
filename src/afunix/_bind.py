"""Safe bind for pathname sockets (UNP 15.2, 15.4).

The book's programs ``unlink()`` whatever is at the path before ``bind()``.
That deletes a live server's socket (two instances both "win") and, run as
root, happily deletes a regular file or follows nothing-good. afunix instead:

* nothing at the path: bind;
* a file that is not a socket, a directory, a symlink (never followed):
  refuse, leave it alone, say what is there;
* a socket with a live listener: refuse with :class:`AddressInUse`, naming the
  holder when the system shows it;
* a stale socket (connect is refused): remove it, then bind.

Permissions. Without ``mode`` the book's rule holds: the file gets ``0777``
masked by the umask (15.4 point 1). With ``mode``/``owner``/``group`` afunix
binds under a umask of ``0777`` (the file is created with mode ``0000``),
then ``chown``s it, then ``chmod``s it to ``mode``. At no moment is the file
reachable with wider permissions than asked: it goes from "nobody" to exactly
what was asked. The umask is process-wide, so afunix holds a lock and keeps it
changed only for the ``bind`` call itself; a file another thread creates in
that instant gets a *narrower* mode, never a wider one.

On close afunix unlinks the path only if it still names *our* socket (same
device and inode), so a successor that bound the same path survives our exit.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import threading
from dataclasses import dataclass

from ._address import Address, AddressKind
from ._errors import AddressInUse, AfunixError, NotASocket, strerror
from ._platform import PLATFORM

__all__ = ["BoundPath", "bind_address", "describe_file", "probe_socket_file", "resolve_ids"]

_umask_lock = threading.Lock()

_PROBE_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)


@dataclass(frozen=True)
class BoundPath:
    """A socket file this process created; removed on :meth:`release` if still ours."""

    path: bytes
    dev: int
    ino: int

    def is_ours(self) -> bool:
        """True while the path still names the socket we bound."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def release(self) -> bool:
        """Unlink the path if it is still our socket. Returns whether it did."""
        if not self.is_ours():
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def describe_file(st: os.stat_result, path: bytes) -> str:
    """Say what kind of file *st* is, for error messages."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = os.fsdecode(os.readlink(path))
        except OSError:
            target = "?"
        return f"a symbolic link to {target!r}"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return f"a regular file of {st.st_size} bytes"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a file of unknown type"  # pragma: no cover


def probe_socket_file(path: bytes) -> tuple[bool, int | None]:
    """Is a process listening on the socket file at *path*?

    Returns ``(alive, type)`` where ``type`` is the socket type that answered
    (or that the listener has, learnt from ``EPROTOTYPE``). A non-blocking
    connect never waits: ``EAGAIN`` (full queue) counts as alive,
    ``ECONNREFUSED`` as stale.
    """
    for sock_type in _PROBE_TYPES:
        probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_NONBLOCK)
        try:
            probe.connect(path)
        except BlockingIOError:
            return True, sock_type
        except ConnectionRefusedError:
            return False, None
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                continue
            if exc.errno in (errno.EACCES, errno.EPERM):
                # We may not connect, but somebody may listen: be conservative.
                return True, None
            return False, None
        else:
            return True, sock_type
        finally:
            probe.close()
    return False, None  # pragma: no cover - every type said EPROTOTYPE


def resolve_ids(owner: str | int | None, group: str | int | None) -> tuple[int, int]:
    """Turn user/group names or numbers into ids (-1 for "leave as is")."""
    uid = gid = -1
    if owner is not None:
        if isinstance(owner, int) or owner.isdigit():
            uid = int(owner)
        else:
            try:
                uid = pwd.getpwnam(owner).pw_uid
            except KeyError:
                raise AfunixError(
                    errno.EINVAL, f"no such user {owner!r} (owner of the socket file)"
                ) from None
    if group is not None:
        if isinstance(group, int) or group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise AfunixError(
                    errno.EINVAL, f"no such group {group!r} (group of the socket file)"
                ) from None
    return uid, gid


def _clear_path(path: bytes) -> None:
    """Make sure nothing but a stale socket is at *path*; remove the stale socket."""
    shown = os.fsdecode(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        what = describe_file(st, path)
        raise NotASocket(
            errno.EEXIST,
            f"cannot bind {shown!r}: it is {what}, not a socket; afunix never replaces "
            "other files: remove it yourself or choose another path",
            shown,
        )
    alive, _ = probe_socket_file(path)
    if alive:
        holder = PLATFORM.backend.find_socket_holder(path)
        who = f" (held by {holder})" if holder else ""
        raise AddressInUse(
            f"cannot bind {shown!r}: a server is listening there{who}; stop it first, "
            "or pick another path",
            shown,
            holder=holder,
        )
    # Stale: nobody listens. Remove it only if it is still the file we probed.
    try:
        st2 = os.lstat(path)
    except FileNotFoundError:
        return
    if (st2.st_dev, st2.st_ino) == (st.st_dev, st.st_ino):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _bind_restricted(sock: socket.socket, path: bytes, mode: int, uid: int, gid: int) -> None:
    with _umask_lock:
        old = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    try:
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid, follow_symlinks=False)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):  # pragma: no cover - someone swapped the file
            raise AfunixError(errno.EEXIST, f"{os.fsdecode(path)!r} changed under us after bind")
        os.chmod(path, mode)
    except OSError:
        # Do not leave a half-configured (mode 0000) socket file behind.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def bind_address(
    sock: socket.socket,
    address: Address,
    *,
    mode: int | None = None,
    owner: str | int | None = None,
    group: str | int | None = None,
    parent_mode: int | None = None,
) -> BoundPath | None:
    """Bind *sock* to *address* safely; return the :class:`BoundPath` to release.

    ``parent_mode``: create the parent directory (and its parents) with this
    mode when it is missing. Returns ``None`` for abstract, unnamed and TCP
    addresses, which leave no file behind.
    """
    if address.kind is not AddressKind.PATH:
        if mode is not None or owner is not None or group is not None:
            raise AfunixError(
                errno.EINVAL,
                f"{address.describe()} has no file, so mode/owner/group cannot apply; "
                "protect abstract sockets with a peer-credential policy instead",
            )
        try:
            sock.bind(address.sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"cannot bind {address.describe()}: the name is already in use"
                ) from exc
            raise AfunixError(
                exc.errno or errno.EIO,
                f"cannot bind {address.describe()}: {strerror(exc.errno or errno.EIO)}",
            ) from exc
        return None

    path = address.raw
    shown = os.fsdecode(path)
    parent = os.path.dirname(path)
    if parent_mode is not None and not os.path.isdir(parent):
        os.makedirs(parent, mode=parent_mode, exist_ok=True)
        os.chmod(parent, parent_mode)  # makedirs' mode is masked by the umask
    uid, gid = resolve_ids(owner, group)
    _clear_path(path)
    try:
        if mode is None and uid == -1 and gid == -1:
            sock.bind(path)
        else:
            _bind_restricted(sock, path, 0o777 if mode is None else mode, uid, gid)
    except OSError as exc:
        if isinstance(exc, AfunixError):
            raise
        err = exc.errno or errno.EIO
        if err == errno.EADDRINUSE:
            holder = PLATFORM.backend.find_socket_holder(path)
            raise AddressInUse(
                f"cannot bind {shown!r}: another socket appeared there while binding"
                + (f" (held by {holder})" if holder else ""),
                shown,
                holder=holder,
            ) from exc
        hint = {
            errno.ENOENT: "the directory does not exist (create it, or pass parent_mode)",
            errno.EACCES: "no write permission on the directory",
            errno.ENOTDIR: "a component of the path is not a directory",
            errno.EROFS: "the filesystem is read-only",
        }.get(err, strerror(err))
        raise AfunixError(err, f"cannot bind {shown!r}: {hint}", shown) from exc
    st = os.lstat(path)
    return BoundPath(path, st.st_dev, st.st_ino)
