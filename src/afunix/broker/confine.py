"""Open a file beneath a root directory, race-free, and prove it stayed there.

Every open the broker makes goes through :func:`open_beneath`:

1. The rule's root is opened once, when the policy is loaded
   (:class:`HeldRoots`, :func:`open_root`): one component at a time from
   ``/``, each with ``O_PATH | O_NOFOLLOW`` and checked to be a directory,
   so that no symlink is ever followed on the way to a root. Everything else
   is resolved *relative to that held descriptor*, never by path from ``/``:
   replacing a root (or a directory above it) by a symlink afterwards
   changes nothing for the broker, which keeps using the directory it
   opened.
2. The requested name is looked up with ``O_PATH`` (no side effects, even on
   a device or a FIFO) by a :class:`Resolver` that cannot leave the root:

   * :class:`Openat2Resolver`, Linux 5.6+: ``openat2(2)`` with
     ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` (and ``RESOLVE_NO_SYMLINKS``
     when the rule asks). The kernel refuses ``..`` above the root, absolute
     symlinks and symlinks pointing out (``EXDEV``), and ``/proc`` magic
     links such as ``/proc/self/root`` or ``/proc/PID/fd/N`` (``ELOOP``),
     atomically with the lookup: there is no window for a symlink swap.
   * :class:`WalkResolver`, where ``openat2`` is missing (``ENOSYS``, or a
     seccomp filter answering ``EPERM``): one component at a time, each
     opened with ``O_PATH | O_NOFOLLOW`` relative to the previous
     directory's descriptor and checked with ``fstat``. Symlinks are read
     (``readlinkat``) and resolved *as text* by this code, never by the
     kernel: an absolute target or a ``..`` above the root is ``EXDEV``, and
     a magic link's text (``/etc/shadow``, ``pipe:[12]``) can never jump
     anywhere. ``..`` goes back to the directory descriptor we came from.

   One of the two is chosen once, at import (:data:`RESOLVER`).
3. The ``O_PATH`` descriptor's type is checked (regular file, or directory
   for a listing; FIFOs, devices and sockets are refused *before* they are
   ever opened), then it is re-opened with the real flags through
   ``/proc/self/fd/N``, which reaches that very inode: no second lookup.
   Creation uses ``O_CREAT | O_EXCL`` through the resolver, so the broker
   always knows whether it created the file (and then sets its mode exactly).
4. :func:`verify_beneath`: the descriptor to be sent is checked with
   ``fstat``: its path (``/proc/self/fd/N``) must lie beneath the root's, and
   resolving that path beneath the root again, without following any
   symlink, must reach the same device and inode. A file moved out of the
   root between the open and the check fails this test and is not sent.

Requires Linux with ``/proc`` mounted (:func:`check_environment`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from .. import UnsupportedFeature
from . import flags as _flags

__all__ = [
    "RESOLVER",
    "RESOLVE_BENEATH",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "ConfinementError",
    "HeldRoots",
    "Openat2Resolver",
    "Opened",
    "Resolver",
    "RootError",
    "WalkResolver",
    "check_environment",
    "open_beneath",
    "open_root",
    "openat2",
    "verify_beneath",
]

#: ``struct open_how.resolve`` bits (``<linux/openat2.h>``).
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
#: ``openat2`` is syscall 437 on every architecture that has it (the unified table).
SYS_OPENAT2: Final = 437
AT_FDCWD: Final = -100
#: Linux follows at most 40 symlinks in one lookup (``MAXSYMLINKS``).
MAX_SYMLINKS: Final = 40
_O_PATH: Final = getattr(os, "O_PATH", 0)


class ConfinementError(OSError):
    """The open would leave the root, or could not be proven to stay beneath it.

    ``errno`` is what the client is told: ``EACCES``, or ``ELOOP`` for a
    refused symlink or magic link (as ``open`` with ``O_NOFOLLOW`` says);
    ``kernel_errno`` is what the resolver said (``EXDEV`` for an escape).
    """

    def __init__(
        self, reason: str, kernel_errno: int | None = None, err: int = errno.EACCES
    ) -> None:
        super().__init__(err, reason)
        self.kernel_errno = kernel_errno


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def _load_syscall() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):  # pragma: no cover - no libc syscall()
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """``openat2(2)``: a new descriptor, or ``OSError`` with the kernel's errno.

    ``EINTR`` is retried; ``EAGAIN`` (a concurrent rename while resolving
    ``..`` beneath the root) is retried a few times.
    """
    if _syscall is None:  # pragma: no cover
        raise OSError(errno.ENOSYS, "no syscall() in libc")
    how = _OpenHow(flags, mode, resolve)
    for _ in range(16):
        res = _syscall(  # type: ignore[operator]
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if res >= 0:
            return int(res)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    raise OSError(errno.EAGAIN, "openat2 kept racing with renames", os.fsdecode(path))


class Resolver(Protocol):
    """Opens *rel* beneath the directory *root_fd* without leaving it."""

    name: str

    def open(self, root_fd: int, rel: bytes, flags: int, mode: int, no_symlinks: bool) -> int:
        """A descriptor for *rel*; ``EXDEV`` if resolution would leave the root."""
        ...


class Openat2Resolver:
    """``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` (Linux 5.6+)."""

    name = "openat2"

    def open(self, root_fd: int, rel: bytes, flags: int, mode: int, no_symlinks: bool) -> int:
        resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
        if no_symlinks:
            resolve |= RESOLVE_NO_SYMLINKS
        creating = flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0))
        return openat2(root_fd, rel, flags | os.O_CLOEXEC, mode if creating else 0, resolve)


class WalkResolver:
    """Component by component with ``O_NOFOLLOW`` and ``fstat``: the fallback without openat2."""

    name = "walk"

    def open(self, root_fd: int, rel: bytes, flags: int, mode: int, no_symlinks: bool) -> int:
        todo: deque[bytes] = deque(rel.split(b"/"))
        stack: list[int] = []  # directory descriptors beneath root_fd, owned
        links = 0

        def here() -> int:
            return stack[-1] if stack else root_fd

        def follow(link_fd: int) -> None:
            nonlocal links
            try:
                target = os.readlink(b"", dir_fd=link_fd)
            finally:
                os.close(link_fd)
            if no_symlinks:
                raise OSError(errno.ELOOP, "symlinks are refused beneath this root")
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if target.startswith(b"/"):
                raise OSError(errno.EXDEV, "an absolute symlink leads out of the root")
            todo.extendleft(reversed(target.split(b"/")))

        try:
            while True:
                while todo and todo[0] in (b"", b"."):
                    todo.popleft()
                if not todo:
                    # The path ended on the directory we stand in ("." or "x/..").
                    return os.open(b".", flags | os.O_CLOEXEC, mode, dir_fd=here())
                name = todo.popleft()
                if name == b"..":
                    if not stack:
                        raise OSError(errno.EXDEV, "'..' leads out of the root")
                    os.close(stack.pop())
                    continue
                last = all(c in (b"", b".") for c in todo)
                if not last:
                    fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here())
                    st = os.fstat(fd)
                    if stat.S_ISLNK(st.st_mode):
                        follow(fd)
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append(fd)
                    else:
                        os.close(fd)
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                    continue
                todo.clear()
                caller_nofollow = bool(flags & os.O_NOFOLLOW)
                try:
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=here())
                except OSError as exc:
                    if exc.errno != errno.ELOOP or caller_nofollow:
                        raise
                    # The last component is a symlink: read it and go on as text.
                    fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here())
                    if not stat.S_ISLNK(os.fstat(fd).st_mode):  # swapped meanwhile: look again
                        os.close(fd)
                        todo.append(name)
                        links += 1
                        if links > MAX_SYMLINKS:
                            raise
                        continue
                    follow(fd)
                    continue
                if flags & _O_PATH and not caller_nofollow and stat.S_ISLNK(os.fstat(fd).st_mode):
                    follow(fd)  # O_PATH|O_NOFOLLOW opened the link itself
                    continue
                return fd
        finally:
            for fd in stack:
                os.close(fd)


def _probe_openat2() -> bool:
    try:
        fd = openat2(AT_FDCWD, b"/", _O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
    except OSError as exc:
        # ENOSYS: kernel < 5.6. EPERM: a container's seccomp filter that
        # predates openat2 answers EPERM for syscalls it does not know.
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            return False
        raise  # pragma: no cover
    os.close(fd)
    return True


def pick_resolver(probe: object = None) -> Resolver:
    """The best resolver this kernel offers (*probe* replaces the openat2 test, for tests)."""
    works = probe() if callable(probe) else (_syscall is not None and _probe_openat2())
    return Openat2Resolver() if works else WalkResolver()


#: The resolver used by default, chosen once.
RESOLVER: Resolver = pick_resolver()


def check_environment() -> None:
    """Raise :class:`afunix.UnsupportedFeature` if the broker cannot confine opens here."""
    if not _O_PATH or not os.path.isdir("/proc/self/fd"):
        raise UnsupportedFeature(
            "the descriptor broker needs Linux with /proc mounted (O_PATH and "
            "/proc/self/fd are how it re-opens and checks every descriptor)"
        )


def open_root(root: str | bytes) -> int:
    """An ``O_PATH`` descriptor of the directory *root*, reached without following any symlink.

    *root* must be absolute. Each component is opened with ``O_PATH |
    O_NOFOLLOW`` relative to the one before and checked with ``fstat``: a
    symlink anywhere on the way (``/var/run`` -> ``/run`` included) raises
    :class:`ConfinementError` (``ELOOP``) naming it, something that is not a
    directory raises ``ENOTDIR``, a missing one ``ENOENT``. ``..`` is refused.
    This is how a broker opens each rule's root, once per policy load: a
    symlink planted later in place of a root, or of a directory above it,
    cannot redirect it.
    """
    path = os.fsencode(root)
    if not path.startswith(b"/"):
        raise ConfinementError(
            f"root {os.fsdecode(path)!r} is not an absolute path", None, errno.EINVAL
        )
    fd = os.open(b"/", _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = b""
    try:
        for name in (c for c in path.split(b"/") if c not in (b"", b".")):
            if name == b"..":
                raise ConfinementError(
                    f"root {os.fsdecode(path)!r} contains '..'", None, errno.EINVAL
                )
            walked += b"/" + name
            nxt = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(b"", dir_fd=fd)
                raise ConfinementError(
                    f"{os.fsdecode(walked)!r} is a symlink (to {os.fsdecode(target)!r}); a root is "
                    "opened without following symlinks: name the real directory",
                    errno.ELOOP,
                    errno.ELOOP,
                )
            if not stat.S_ISDIR(st.st_mode):
                raise ConfinementError(
                    f"{os.fsdecode(walked)!r} is not a directory", errno.ENOTDIR, errno.ENOTDIR
                )
        return fd
    except BaseException:
        os.close(fd)
        raise


class HeldRoots:
    """The rules' roots, each opened once by :func:`open_root` and held until retired.

    A broker holds one set per loaded policy and confines every open beneath
    these descriptors. Requests take the set with :meth:`acquire` and give it
    back with :meth:`release`; a reload retires the old set (:meth:`retire`),
    whose descriptors are closed when its last request is done (never while one
    still resolves beneath them: a closed number could be reused by another
    open, and a lookup relative to *that* would not be confined at all).
    """

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, roots: Iterable[tuple[str, int]]) -> HeldRoots:
        """Open each ``(root, line)``; on failure close what was opened and raise
        :class:`RootError` (with the line of the first root that failed)."""
        fds: dict[str, int] = {}
        try:
            for root, line in roots:
                if root in fds:
                    continue
                try:
                    fds[root] = open_root(root)
                except OSError as exc:
                    raise RootError(root, line, exc) from None
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds)

    def fd(self, root: str) -> int:
        """The held descriptor of *root* (``KeyError`` if this set does not hold it)."""
        return self._fds[root]

    def __len__(self) -> int:
        return len(self._fds)

    def acquire(self) -> None:
        """Mark one more user; the descriptors stay open until every user has released."""
        with self._lock:
            if self._retired:
                raise ConfinementError("these roots were retired by a reload", None, errno.EBADF)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._retired and self._users == 0:
                self._close()

    def retire(self) -> None:
        """No new users after this; close now if unused, else when the last one releases."""
        with self._lock:
            self._retired = True
            if self._users == 0:
                self._close()

    def _close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class RootError(OSError):
    """A rule's root could not be opened safely (:func:`open_root`); ``line`` is the rule's."""

    def __init__(self, root: str, line: int | None, exc: OSError) -> None:
        why = exc.strerror or os.strerror(exc.errno or errno.EIO)
        super().__init__(exc.errno or errno.EIO, f"root {root!r} cannot be opened safely: {why}")
        self.root = root
        self.line = line
        self.reason = self.strerror or why


@dataclass
class Opened:
    """A descriptor opened beneath a root, checked, ready to send (the caller owns ``fd``)."""

    fd: int
    created: bool
    dev: int
    ino: int
    #: The file's path as the broker sees it (``/proc/self/fd``), for the audit log.
    path: bytes
    resolver: str


def _fd_path(fd: int) -> bytes:
    return os.readlink(b"/proc/self/fd/%d" % fd)


def verify_beneath(root_fd: int, fd: int, resolver: Resolver | None = None) -> bytes:
    """Prove that *fd* is beneath the directory *root_fd*; return its path.

    Its path (``/proc/self/fd``) must be the root's or below it, and resolving
    that path beneath the root again, following no symlink at all, must reach
    the same device and inode. Raises :class:`ConfinementError` otherwise.
    """
    res = resolver or RESOLVER
    st = os.fstat(fd)
    if st.st_nlink == 0:
        raise ConfinementError("the file was removed while being opened")
    root_path = _fd_path(root_fd)
    path = _fd_path(fd)
    if path == root_path:
        rel = b"."
    else:
        prefix = root_path if root_path.endswith(b"/") else root_path + b"/"
        if not path.startswith(prefix):
            raise ConfinementError(
                f"the descriptor points outside the root ({os.fsdecode(path)!r} is not "
                f"beneath {os.fsdecode(root_path)!r})"
            )
        rel = path[len(prefix) :]
    try:
        check = res.open(root_fd, rel, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0, True)
    except OSError as exc:
        raise ConfinementError(
            f"could not find the opened file again beneath the root ({exc.strerror}); "
            "it was moved or a symlink was swapped",
            exc.errno,
        ) from None
    try:
        again = os.fstat(check)
    finally:
        os.close(check)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise ConfinementError(
            "the opened file is not the one found beneath the root (device/inode differ)"
        )
    return path


_KIND: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def _check_type(st: os.stat_result, want_dir: bool) -> None:
    mode = st.st_mode
    if want_dir:
        if not stat.S_ISDIR(mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return
    if stat.S_ISDIR(mode):
        raise OSError(
            errno.EISDIR, "is a directory (ask for a directory descriptor with DIR / O_DIRECTORY)"
        )
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "the last component is a symlink and NOFOLLOW was asked")
    if not stat.S_ISREG(mode):
        what = _KIND.get(stat.S_IFMT(mode), "a special file")
        raise ConfinementError(f"it is {what}; the broker opens only regular files and directories")


def _reopen(path_fd: int, flags: int) -> int:
    return os.open(b"/proc/self/fd/%d" % path_fd, flags & ~os.O_NOFOLLOW | os.O_CLOEXEC)


def open_beneath(
    root: str | bytes | int,
    rel: tuple[str, ...],
    wire_flags: int,
    mode: int = 0,
    *,
    no_symlinks: bool = False,
    owner: tuple[int, int] | None = None,
    resolver: Resolver | None = None,
) -> Opened:
    """Open *rel* (components, from :func:`~afunix.broker.policy.split_path`) beneath *root*.

    *root* is a directory descriptor (a held root: :class:`HeldRoots`), or a
    path, which is then opened for this call by :func:`open_root` (no symlink
    followed on the way) and closed again.
    *wire_flags* must have passed :func:`afunix.broker.flags.check`. A created
    file gets exactly *mode* (no umask) and, with *owner*, that uid and gid.
    Raises ``OSError`` with the errno ``open`` would give, or
    :class:`ConfinementError` (``EACCES``) for anything that leaves the root.
    """
    res = resolver or RESOLVER
    wire = _flags.Wire(wire_flags)
    kflags = _flags.kernel_flags(wire_flags)
    want_dir = bool(wire & _flags.Wire.DIR)
    relb = "/".join(rel).encode() or b"."
    lookup = _O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if wire & _flags.Wire.NOFOLLOW else 0)
    root_fd = root if isinstance(root, int) else open_root(root)
    fd = -1
    try:
        created = False
        absent = False  # the lookup found nothing: create it, with O_EXCL
        for _ in range(8):
            if wire & _flags.Wire.CREATE and (wire & _flags.Wire.EXCL or absent):
                try:
                    fd = _resolve(
                        res, root_fd, relb, kflags | os.O_CREAT | os.O_EXCL, mode, nosym=no_symlinks
                    )
                except FileExistsError:
                    if wire & _flags.Wire.EXCL:
                        raise
                    absent = False  # created by someone else meanwhile: open it as it is
                    continue
                created = True
                break
            try:
                path_fd = _resolve(res, root_fd, relb, lookup, 0, nosym=no_symlinks)
            except FileNotFoundError:
                if not wire & _flags.Wire.CREATE:
                    raise
                if _is_dangling_link(res, root_fd, relb, no_symlinks):
                    raise ConfinementError(
                        "the name is a dangling symlink; the broker never creates a file "
                        "through a symlink"
                    ) from None
                absent = True
                continue
            try:
                _check_type(os.fstat(path_fd), want_dir)
                fd = _reopen(path_fd, kflags)
            finally:
                os.close(path_fd)
            break
        else:
            raise OSError(errno.EAGAIN, "the file kept appearing and disappearing; try again")
        st = os.fstat(fd)
        if created:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
        else:
            _check_type(st, want_dir)
        path = verify_beneath(root_fd, fd, res)
        return Opened(fd, created, st.st_dev, st.st_ino, path, res.name)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        if not isinstance(root, int):
            os.close(root_fd)


def _resolve(res: Resolver, root_fd: int, rel: bytes, flags: int, mode: int, *, nosym: bool) -> int:
    try:
        return res.open(root_fd, rel, flags, mode, nosym)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ConfinementError(
                "the path leads out of the root (through '..', an absolute symlink or a "
                "symlink pointing outside)",
                errno.EXDEV,
            ) from None
        if exc.errno == errno.ELOOP:
            why = (
                "a symlink is in the path and this rule refuses symlinks (no_symlinks)"
                if nosym
                else "a /proc magic link (such as /proc/self/root or /proc/PID/fd/N), or "
                "a symlink loop, is in the path"
            )
            raise ConfinementError(why, errno.ELOOP, errno.ELOOP) from None
        raise


def _is_dangling_link(res: Resolver, root_fd: int, rel: bytes, nosym: bool) -> bool:
    try:
        fd = res.open(root_fd, rel, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0, nosym)
    except OSError:
        return False
    try:
        return stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
