"""An append grant the client cannot undo: a pipe the broker drains (issue 15, item 2).

Before, ``append`` sent the file opened ``O_APPEND``; the client cleared the
flag with ``fcntl(F_SETFL, 0)``, then truncated and overwrote the file. Now a
rule that grants ``append`` without ``write`` sends the write end of a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from afunix.broker import Broker, Client, parse_policy
from tests.conftest import NOBODY
from tests.security.broker_support import BrokerProcess, Tree, tree

__all__ = ["tree"]

# As uid 65534: get an append descriptor for the drop box's file, write, then try every way
# to undo O_APPEND; print what each attempt gave.
_UNDO = textwrap.dedent(
    """
    import errno, fcntl, json, os, stat, sys
    from afunix.broker import Client
    out = {}
    with Client(sys.argv[1], timeout=10) as c:
        fd = c.open_fd(sys.argv[2], os.O_WRONLY | os.O_APPEND)
    st = os.fstat(fd)
    out["fifo"] = stat.S_ISFIFO(st.st_mode)
    os.write(fd, b"mine\\n")
    fcntl.fcntl(fd, fcntl.F_SETFL, 0)
    out["flags_after"] = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    for name, call in (("ftruncate", lambda: os.ftruncate(fd, 0)),
                       ("lseek", lambda: os.lseek(fd, 0, os.SEEK_SET)),
                       ("pwrite", lambda: os.pwrite(fd, b"OVER", 0))):
        try:
            call()
            out[name] = 0
        except OSError as e:
            out[name] = e.errno
    os.write(fd, b"EVIL")
    os.close(fd)
    print(json.dumps(out))
    """
)


def _wait(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_the_client_cannot_clear_append_truncate_or_overwrite(
    tree: Tree,
) -> None:
    """uid 65534, granted append on a root-owned 0600 file with earlier content, clears
    O_APPEND, truncates, seeks and writes: the file keeps every earlier byte and gets
    exactly what was written, at its end."""
    log = tree.rw / "log.txt"
    log.write_text("earlier line 1\nearlier line 2\n")
    os.chmod(log, 0o600)
    b = BrokerProcess(tree)
    try:
        proc = subprocess.run(
            [*NOBODY, sys.executable, "-c", _UNDO, str(tree.sock), str(log)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        )
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        want = "earlier line 1\nearlier line 2\nmine\nEVIL"
        assert _wait(lambda: log.read_text() == want), (log.read_text(), got)
        assert got == {
            "fifo": True,
            "flags_after": 0,
            "ftruncate": errno.EINVAL,
            "lseek": errno.ESPIPE,
            "pwrite": errno.ESPIPE,
        }
        assert _wait(lambda: any(r["event"] == "append-end" for r in tree.audit_lines()))
    finally:
        b.stop()
    st = os.stat(log)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    [grant] = [r for r in tree.opens() if r["decision"] == "granted"]
    assert grant["file"]["via"] == "pipe" and grant["file"]["path"] == str(log)
    assert "append through a pipe" in grant["reason"]
    [end] = [r for r in tree.audit_lines() if r["event"] == "append-end"]
    assert end["bytes"] == len("mine\nEVIL") and end["peer"]["uid"] == 65534
    assert end["file"]["path"] == str(log) and end["reason"] == "the client closed its end"


def _policy(root: Path, allow: str, extra: str = "") -> object:
    return parse_policy(
        "[limits]\nrequests_per_second = 1000000\nburst = 1000000\n" + extra + "\n"
        f'[[rule]]\nname = "box"\nroot = "{root}"\nanyone = true\nallow = {allow}\n'
    )


WRITERS = 4
LINES = 500


def test_concurrent_append_pipes_give_whole_lines_in_order(sockdir: Path) -> None:
    """4 writers, each with its own append pipe to one file, write 500 lines each of 1 to
    4096 (PIPE_BUF) bytes: the file holds exactly those 2,000 lines, none split or
    interleaved, each writer's in its order."""
    root = sockdir / "box"
    root.mkdir()
    target = root / "shared.log"
    target.write_bytes(b"")
    policy = _policy(root, '["append"]')
    sizes = [1 + (i * 977) % 4096 for i in range(LINES)]

    def line(w: int, i: int) -> bytes:
        head = b"%d:%d:" % (w, i)
        size = min(4096, max(sizes[i], len(head) + 1))
        return head + b"abcd"[w : w + 1] * (size - len(head) - 1) + b"\n"

    errors: list[BaseException] = []

    def writer(w: int, fd: int) -> None:
        try:
            for i in range(LINES):
                data = line(w, i)
                assert os.write(fd, data) == len(data)
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    with Broker(sockdir / "b.sock", policy) as broker:  # type: ignore[arg-type]
        broker.start()
        with Client(broker.address) as c:
            fds = [c.open_fd(target, os.O_WRONLY | os.O_APPEND) for _ in range(WRITERS)]
        assert all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds)
        threads = [threading.Thread(target=writer, args=(w, fd)) for w, fd in enumerate(fds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(len(line(w, i)) for w in range(WRITERS) for i in range(LINES))
        assert _wait(lambda: target.stat().st_size == total), (target.stat().st_size, total)
    assert not errors, errors
    got = target.read_bytes().split(b"\n")[:-1]
    assert len(got) == WRITERS * LINES
    seen: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
    for raw in got:
        w, i, _ = raw.split(b":", 2)
        assert raw + b"\n" == line(int(w), int(i)), raw[:40]  # whole, not interleaved
        seen[int(w)].append(int(i))
    assert all(seen[w] == list(range(LINES)) for w in range(WRITERS))


def test_append_pipes_are_bounded_per_uid(sockdir: Path) -> None:
    root = sockdir / "box"
    root.mkdir()
    (root / "a.log").write_text("")
    policy = _policy(root, '["append"]', "append_pipes_per_peer = 2")
    with Broker(sockdir / "b.sock", policy) as broker:  # type: ignore[arg-type]
        broker.start()
        with Client(broker.address) as c:
            first = c.open_fd(root / "a.log", os.O_WRONLY | os.O_APPEND)
            second = c.open_fd(root / "a.log", os.O_WRONLY | os.O_APPEND)
            with pytest.raises(OSError) as info:
                c.open_fd(root / "a.log", os.O_WRONLY | os.O_APPEND)
            assert info.value.errno == errno.EAGAIN
            os.close(first)  # the drain ends at EOF, and makes room
            assert _wait(lambda: broker._appends.count(0) == 1)
            third = c.open_fd(root / "a.log", os.O_WRONLY | os.O_APPEND)
            for fd in (second, third):
                os.close(fd)
    assert broker.counts == {"granted": 3, "limited": 1}


def test_append_only_cannot_be_read_and_write_grants_the_file(sockdir: Path) -> None:
    """Read with an append-only grant is refused (a pipe cannot be read); a rule that grants
    write sends the file itself, as before."""
    root = sockdir / "box"
    root.mkdir()
    (root / "a.log").write_text("x")
    with Broker(sockdir / "b.sock", _policy(root, '["append", "read"]')) as broker:  # type: ignore[arg-type]
        broker.start()
        with Client(broker.address) as c, pytest.raises(PermissionError):
            c.open_fd(root / "a.log", os.O_RDWR | os.O_APPEND)
    with Broker(sockdir / "c.sock", _policy(root, '["write"]')) as broker:  # type: ignore[arg-type]
        broker.start()
        with Client(broker.address) as c:
            fd = c.open_fd(root / "a.log", os.O_WRONLY | os.O_APPEND)
            try:
                assert stat.S_ISREG(os.fstat(fd).st_mode)
            finally:
                os.close(fd)


def test_stopping_the_broker_copies_what_was_written_then_breaks_the_pipe(sockdir: Path) -> None:
    root = sockdir / "box"
    root.mkdir()
    target = root / "a.log"
    target.write_text("")
    broker = Broker(sockdir / "b.sock", _policy(root, '["append"]'))  # type: ignore[arg-type]
    broker.start()
    with Client(broker.address) as c:
        fd = c.open_fd(target, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"before stop\n")
        broker.stop()
        assert target.read_text() == "before stop\n"
        with pytest.raises(BrokenPipeError):
            os.write(fd, b"after\n")
    finally:
        os.close(fd)
