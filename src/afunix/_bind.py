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

Two starters on one path. Checking for a stale file, removing it, ``bind()``
and ``listen()`` are four steps; between ``bind()`` and ``listen()`` a socket
refuses connections exactly like a stale file does. afunix takes an ``flock``
on ``PATH.lock`` (as PostgreSQL and git do) from the check through
``listen()``, so two afunix starters never both win, and it tells a socket
that is about to listen from a stale file by asking the kernel whether any
socket is bound to the file at all (a probe of another type gets
``EPROTOTYPE`` from a bound socket, ``ECONNREFUSED`` from a stale file).
:func:`~afunix.connect` uses the same test to wait briefly for such a socket
instead of calling it stale. The lock file is ``0600``, opened with
``O_NOFOLLOW``, refused unless it is a regular file of ours with one name,
and removed (while still locked) once the socket listens; abstract names
have no file and need no lock: the kernel refuses a second bind.

Permissions. Without ``mode`` the book's rule holds: the file gets ``0777``
masked by the umask (15.4 point 1), whatever ``owner``/``group`` say (they
never widen the mode). With ``mode`` afunix binds under the process umask
plus the bits ``mode`` leaves out, so the file is born with ``mode`` or
narrower and never wider. Owner, group and any widening are then applied
through a descriptor of the socket file opened with ``O_PATH|O_NOFOLLOW``
and checked to be the very socket file ``bind()`` created (device, inode,
owner, one link), never by path: a user who can write the directory and
swaps in a symbolic link changes nothing. The umask is process-wide, so
afunix holds a lock and keeps it changed only for the ``bind`` call itself;
a file another thread creates in that instant gets a *narrower* mode, never
a wider one. ``parent_mode`` is applied with ``fchmod`` to a directory
afunix has just created and opened with ``O_NOFOLLOW``; a directory that
already existed keeps its mode.

On close afunix unlinks the path only if it still names *our* socket (same
device and inode) and only in the process that bound it, so a successor that
bound the same path survives our exit and a forked child that closes its copy
of the listener (UNP 15.5) leaves the parent's file alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ._address import Address, AddressKind
from ._errors import AddressInUse, AfunixError, NotASocket, strerror
from ._platform import PLATFORM

__all__ = [
    "BoundPath",
    "bind_address",
    "describe_file",
    "inspect_socket_file",
    "probe_socket_file",
    "resolve_ids",
    "socket_is_bound",
]

_umask_lock = threading.Lock()

_PROBE_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)

LOCK_SUFFIX = b".lock"
# How long a starter waits for another process that holds the path's lock file.
# The lock covers a check, an unlink, bind() and listen(): milliseconds, even on
# busy CPUs; a holder stuck for this long is reported instead of waited for.
LOCK_WAIT = 10.0

SocketFileState = Literal["listening", "starting", "stale", "denied", "gone"]


@dataclass(frozen=True)
class BoundPath:
    """A socket file this process created; removed on :meth:`release` if still ours.

    ``pid`` is the process that bound it: a forked child that inherits the
    listener and closes it (UNP 15.5) never removes the parent's file.
    """

    path: bytes
    dev: int
    ino: int
    pid: int = field(default_factory=os.getpid)

    def is_ours(self) -> bool:
        """True while the path still names the socket we bound, in the process that bound it."""
        if os.getpid() != self.pid:
            return False
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


def socket_is_bound(sockaddr: Any, sock_type: int) -> bool:
    """Is a socket of another type than *sock_type* bound at *sockaddr*?

    The kernel looks the socket up before it checks its type: a connect of
    the wrong type fails with ``EPROTOTYPE`` when a socket is bound there and
    with ``ECONNREFUSED`` when the file is stale (no socket behind it). This
    is how a stream socket between ``bind()`` and ``listen()`` (which refuses
    connections just like a stale file) is told from a stale file.
    """
    probe_type = socket.SOCK_DGRAM if sock_type != socket.SOCK_DGRAM else socket.SOCK_STREAM
    probe = socket.socket(socket.AF_UNIX, probe_type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(sockaddr)
    except OSError as exc:
        return exc.errno == errno.EPROTOTYPE
    finally:
        probe.close()
    return False


def inspect_socket_file(path: bytes) -> tuple[SocketFileState, int | None]:
    """What is behind the socket file at *path*? Non-blocking probes, never a wait.

    Returns ``(state, type)``: ``"listening"`` (a server answers, or its queue
    is full; ``type`` says which socket type answered), ``"starting"`` (a
    socket is bound but does not listen yet), ``"stale"`` (no socket behind
    the file), ``"denied"`` (this user may not connect, so nobody can tell),
    ``"gone"`` (the file vanished meanwhile).
    """
    bound = False
    for sock_type in _PROBE_TYPES:
        probe = socket.socket(
            socket.AF_UNIX, sock_type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            probe.connect(path)
        except BlockingIOError:
            return "listening", sock_type  # the queue is full: very much alive
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                continue  # nothing bound, or a socket of this type not listening yet
            if exc.errno == errno.EPROTOTYPE:
                bound = True  # a socket of another type is bound there
                continue
            if exc.errno == errno.EPERM:
                return "listening", sock_type  # a datagram socket connected to another peer
            if exc.errno == errno.EACCES:
                return "denied", None
            return "gone", None
        else:
            return "listening", sock_type
        finally:
            probe.close()
    return ("starting" if bound else "stale"), None


def probe_socket_file(path: bytes) -> tuple[bool, int | None]:
    """Is a process listening (or about to listen) on the socket file at *path*?

    Returns ``(alive, type)`` where ``type`` is the socket type that answered.
    A socket that is bound but not listening yet counts as alive, and so does
    one this user may not probe (be conservative); see
    :func:`inspect_socket_file` for the distinctions.
    """
    state, sock_type = inspect_socket_file(path)
    return state in ("listening", "starting", "denied"), sock_type


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


_BIND_HINTS = {
    errno.ENOENT: "the directory does not exist (create it, or pass parent_mode)",
    errno.EACCES: "no write permission on the directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EROFS: "the filesystem is read-only",
}


def _open_lock_file(lock_path: bytes, shown: str) -> int:
    """Open (creating it 0600) the lock file; refuse anything but a regular file of ours."""
    lock_shown = os.fsdecode(lock_path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err == errno.ELOOP:
            raise AfunixError(
                errno.EEXIST,
                f"cannot bind {shown!r}: its lock file {lock_shown!r} is a symbolic link, which "
                "afunix never follows; remove it, or bind in a directory other users cannot "
                "write",
                lock_shown,
            ) from exc
        hint = _BIND_HINTS.get(err, strerror(err))
        raise AfunixError(
            err, f"cannot bind {shown!r}: cannot open its lock file {lock_shown!r}: {hint}", shown
        ) from exc
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"is {describe_file(st, lock_path)}, not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
        elif st.st_nlink > 1:  # 0 is fine: its holder removed it, and we retry
            problem = f"has {st.st_nlink} names (hard links)"
        if problem is not None:
            raise AfunixError(
                errno.EPERM,
                f"cannot bind {shown!r}: its lock file {lock_shown!r} {problem}; another user "
                "may have planted it: remove it, or bind in a directory other users cannot "
                "write",
                lock_shown,
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _acquire_lock(lock_path: bytes, shown: str) -> int:
    """Hold an exclusive ``flock`` on *lock_path*, the file that name has now."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        fd = _open_lock_file(lock_path, shown)
        try:
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise AddressInUse(
                            f"cannot bind {shown!r}: another process has been binding it for "
                            f"{LOCK_WAIT:g} s (it holds the lock file "
                            f"{os.fsdecode(lock_path)!r}); stop it, or pick another path",
                            shown,
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            # The previous holder removes the file before it unlocks: if the name
            # now names another file (or none), lock that one instead.
            fst = os.fstat(fd)
            try:
                st = os.lstat(lock_path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def _path_lock(path: bytes, shown: str) -> Iterator[None]:
    """Serialise afunix starters on *path*: check, unlink, bind and listen as one step."""
    lock_path = path + LOCK_SUFFIX
    fd = _acquire_lock(lock_path, shown)
    try:
        yield
    finally:
        try:
            # Remove the lock file while still holding it (waiters then see a
            # new name and retry), so none is left behind after a normal start.
            fst = os.fstat(fd)
            st = os.lstat(lock_path)
            if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


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
    state, _ = inspect_socket_file(path)
    if state == "denied":
        raise AfunixError(
            errno.EACCES,
            f"cannot bind {shown!r}: a socket file of uid {st.st_uid} is there and this user "
            "may not connect to it (permission denied), so afunix cannot tell whether a "
            "server is listening; ask its owner (or root) to remove it if it is stale, or "
            "choose another path",
            shown,
        )
    if state in ("listening", "starting"):
        holder = PLATFORM.backend.find_socket_holder(path)
        who = f" (held by {holder})" if holder else ""
        what = (
            "a server is listening there"
            if state == "listening"
            else "a socket is bound there and about to listen (a server is starting)"
        )
        raise AddressInUse(
            f"cannot bind {shown!r}: {what}{who}; stop it first, or pick another path",
            shown,
            holder=holder,
        )
    if state == "gone":
        return
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


def _replaced(shown: str) -> AfunixError:
    return AfunixError(
        errno.EEXIST,
        f"cannot bind {shown!r}: the socket file was replaced by another file right after "
        "bind() (another user can write to its directory); nothing was changed on it: bind "
        "in a directory only this user can write",
        shown,
    )


def _set_file_attrs(
    path: bytes, born: os.stat_result, mode: int | None, uid: int, gid: int
) -> None:
    """chown/chmod the socket file bind() created, through a descriptor, never by path.

    Linux cannot chmod a socket file through the socket's descriptor (that
    changes the socket's own inode), so the file is opened ``O_PATH|O_NOFOLLOW``
    (a symbolic link is opened as itself and refused), checked to be the
    file bind() created, and changed through ``/proc/self/fd/N``, which names
    exactly that inode.
    """
    shown = os.fsdecode(path)
    o_path = getattr(os, "O_PATH", 0)
    if not o_path or not os.path.isdir("/proc/self/fd"):  # pragma: no cover - BSD, macOS
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode, follow_symlinks=False)
        return
    try:
        fd = os.open(path, o_path | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _replaced(shown) from None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISSOCK(st.st_mode)
            or (st.st_dev, st.st_ino) != (born.st_dev, born.st_ino)
            or st.st_uid != os.geteuid()
            or st.st_nlink != 1
        ):
            raise _replaced(shown)
        target = f"/proc/self/fd/{fd}"
        if uid != -1 or gid != -1:
            os.chown(target, uid, gid)
        if mode is not None:
            os.chmod(target, mode)
    finally:
        os.close(fd)


def _bind_restricted(
    sock: socket.socket, path: bytes, mode: int | None, uid: int, gid: int
) -> None:
    """Bind so that the file is born with *mode* or narrower, then finish through a descriptor."""
    shown = os.fsdecode(path)
    if mode is None:
        sock.bind(path)  # the book's rule: 0777 & ~umask; owner/group never widen it
        widen = None
    else:
        with _umask_lock:
            old = os.umask(0o777)
            born_umask = old | (0o777 & ~mode)
            os.umask(born_umask)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        widen = mode if (0o777 & ~born_umask) != mode else None
    born: os.stat_result | None = None
    try:
        born = os.lstat(path)
        if not stat.S_ISSOCK(born.st_mode):
            raise _replaced(shown)
        if uid != -1 or gid != -1 or widen is not None:
            _set_file_attrs(path, born, widen, uid, gid)
    except OSError:
        # Do not leave a half-configured socket file behind (only ours, by inode).
        if born is not None:
            BoundPath(path, born.st_dev, born.st_ino).release()
        raise


def _make_parent(parent: bytes, parent_mode: int) -> None:
    """Create *parent* with *parent_mode*, set with ``fchmod`` on the directory we made.

    A directory that already exists (made by anyone) keeps its mode; ours is
    born ``0700`` (or narrower), opened ``O_DIRECTORY|O_NOFOLLOW`` and checked
    to be ours before its mode is set, so a symbolic link swapped in by
    another user is never followed.
    """
    if os.path.isdir(parent):
        return
    grand = os.path.dirname(parent)
    if grand and not os.path.isdir(grand):
        os.makedirs(grand, exist_ok=True)
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        return
    shown = os.fsdecode(parent)
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AfunixError(
            errno.EEXIST,
            f"cannot create the directory {shown!r}: it was replaced right after mkdir() "
            "(another user can write to the directory above it); its mode was not set",
            shown,
        ) from exc
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise AfunixError(
                errno.EEXIST,
                f"cannot create the directory {shown!r}: it was replaced by another user's "
                "directory right after mkdir(); its mode was not set",
                shown,
            )
        os.fchmod(fd, parent_mode)  # mkdir's mode is masked by the umask
    finally:
        os.close(fd)


def bind_address(
    sock: socket.socket,
    address: Address,
    *,
    mode: int | None = None,
    owner: str | int | None = None,
    group: str | int | None = None,
    parent_mode: int | None = None,
    backlog: int | None = None,
    lock: bool = True,
) -> BoundPath | None:
    """Bind *sock* to *address* safely; return the :class:`BoundPath` to release.

    ``parent_mode``: create the missing parent directory with this mode.
    ``backlog``: also ``listen()``, inside the same lock as the stale check
    and the bind, so that no other afunix starter can take the path between
    them. ``lock=False`` skips the lock file (for a directory nobody else
    can write, such as a fresh private one). Returns ``None`` for abstract,
    unnamed and TCP addresses, which leave no file behind.
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
        if backlog is not None:
            sock.listen(backlog)
        return None

    path = address.raw
    shown = os.fsdecode(path)
    if parent_mode is not None:
        _make_parent(os.path.dirname(path), parent_mode)
    uid, gid = resolve_ids(owner, group)
    with _path_lock(path, shown) if lock else contextlib.nullcontext():
        _clear_path(path)
        try:
            if mode is None and uid == -1 and gid == -1:
                sock.bind(path)
            else:
                _bind_restricted(sock, path, mode, uid, gid)
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
            hint = _BIND_HINTS.get(err, strerror(err))
            raise AfunixError(err, f"cannot bind {shown!r}: {hint}", shown) from exc
        st = os.lstat(path)
        bound = BoundPath(path, st.st_dev, st.st_ino)
        if backlog is not None:
            try:
                sock.listen(backlog)
            except BaseException:
                bound.release()
                raise
    return bound
