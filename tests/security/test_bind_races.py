"""Safe bind attacked: concurrent starters, early clients, swapped symlinks, other users.

Issue 15, items 8-11 and 14. The races run as counted loops and say their
counts; peers of another user run as uid 65534 (conftest.NOBODY); the
starters are processes, not threads (``flock`` belongs to an open file
description, so threads of one process would not exclude each other).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import afunix
from tests.conftest import NOBODY, serving

ROUNDS = 1000
STARTERS = 4
SWAPS = 10_000
LOCK_SUFFIX = (
    b".lock"  # afunix._bind.LOCK_SUFFIX (spelt out: the tests also run on code without it)
)


def _stale(path: Path) -> None:
    """Leave a stale socket file at *path* (bound, then closed: nobody listens)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("a worker process ended early")
        data += chunk
    return data


@contextmanager
def _workers(n: int, body: Callable[[int, int], None]) -> Iterator[list[tuple[int, int]]]:
    """Fork *n* processes running ``body(cmd_fd, result_fd)``; yield their (cmd, result) ends.

    Each worker reads commands from its own pipe and writes results to
    another; it ends when its command pipe closes.
    """
    ends: list[tuple[int, int]] = []
    pids: list[int] = []
    try:
        for _ in range(n):
            cmd_r, cmd_w = os.pipe()
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    os.close(cmd_w)
                    os.close(res_r)
                    for other_cmd, other_res in ends:
                        os.close(other_cmd)
                        os.close(other_res)
                    body(cmd_r, res_w)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
            os.close(cmd_r)
            os.close(res_w)
            ends.append((cmd_w, res_r))
        yield ends
    finally:
        for cmd_w, res_r in ends:
            os.close(cmd_w)
            os.close(res_r)
        for pid in pids:
            os.waitpid(pid, 0)


_RECORD = struct.Struct("=cQQ")


def _starter(path: Path) -> Callable[[int, int], None]:
    """A worker that, per round, tries to start a server on *path* and reports."""

    def body(cmd: int, res: int) -> None:
        while os.read(cmd, 1) == b"g":
            try:
                sock = afunix.listen(path)
            except afunix.AddressInUse:
                os.write(res, _RECORD.pack(b"L", 0, 0))
                sock = None
            except OSError as exc:
                os.write(res, _RECORD.pack(b"E", exc.errno or 0, 0))
                sock = None
            else:
                bound = sock.bound_path
                assert bound is not None
                os.write(res, _RECORD.pack(b"W", bound.dev, bound.ino))
            if os.read(cmd, 1) != b"c":
                return
            if sock is not None:
                sock.close()
            os.write(res, b"d")

    return body


@pytest.mark.timeout(600)
def test_four_concurrent_starters_on_a_stale_path_exactly_one_wins(sockdir: Path) -> None:
    """1,000 rounds of 4 processes starting a server on one stale path at once."""
    path = sockdir / "race.sock"
    wins: dict[int, int] = {}
    errors: list[int] = []
    not_serving = 0
    with _workers(STARTERS, _starter(path)) as ends:
        for _ in range(ROUNDS):
            _stale(path)
            for cmd, _ in ends:
                os.write(cmd, b"g")
            records = [_RECORD.unpack(_read_exact(res, _RECORD.size)) for _, res in ends]
            winners = [(dev, ino) for kind, dev, ino in records if kind == b"W"]
            errors += [dev for kind, dev, _ in records if kind == b"E"]
            wins[len(winners)] = wins.get(len(winners), 0) + 1
            if len(winners) == 1:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) != winners[0]:
                    not_serving += 1
                else:
                    afunix.connect(path, timeout=5).close()  # it listens at the path
            for cmd, _ in ends:
                os.write(cmd, b"c")
            for _, res in ends:
                assert _read_exact(res, 1) == b"d"
            if path.exists():  # a winner left serving a deleted path leaves this behind
                path.unlink()
    print(f"\n{ROUNDS} rounds of {STARTERS} starters: winners per round {sorted(wins.items())}")
    assert errors == [], f"starters failed with errnos {sorted(set(errors))}"
    assert wins == {1: ROUNDS}, f"rounds by number of winners: {wins}"
    assert not_serving == 0
    assert not os.path.lexists(bytes(path) + LOCK_SUFFIX)  # no lock file left behind


def _server_on_command(path: Path) -> Callable[[int, int], None]:
    def body(cmd: int, res: int) -> None:
        while os.read(cmd, 1) == b"g":
            with afunix.listen(path):
                os.write(res, b"u")
                if os.read(cmd, 1) != b"c":
                    return
            os.write(res, b"d")

    return body


@pytest.mark.timeout(600)
def test_a_client_connecting_as_the_file_appears_is_never_told_stale(sockdir: Path) -> None:
    """1,000 server starts, each met by a client hammering connect() until it gets in."""
    path = sockdir / "early.sock"
    stale = connected = missing = 0
    with _workers(1, _server_on_command(path)) as [(cmd, res)]:
        for _ in range(ROUNDS):
            os.write(cmd, b"g")
            deadline = time.monotonic() + 30
            while True:  # no sleep: connect the instant bind() made the file
                assert time.monotonic() < deadline, "the server never started"
                try:
                    afunix.connect(path).close()
                    connected += 1
                    break
                except afunix.NoSuchSocket:
                    missing += 1  # not bound yet: fine
                except afunix.NothingListening:
                    stale += 1
            assert _read_exact(res, 1) == b"u"
            os.write(cmd, b"c")
            assert _read_exact(res, 1) == b"d"
    print(
        f"\n{ROUNDS} starts: {connected} connected, {stale} told 'stale' "
        f"({missing} attempts before the file existed)"
    )
    assert stale == 0
    assert connected == ROUNDS


def test_a_socket_that_never_listens_is_reported_as_such(sockdir: Path) -> None:
    """Waiting for a starting server is bounded: the error says what is there."""
    path = sockdir / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        t0 = time.monotonic()
        with pytest.raises(afunix.NothingListening, match="has not called listen") as info:
            afunix.connect(path, timeout=0.3)
        assert info.value.errno == errno.ECONNREFUSED
        assert time.monotonic() - t0 < 5
        with pytest.raises(afunix.AddressInUse, match="about to listen"):
            afunix.listen(path)  # and a starter leaves it alone
    assert path.exists()


ATTACKER = textwrap.dedent(
    """
    import os, sys
    d, file_target, dir_target = sys.argv[1], sys.argv[2], sys.argv[3]
    cmd, res = int(sys.argv[4]), int(sys.argv[5])
    sock, parent = os.path.join(d, "s.sock"), os.path.join(d, "p")
    swaps = {"file": 0, "dir": 0}
    n = 0

    def swap():
        global n
        hits = 0
        for name, target, kind in ((sock, file_target, "file"), (parent, dir_target, "dir")):
            try:
                os.lstat(name)
            except FileNotFoundError:
                continue
            if os.path.islink(name):
                continue
            n += 1
            link = os.path.join(d, f".l{n}")
            os.symlink(target, link)
            try:
                if kind == "dir":
                    os.rename(name, os.path.join(d, f".old{n}"))  # root's new directory
                os.rename(link, name)  # atomically replaces root's socket file
                swaps[kind] += 1
                hits += 1
            except OSError:
                os.unlink(link)
        return hits

    while os.read(cmd, 1) == b"g":  # a round: root is about to bind (several times)
        os.set_blocking(cmd, False)
        os.write(res, b"r")  # spinning from now on
        hits = 0
        while True:
            hits += swap()
            os.sched_yield()  # a spinning attacker must not starve root (or a second suite)
            try:
                if os.read(cmd, 1) == b"d":  # root's round is over
                    break
            except BlockingIOError:
                pass
        os.set_blocking(cmd, True)
        os.write(res, bytes([min(hits, 255)]))  # the swaps of this round
    print(swaps["file"], swaps["dir"], flush=True)
    """
)


@pytest.mark.timeout(600)
def test_modes_never_follow_a_symlink_swapped_in_by_another_user(sockdir: Path) -> None:
    """uid 65534 swaps symlinks in 10,000 times while root binds with mode=/parent_mode=.

    The two run in lockstep: each round, root binds (four times, each mode
    twice) only once the attacker says it is spinning, and waits for it to
    stop before the next round, so a loaded machine slows the race down but
    never starves the attacker (a free-running attacker, descheduled, saw 1
    bind in 45).
    """
    shared = sockdir / "shared"
    shared.mkdir()
    os.chown(shared, 65534, 65534)  # a directory the attacker can write (not sticky)
    secret = sockdir / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    private = sockdir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    sock, parent = shared / "s.sock", shared / "p"
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        attacker = subprocess.Popen(
            [*NOBODY, sys.executable, "-c", ATTACKER]
            + [str(x) for x in (shared, secret, private, cmd_r, res_w)],
            stdout=subprocess.PIPE,
            pass_fds=(cmd_r, res_w),
        )
    finally:
        os.close(cmd_r)
        os.close(res_w)
    changed = binds = refused = rounds = seen = 0
    old_umask = os.umask(0o077)  # so mode=0o666 must widen what bind() created
    deadline = time.monotonic() + 450
    plan = [(sock, {"mode": 0o666}), (parent / "s.sock", {"parent_mode": 0o777})] * 2
    try:
        while seen < SWAPS and time.monotonic() < deadline:
            rounds += 1
            for leftover in (sock, parent):  # root clears the attacker's symlinks
                if leftover.is_symlink():
                    leftover.unlink()  # the attacker is idle between rounds
            os.write(cmd_w, b"g")
            assert _read_exact(res_r, 1) == b"r"
            for where, kwargs in plan:
                for leftover in (sock, parent):
                    if leftover.is_symlink():
                        with contextlib.suppress(OSError):  # the attacker races this too
                            leftover.unlink()
                try:
                    afunix.listen(where, **kwargs).close()  # type: ignore[arg-type]
                    binds += 1
                except OSError:
                    refused += 1
                with contextlib.suppress(OSError):
                    parent.rmdir()  # never follows a symlink (ENOTDIR)
            os.write(cmd_w, b"d")
            seen += _read_exact(res_r, 1)[0]
            if stat.S_IMODE(secret.stat().st_mode) != 0o600:
                changed += 1
                secret.chmod(0o600)
            if stat.S_IMODE(private.stat().st_mode) != 0o700:
                changed += 1
                private.chmod(0o700)
        os.close(cmd_w)
        cmd_w = -1
        out, _ = attacker.communicate(timeout=30)
    finally:
        os.umask(old_umask)
        if cmd_w >= 0:
            os.close(cmd_w)
        os.close(res_r)
        if attacker.poll() is None:
            attacker.kill()
            attacker.communicate()
    file_swaps, dir_swaps = map(int, out.split())
    print(
        f"\n{file_swaps + dir_swaps} swaps ({file_swaps} socket files, {dir_swaps} directories);"
        f" root: {rounds} rounds of 4 binds, {binds} binds, {refused} refused;"
        f" modes changed on the targets: {changed}"
    )
    assert file_swaps + dir_swaps >= SWAPS
    assert changed == 0
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_ownership_never_widens_the_mode_library(sockdir: Path) -> None:
    path = sockdir / "own.sock"
    old = os.umask(0o077)
    try:
        for kwargs in ({"group": 65534}, {"owner": 65534}, {"owner": 0, "group": "nogroup"}):
            with afunix.listen(path, **kwargs):  # type: ignore[arg-type]
                st = os.lstat(path)
                assert stat.S_IMODE(st.st_mode) == 0o700, (kwargs, oct(st.st_mode))
            with afunix.listen(path, mode=0o660, **kwargs):  # type: ignore[arg-type]
                assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660  # mode= still wins
    finally:
        os.umask(old)


@pytest.mark.parametrize("opts", [["--group", "nogroup"], ["--owner", "65534"]])
def test_ownership_never_widens_the_mode_cli(sockdir: Path, opts: list[str]) -> None:
    path = sockdir / "own.sock"
    old = os.umask(0o077)
    try:
        with serving(sockdir, str(path), *opts):
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    finally:
        os.umask(old)


def test_a_denied_liveness_check_says_permission_denied(sockdir: Path) -> None:
    """As nobody, over root's stale socket in a sticky directory: EACCES, not 'listening'."""
    sticky = sockdir / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = sticky / "root.sock"
    old = os.umask(0o022)
    try:
        _stale(path)  # root's, mode 0755: nobody may not connect to it
    finally:
        os.umask(old)
    probe = textwrap.dedent(
        """
        import sys, afunix
        try:
            afunix.listen(sys.argv[1])
        except OSError as exc:
            print(exc.errno, type(exc).__name__, exc)
        """
    )
    out = subprocess.run(
        [*NOBODY, sys.executable, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    err, _, message = out.partition(" ")
    assert int(err) == errno.EACCES, out
    assert "permission denied" in message
    assert str(path) in message
    assert "listening there" not in message
    assert path.exists()  # root's file untouched
    assert not os.path.lexists(bytes(path) + LOCK_SUFFIX)


def test_a_forked_child_closing_the_listener_keeps_the_parents_file(sockdir: Path) -> None:
    """UNP 15.5: fork, and the child closes listenfd. The parent's path must survive."""
    path = sockdir / "fork.sock"
    with afunix.listen(path) as listener:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                listener.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert path.exists(), "the child's close() removed the parent's socket file"
        with afunix.connect(path, timeout=5):
            conn, _ = listener.accept()
            conn.close()
    assert not path.exists()  # the parent, which bound it, still removes it


def test_a_planted_lock_file_is_refused_and_never_followed(sockdir: Path) -> None:
    shared = sockdir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    path = shared / "s.sock"
    lock = Path(os.fsdecode(bytes(path) + LOCK_SUFFIX))
    target = sockdir / "target"
    target.write_bytes(b"")
    target.chmod(0o644)
    lock.symlink_to(target)
    with pytest.raises(afunix.AfunixError, match="symbolic link") as info:
        afunix.listen(path)
    assert info.value.errno == errno.EEXIST
    assert target.read_bytes() == b"" and stat.S_IMODE(target.stat().st_mode) == 0o644
    lock.unlink()
    subprocess.run([*NOBODY, "touch", str(lock)], check=True, timeout=30)
    with pytest.raises(afunix.AfunixError, match="belongs to uid 65534") as info:
        afunix.listen(path)
    assert info.value.errno == errno.EPERM
    assert not path.exists()
    lock.unlink()
    with afunix.listen(path):
        assert not lock.exists()  # removed once the socket listens


def _start_in_threads(path: Path, n: int) -> tuple[list[afunix.Socket], list[BaseException]]:
    """*n* threads call ``afunix.listen(path)`` at once; the sockets won and errors."""
    barrier = threading.Barrier(n)
    won: list[afunix.Socket] = []
    lost: list[BaseException] = []
    lock = threading.Lock()

    def start() -> None:
        barrier.wait(10)
        try:
            sock = afunix.listen(path)
        except OSError as exc:
            with lock:
                lost.append(exc)
        else:
            with lock:
                won.append(sock)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won, lost


def test_threads_of_one_process_never_both_win_a_stale_path(sockdir: Path) -> None:
    """flock locks belong to open file descriptions, not processes: four threads of one
    process that start servers on one stale path exclude each other too (300 rounds)."""
    path = sockdir / "t.sock"
    rounds, double, none = 300, 0, 0
    for _ in range(rounds):
        _stale(path)
        won, lost = _start_in_threads(path, STARTERS)
        try:
            double += len(won) > 1
            none += not won
            assert all(isinstance(e, afunix.AddressInUse) for e in lost), lost
            if len(won) == 1:  # the winner serves the path itself
                bound = won[0].bound_path
                assert bound is not None and os.stat(path).st_ino == bound.ino
        finally:
            for sock in won:
                sock.close()
    print(f"\n{rounds} rounds of {STARTERS} threads: {double} double wins, {none} without a winner")
    assert (double, none) == (0, 0)


@pytest.mark.parametrize(
    ("kind", "when"),
    [
        ("file", "before lstat"),  # bind() made the file; its check of what it made
        ("file", "before open"),  # checked; opened O_PATH|O_NOFOLLOW to chmod through
        ("file", "before chmod"),  # opened and checked: chmod through /proc/self/fd/N
        ("dir", "before open"),  # mkdir() made the parent; opened O_NOFOLLOW to fchmod
        ("dir", "before chmod"),  # opened and checked: fchmod on the descriptor
    ],
)
def test_a_symlink_swapped_in_at_each_step_of_bind_changes_nothing(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, when: str, kind: str
) -> None:
    """The race above, made certain: a symlink to a root-only target is renamed over the
    socket file (or the new directory) at the exact step where a path-following chmod
    would follow it. The target keeps its mode; bind refuses with EEXIST and says why,
    or, swapped after the checks, its mode goes to root's own inode through the
    descriptor (a chmod by path fails this test: it changes the target)."""
    target = sockdir / "target"
    if kind == "file":
        target.write_bytes(b"root only")
        name, kwargs = sockdir / "s.sock", {"mode": 0o666}
        where = name
    else:
        target.mkdir()
        name, kwargs = sockdir / "p", {"parent_mode": 0o777}
        where = name / "s.sock"
    target.chmod(0o700)
    real_lstat, real_open, real_chmod, real_fchmod = os.lstat, os.open, os.chmod, os.fchmod
    swapped: list[str] = []

    def swap(path: object) -> None:
        if swapped or os.fsencode(path) != os.fsencode(name):  # type: ignore[arg-type]
            return
        try:  # only once root made it (not at the checks before bind or mkdir)
            made = real_lstat(name).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(made) or stat.S_ISDIR(made):
            link = sockdir / ".link"
            link.symlink_to(target)
            if kind == "dir":
                os.rename(name, sockdir / ".old")  # root's new directory, moved away
            os.rename(link, name)
            swapped.append(when)

    def lstat(path: object, *args: object, **kw: object) -> os.stat_result:
        if when == "before lstat":
            swap(path)
        return real_lstat(path, *args, **kw)  # type: ignore[arg-type]

    def open_(path: object, *args: object, **kw: object) -> int:
        if when == "before open":
            swap(path)
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    def chmod(path: object, *args: object, **kw: object) -> None:
        if when == "before chmod":
            swap(name)
        real_chmod(path, *args, **kw)  # type: ignore[arg-type]

    def fchmod(fd: int, mode: int) -> None:
        if when == "before chmod":
            swap(name)
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "fchmod", fchmod)
    old_umask = os.umask(0o077)
    error: OSError | None = None
    try:
        afunix.listen(where, **kwargs).close()  # type: ignore[arg-type]
    except OSError as exc:
        error = exc
    finally:
        os.umask(old_umask)
        monkeypatch.undo()
    assert swapped == [when], "the swap did not happen (the step was not reached)"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert os.path.islink(name)  # (and close() removed nothing of the attacker's)
    if when == "before chmod":
        assert error is None  # past the checks: the mode went to root's own inode
    else:
        assert error is not None and error.errno == errno.EEXIST, error
        assert "replaced" in str(error)
