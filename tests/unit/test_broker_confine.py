"""Opening beneath a root: both resolvers (openat2 and the walk fallback) on the real kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from afunix.broker import confine
from afunix.broker.confine import ConfinementError, open_beneath, verify_beneath
from afunix.broker.flags import Wire

RESOLVERS = [confine.Openat2Resolver(), confine.WalkResolver()]
R = int(Wire.READ)
W = int(Wire.WRITE)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "d").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text("outside")
    (r / "f.txt").write_text("f")
    (r / "d" / "g.txt").write_text("g")
    os.symlink("d", r / "rel_in")
    os.symlink("../outside", r / "rel_out")
    os.symlink("/etc", r / "abs")
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    os.symlink("nothere", r / "dangling")
    os.symlink("d/..", r / "dotdot_in")
    os.symlink("../..", r / "d" / "up")
    os.symlink("rel_in/g.txt", r / "chain")
    os.mkfifo(r / "fifo")
    return r


# (rel, wire flags, no_symlinks, expected: "ok" or an errno)
CASES = [
    ("f.txt", R, False, "ok"),
    ("d/g.txt", R, False, "ok"),
    ("rel_in/g.txt", R, False, "ok"),
    ("chain", R, False, "ok"),
    ("dotdot_in/f.txt", R, False, "ok"),
    ("rel_in/g.txt", R, True, errno.ELOOP),
    ("chain", R, True, errno.ELOOP),
    ("rel_out/x", R, False, errno.EACCES),
    ("abs/passwd", R, False, errno.EACCES),
    ("d/up/outside/x", R, False, errno.EACCES),
    ("loop1", R, False, errno.ELOOP),
    ("nothere", R, False, errno.ENOENT),
    ("d/nothere/x", R, False, errno.ENOENT),
    ("f.txt/x", R, False, errno.ENOTDIR),
    ("dangling", R | W | Wire.CREATE, False, errno.EACCES),
    ("fifo", R, False, errno.EACCES),
    ("fifo", W, False, errno.EACCES),
    ("d", R, False, errno.EISDIR),
    ("d", R | Wire.DIR, False, "ok"),
    ("", R | Wire.DIR, False, "ok"),
    ("rel_in", R | Wire.DIR, False, "ok"),
    ("rel_in", R | Wire.DIR | Wire.NOFOLLOW, False, errno.ENOTDIR),  # as open(2) says
    ("f.txt", R | Wire.DIR, False, errno.ENOTDIR),
    ("f.txt", R | Wire.NOFOLLOW, False, "ok"),
    ("chain", R | Wire.NOFOLLOW, False, errno.ELOOP),
    ("f.txt", W | Wire.CREATE | Wire.EXCL, False, errno.EEXIST),
]


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
@pytest.mark.parametrize(("rel", "wire", "nosym", "want"), CASES)
def test_open_beneath(
    root: Path, resolver: confine.Resolver, rel: str, wire: int, nosym: bool, want: object
) -> None:
    comps = tuple(c for c in rel.split("/") if c)
    if want == "ok":
        opened = open_beneath(str(root), comps, wire, no_symlinks=nosym, resolver=resolver)
        try:
            path = os.readlink(f"/proc/self/fd/{opened.fd}")
            assert path.startswith(str(root))
            assert opened.resolver == resolver.name and not opened.created
        finally:
            os.close(opened.fd)
        return
    with pytest.raises(OSError) as info:
        open_beneath(str(root), comps, wire, no_symlinks=nosym, resolver=resolver)
    assert info.value.errno == want, info.value


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
def test_create_sets_the_exact_mode_and_owner(root: Path, resolver: confine.Resolver) -> None:
    old = os.umask(0o077)  # a restrictive umask must not narrow the rule's mode ...
    try:
        opened = open_beneath(
            str(root),
            ("d", "new.txt"),
            W | Wire.CREATE | Wire.EXCL,
            0o664,
            owner=(65534, 65534),
            resolver=resolver,
        )
    finally:
        os.umask(old)
    try:
        assert opened.created
        st = os.fstat(opened.fd)
        assert stat.S_IMODE(st.st_mode) == 0o664
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    finally:
        os.close(opened.fd)
    # Without EXCL an existing file is opened as it is, never re-created or chmod'ed.
    again = open_beneath(str(root), ("d", "new.txt"), W | Wire.CREATE, 0o600, resolver=resolver)
    try:
        assert not again.created
        assert stat.S_IMODE(os.fstat(again.fd).st_mode) == 0o664
    finally:
        os.close(again.fd)


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
def test_trunc_applies_after_the_checks(root: Path, resolver: confine.Resolver) -> None:
    opened = open_beneath(str(root), ("f.txt",), W | Wire.TRUNC, resolver=resolver)
    os.close(opened.fd)
    assert (root / "f.txt").read_text() == ""


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
def test_proc_magic_links_never_resolve(resolver: confine.Resolver) -> None:
    r, w = os.pipe()
    try:
        pid = str(os.getpid())
        for rel in (
            ("self", "root", "etc", "passwd"),
            (pid, "root", "etc", "passwd"),
            (pid, "cwd"),
            (pid, "fd", str(r)),
            ("self", "exe"),
        ):
            with pytest.raises(OSError) as info:
                open_beneath("/proc", rel, R, resolver=resolver)
            # openat2 says ELOOP (RESOLVE_NO_MAGICLINKS); the walk reads the link as text:
            # "/..." leads out of the root (EACCES), "pipe:[123]" is no name there (ENOENT).
            assert info.value.errno in (errno.ELOOP, errno.EACCES, errno.ENOENT), rel
        ok = open_beneath("/proc", ("self", "status"), R, resolver=resolver)
        os.close(ok.fd)
    finally:
        os.close(r)
        os.close(w)


def test_devices_are_refused_before_being_opened() -> None:
    with pytest.raises(ConfinementError, match="character device"):
        open_beneath("/dev", ("null",), R)


# ---------------------------------------------------------------- verify_beneath
def test_verify_beneath_accepts_inside_and_refuses_outside(tmp_path: Path, root: Path) -> None:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    inside = os.open(root / "d" / "g.txt", os.O_RDONLY)
    outside = os.open(tmp_path / "outside" / "x", os.O_RDONLY)
    try:
        assert verify_beneath(root_fd, inside).endswith(b"/d/g.txt")
        assert verify_beneath(root_fd, root_fd) == os.fsencode(root)
        with pytest.raises(ConfinementError, match="outside the root"):
            verify_beneath(root_fd, outside)
        # Moved out of the root after it was opened: refused.
        os.rename(root / "d" / "g.txt", tmp_path / "outside" / "g.txt")
        with pytest.raises(ConfinementError):
            verify_beneath(root_fd, inside)
        # Removed: refused.
        os.unlink(tmp_path / "outside" / "g.txt")
        with pytest.raises(ConfinementError, match="removed"):
            verify_beneath(root_fd, inside)
    finally:
        for fd in (root_fd, inside, outside):
            os.close(fd)


def test_verify_beneath_compares_device_and_inode(root: Path) -> None:
    """Same path, other file: a filesystem mounted over the directory after the open.

    ``/proc/self/fd`` still names ``root/d/g.txt``, and that name now reaches a file of
    the new mount: only the device/inode comparison tells them apart.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    fd = os.open(root / "d" / "g.txt", os.O_RDONLY)
    subprocess.run(["mount", "-t", "tmpfs", "afunix-test", str(root / "d")], check=True)
    try:
        (root / "d" / "g.txt").write_text("impostor")
        assert os.readlink(f"/proc/self/fd/{fd}") == str(root / "d" / "g.txt")
        with pytest.raises(ConfinementError, match="device/inode differ"):
            verify_beneath(root_fd, fd)
    finally:
        subprocess.run(["umount", str(root / "d")], check=True)
        os.close(fd)
        os.close(root_fd)


class _NaiveResolver:
    """A resolver that follows everything (what a careless broker would do)."""

    name = "naive"

    def open(self, root_fd: int, rel: bytes, flags: int, mode: int, no_symlinks: bool) -> int:
        base = os.readlink(f"/proc/self/fd/{root_fd}").encode()
        if flags & os.O_PATH and no_symlinks:
            return confine.Openat2Resolver().open(root_fd, rel, flags, mode, no_symlinks)
        return os.open(base + b"/" + rel, flags & ~os.O_NOFOLLOW, mode)


def test_the_fstat_check_catches_what_a_naive_resolver_lets_through(root: Path) -> None:
    """Second line of defence: even a resolver that follows a symlink out of the root
    cannot get the descriptor past verify_beneath."""
    with pytest.raises(ConfinementError, match="outside the root"):
        open_beneath(str(root), ("rel_out", "x"), R, resolver=_NaiveResolver())


# ------------------------------------------------------------------ choice
def test_openat2_is_used_on_this_kernel() -> None:
    assert isinstance(confine.RESOLVER, confine.Openat2Resolver)


def test_enosys_selects_the_walk_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without openat2 (ENOSYS), injected: the fallback is chosen, and works."""

    def no_openat2(*_args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(confine, "_syscall", no_openat2)
    with pytest.raises(OSError) as info:
        confine.openat2(confine.AT_FDCWD, b"/", os.O_PATH)
    assert info.value.errno == errno.ENOSYS
    chosen = confine.pick_resolver()
    assert isinstance(chosen, confine.WalkResolver)
    opened = open_beneath("/etc", ("hostname",), R, resolver=chosen)
    os.close(opened.fd)


def test_seccomp_eperm_also_selects_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def eperm(*_args: object) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(confine, "_syscall", eperm)
    assert isinstance(confine.pick_resolver(), confine.WalkResolver)


def test_check_environment_passes_here() -> None:
    confine.check_environment()
