"""Safe bind and listen (UNP 15.2, 15.4): what is at the path decides what happens."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import afunix
from afunix import AddressInUse, NotASocket


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file remains, nobody listens


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_bind_when_nothing_is_there(sockdir: Path, as_path: bool) -> None:
    path = sockdir / "a.sock"
    with afunix.listen(path if as_path else str(path)) as sock:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert sock.address == afunix.Address.parse(path)
    assert not path.exists()


def test_default_mode_is_0777_masked_by_umask(sockdir: Path) -> None:
    old = os.umask(0o027)
    try:
        with afunix.listen(sockdir / "m.sock"):
            assert stat.S_IMODE(os.lstat(sockdir / "m.sock").st_mode) == 0o750
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_bytes(b"precious"), "a regular file of 8 bytes"),
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: p.symlink_to("/etc/passwd"), "a symbolic link to '/etc/passwd'"),
    ],
    ids=["file", "dir", "fifo", "symlink"],
)
def test_other_files_are_refused_and_left_untouched(sockdir: Path, make, words: str) -> None:
    path = sockdir / "x.sock"
    make(path)
    before = os.lstat(path)
    with pytest.raises(NotASocket) as info:
        afunix.listen(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.errno == errno.EEXIST
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_size) == (
        before.st_ino,
        before.st_mode,
        before.st_size,
    )


def test_symlink_to_a_stale_socket_is_not_followed(sockdir: Path) -> None:
    target = sockdir / "target.sock"
    _stale_socket(target)
    link = sockdir / "link.sock"
    link.symlink_to(target)
    with pytest.raises(NotASocket, match="symbolic link"):
        afunix.listen(link)
    assert link.is_symlink() and target.exists()


def test_live_listener_is_refused_naming_the_holder(sockdir: Path) -> None:
    path = sockdir / "live.sock"
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('up', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), "holder-marker"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        with pytest.raises(AddressInUse) as info:
            afunix.listen(path)
        exc = info.value
        assert exc.errno == errno.EADDRINUSE
        assert exc.holder is not None
        assert f"pid {proc.pid}" in exc.holder and "holder-marker" in exc.holder
        assert exc.holder in str(exc)
        assert path.exists()  # never unlinked
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.parametrize("sock_type", ["stream", "dgram", "seqpacket"])
def test_live_listener_of_any_type_is_detected(sockdir: Path, sock_type: str) -> None:
    path = sockdir / "t.sock"
    with afunix.listen(path, sock_type), pytest.raises(AddressInUse):
        afunix.listen(path, "stream")


def test_live_listener_with_full_queue_is_still_live(sockdir: Path) -> None:
    path = sockdir / "q.sock"
    with afunix.listen(path, backlog=0):
        held = []
        try:
            while True:
                try:
                    held.append(afunix.connect(path, timeout=0.05))
                except afunix.ListenQueueFull:
                    break
            with pytest.raises(AddressInUse):
                afunix.listen(path)
        finally:
            for s in held:
                s.close()


def test_stale_socket_is_replaced(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    _stale_socket(path)
    witness = sockdir / "witness"
    os.link(path, witness)  # a second name for the stale inode (inode numbers get reused)
    with afunix.listen(path) as sock:
        assert os.lstat(witness).st_nlink == 1  # the stale name was removed
        assert not os.path.samefile(path, witness)
        with afunix.connect(path) as c:
            conn, _ = sock.accept()
            conn.close()
            del c


def test_second_instance_fails_and_first_keeps_serving(sockdir: Path) -> None:
    path = sockdir / "one.sock"
    with afunix.listen(path) as first:
        with pytest.raises(AddressInUse):
            afunix.listen(path)
        with afunix.connect(path):
            conn, _ = first.accept()
            conn.close()


def test_close_unlinks_only_our_inode(sockdir: Path) -> None:
    path = sockdir / "succ.sock"
    old = afunix.listen(path)
    # A successor moves in at the same path (as a restart would): ours is renamed away.
    os.rename(path, sockdir / "old.sock")
    with afunix.listen(path) as successor:
        old.close()
        assert path.exists(), "closing the old server removed the successor's socket"
        assert (sockdir / "old.sock").exists()  # not ours any more at that path either
        with afunix.connect(path):
            conn, _ = successor.accept()
            conn.close()
    assert not path.exists()


def test_mode_owner_group(sockdir: Path) -> None:
    path = sockdir / "perm.sock"
    with afunix.listen(path, mode=0o660, owner=65534, group="nogroup"):
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_uid == 65534
        assert st.st_gid == 65534


def test_unknown_owner_is_a_clear_error(sockdir: Path) -> None:
    with pytest.raises(afunix.AfunixError, match="no such user 'no-such-user-x'"):
        afunix.listen(sockdir / "o.sock", mode=0o600, owner="no-such-user-x")
    assert not (sockdir / "o.sock").exists()


def test_mode_is_never_wider_than_asked(sockdir: Path) -> None:
    """Watch the file while binding: it goes from 0000 to the mode, never wider."""
    path = sockdir / "race.sock"
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                seen.add(stat.S_IMODE(os.lstat(path).st_mode))
            except FileNotFoundError:
                pass

    old = os.umask(0)  # the book's rule alone would give 0777
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            afunix.listen(path, mode=0o600, owner=0, group=0).close()
    finally:
        stop.set()
        watcher.join()
        os.umask(old)
    assert seen, "the watcher never saw the file"
    assert all(m & ~0o600 == 0 for m in seen), f"modes seen: {sorted(map(oct, seen))}"


def test_parent_directory_is_created_with_its_mode(sockdir: Path) -> None:
    path = sockdir / "run" / "app" / "s.sock"
    with afunix.listen(path, parent_mode=0o750):
        assert stat.S_IMODE(os.stat(sockdir / "run" / "app").st_mode) == 0o750
    with pytest.raises(afunix.AfunixError, match="directory does not exist") as info:
        afunix.listen(sockdir / "missing" / "s.sock")
    assert info.value.errno == errno.ENOENT


def test_abstract_names_take_no_mode() -> None:
    with pytest.raises(afunix.AfunixError, match="credential policy") as info:
        afunix.listen(f"@afx-{os.getpid()}-mode", mode=0o600)
    assert info.value.errno == errno.EINVAL


def test_abstract_name_in_use() -> None:
    name = f"@afx-{os.getpid()}-inuse"
    with afunix.listen(name), pytest.raises(AddressInUse, match="already in use"):
        afunix.listen(name)


def test_autobind_unnamed() -> None:
    with afunix.listen("") as sock:
        assert sock.address.kind is afunix.AddressKind.ABSTRACT
        with afunix.connect(sock.address):
            conn, _ = sock.accept()
            conn.close()


def test_detach_hands_over_the_file(sockdir: Path) -> None:
    path = sockdir / "d.sock"
    sock = afunix.listen(path)
    os.close(sock.detach())
    assert path.exists()
