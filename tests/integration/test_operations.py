"""Operations: zero-downtime hand-over, socket activation, sd_notify (issue 5, sections 3-4)."""

from __future__ import annotations

import array
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import afunix
from afunix._activation import listen_fds, parse_listen_env
from afunix._notify import format_notification, notify

from ..conftest import afunix_cmd, wait_for_path

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Successors are the old server's children; adopt them when it exits, to reap them.

    Only for this test: afterwards the process stops being a subreaper, so that
    later tests' grandchildren go to init as usual.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        assert libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) == 0


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def _wait_new_pid(pidfile: Path, old: int | None, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _read_pid(pidfile)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.01)
    raise TimeoutError(f"no new pid in {pidfile} (old {old})")


def _reap(pid: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # not ours (already reaped)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"pid {pid} did not exit")


class Hammer:
    """Clients connecting in a loop: each sends a request and checks the echo."""

    def __init__(self, path: Path, clients: int) -> None:
        self.path = path
        self.stop = threading.Event()
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.missing_file = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        self.threads.append(threading.Thread(target=self._watch_file))

    def _watch_file(self) -> None:
        while not self.stop.is_set():
            if not os.path.exists(self.path):
                with self.lock:
                    self.missing_file += 1
            time.sleep(0.001)

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            msg = f"client {i} request {n}\n".encode()
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(10)
                    s.connect(str(self.path))
                    s.sendall(msg)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(4096):
                        got += chunk
                finally:
                    s.close()
                if got != msg:
                    raise ConnectionError(f"wrong echo {got!r}")
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                with self.lock:
                    self.errors[name] += 1
                time.sleep(0.005)
            else:
                with self.lock:
                    self.ok += 1

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.mark.parametrize("model", ["async", "thread"])
def test_hand_over_through_many_restarts_loses_nothing(
    sockdir: Path, subreaper: None, model: str
) -> None:
    path, pidfile = sockdir / "s.sock", sockdir / "pid"
    first = subprocess.Popen(
        afunix_cmd("serve", str(path), "--model", model, "--pidfile", str(pidfile)),
        stderr=subprocess.DEVNULL,
    )
    pids = [_wait_new_pid(pidfile, None)]
    try:
        with Hammer(path, clients=12) as hammer:
            time.sleep(0.2)
            for _ in range(6):
                old = pids[-1]
                os.kill(old, signal.SIGUSR2)
                pids.append(_wait_new_pid(pidfile, old))
                assert _reap(old) == 0  # the old process exits cleanly after draining
                time.sleep(0.1)
            time.sleep(0.2)
        assert len(set(pids)) == 7
        assert hammer.ok > 100
        assert dict(hammer.errors) == {}, f"lost requests: {dict(hammer.errors)}"
        assert hammer.missing_file == 0
        assert path.exists()  # no old process removed its successor's file
    finally:
        last = pids[-1]
        os.kill(last, signal.SIGTERM)
        _reap(last)
        first.wait(5)
    assert not path.exists()  # the last one removes it on a normal stop


def test_naive_restart_is_caught_losing_requests(sockdir: Path) -> None:
    """The same test with close-and-rebind restarts: it does see the losses."""
    path = sockdir / "n.sock"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(afunix_cmd("serve", str(path)), stderr=subprocess.DEVNULL)
        wait_for_path(path)
        return proc

    proc = start()
    try:
        with Hammer(path, clients=12) as hammer:
            time.sleep(0.2)
            for _ in range(3):
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
                proc = start()
                time.sleep(0.1)
        assert sum(hammer.errors.values()) > 0
        assert hammer.missing_file > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_hand_over_api_with_a_failing_successor_keeps_serving(sockdir: Path) -> None:
    path = sockdir / "f.sock"
    with afunix.Server(path, afunix.server.echo, model="thread") as srv:
        srv.start()
        with pytest.raises(afunix.AfunixError, match="exited before taking over"):
            srv.hand_over([sys.executable, "-c", "raise SystemExit(3)"], timeout=10)
        with afunix.connect(path) as c:
            c.sendall(b"still here")
            assert c.recv(100) == b"still here"
        assert srv.handed_over_to is None


def test_hand_over_api_to_a_library_successor(sockdir: Path, tmp_path: Path) -> None:
    path = sockdir / "api.sock"
    script = tmp_path / "successor.py"
    script.write_text(
        "import afunix\n"
        "def h(conn):\n"
        "    conn.send(b'new:' + conn.recv())\n"
        "srv = afunix.Server('/nonexistent/unused.sock', h, model='thread')\n"
        "assert srv.origin == 'handoff', srv.origin\n"
        "srv.serve_forever()\n"
    )
    srv = afunix.Server(path, afunix.server.echo, model="thread").start()
    pid = srv.hand_over([sys.executable, str(script)], timeout=20)
    try:
        srv.stop()
        assert path.exists(), "the old server removed the file it handed over"
        with afunix.connect(path) as c:
            c.sendall(b"hi")
            assert c.recv(100) == b"new:hi"
    finally:
        os.kill(pid, signal.SIGTERM)
        _reap(pid)
    assert not path.exists()


# ---------------------------------------------------------------- activation
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "42"}, [(3, "unknown"), (4, "unknown")]),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "41"}, None),  # meant for another process
        ({"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "a:b"}, [(3, "a"), (4, "b")]),
        ({"LISTEN_FDS": "0", "LISTEN_PID": "42"}, []),
    ],
)
def test_parse_listen_env(env: dict[str, str], expected: object) -> None:
    assert parse_listen_env(env, 42) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_FDS": "x", "LISTEN_PID": "42"},
        {"LISTEN_FDS": "1", "LISTEN_PID": "me"},
        {"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "only-one"},
    ],
)
def test_parse_listen_env_rejects_malformed(env: dict[str, str]) -> None:
    with pytest.raises(afunix.AfunixError) as info:
        parse_listen_env(env, 42)
    assert info.value.errno == errno.EINVAL


def test_listen_fds_unsets_the_environment_and_ignores_other_pids() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert listen_fds(env) == []
    assert env == {}


def test_socket_activation_with_systemd_socket_activate(sockdir: Path) -> None:
    path = sockdir / "act.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(path),
            "--fdname=echo",
            *afunix_cmd("serve", str(sockdir / "ignored.sock")),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_path(path)
        with afunix.connect(path, timeout=10) as c:  # the first client starts the server
            c.settimeout(15)
            c.sendall(b"activated")
            assert c.recv(100) == b"activated"
        assert not (sockdir / "ignored.sock").exists()  # it did not bind its own
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert "socket activation" in err or "activation" in err, err


# ------------------------------------------------------------------ notify
def test_format_notification() -> None:
    assert format_notification({"READY": 1, "STATUS": "ok"}) == b"READY=1\nSTATUS=ok\n"
    with pytest.raises(ValueError, match="newlines"):
        format_notification({"STATUS": "two\nlines"})


def test_notify_without_socket_is_a_no_op() -> None:
    assert notify({"READY": 1}, env={}) is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_server_notifies_ready_stopping_and_stores_its_listener(
    sockdir: Path, abstract: bool
) -> None:
    manager_addr = f"@afx-{os.getpid()}-notify" if abstract else str(sockdir / "notify")
    path = sockdir / "n.sock"
    manager = afunix.listen(manager_addr, "dgram")
    env = dict(os.environ, NOTIFY_SOCKET=manager_addr)
    proc = subprocess.Popen(
        afunix_cmd("serve", str(path), "--fdstore"), env=env, stderr=subprocess.DEVNULL
    )
    received: list[bytes] = []
    stored: list[int] = []
    try:
        manager.settimeout(15)
        fds = array.array("i")
        while not any(b"FDSTORE=1" in m for m in received):
            data, anc, _flags, _addr = manager.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            received.append(data)
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[: len(raw) - len(raw) % 4])
        stored.extend(fds)
        assert any(m.startswith(b"READY=1\n") and b"STATUS=accepting on" in m for m in received)
        assert len(stored) == 1
        with socket.socket(fileno=os.dup(stored[0])) as listener:
            assert listener.getsockname() == str(path)  # the parked fd is our listener
        proc.send_signal(signal.SIGTERM)
        data = manager.recv(4096)
        assert data.startswith(b"STOPPING=1\n")
        assert proc.wait(10) == 0
    finally:
        for fd in stored:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.close()


def test_take_over_refuses_a_descriptor_that_is_no_socket() -> None:
    """A broken predecessor sending a pipe instead of a listener: clear error, nothing leaked."""
    from afunix._fds import send_fds
    from afunix._handoff import ENV_VAR, take_over

    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    try:
        send_fds(ours, b'{"afunix-handoff": 1, "address": "", "type": 1}', [r])
        env = {ENV_VAR: str(theirs.detach())}
        with pytest.raises(afunix.ProtocolError, match="no socket"):
            take_over(env)
        assert env == {}  # consumed, so our own children do not try again
    finally:
        ours.close()
        os.close(r)
        os.close(w)
