"""The daemon: reload, bad policies, a killed broker, socket activation, sd_notify, audit."""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from afunix.broker import Broker, Client, load_policy
from afunix.broker.client import BrokerError
from tests.conftest import afunix_cmd, wait_until
from tests.security.broker_support import BrokerProcess, Tree, as_nobody, tree

__all__ = ["tree"]


def _wait(pred: Callable[[], object], timeout: float = 5.0) -> bool:
    return wait_until(pred, timeout)


def _wait_serving(tree: Tree) -> None:
    """Wait until the broker answers (its socket file exists from bind on, before listen)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with Client(tree.sock, timeout=10) as c:
                os.close(c.open_fd(tree.root / "pub.txt"))
            return
        except BrokerError as exc:
            if exc.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _unread_by_peer(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not read yet (``SIOCOUTQ``)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of *pid* is in state ``T`` (stopped by a signal).

    The state is the field after the command name in ``/proc/PID/task/TID/stat``
    (the name is in parentheses and may itself contain spaces or parentheses).
    """
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat_line = f.read()
        except FileNotFoundError:  # the thread exited meanwhile
            continue
        states.append(stat_line[stat_line.rindex(b")") + 2 : stat_line.rindex(b")") + 3])
    return bool(states) and all(s in (b"T", b"t") for s in states)


def test_sighup_reloads_atomically_and_keeps_the_old_policy_if_invalid(tree: Tree) -> None:
    b = BrokerProcess(tree)
    denied = str(tree.root / "denied" / "x.txt")
    try:
        assert as_nobody(tree.sock, [{"path": denied}])[0]["errno"] == errno.EACCES
        tree.policy.write_text(tree.policy.read_text().replace('"up/**"]', '"up/**", "denied/*"]'))
        os.kill(b.pid, signal.SIGHUP)
        assert _wait(lambda: any(r["event"] == "reload" for r in tree.audit_lines()))
        assert as_nobody(tree.sock, [{"path": denied}])[0]["ok"]
        # An invalid policy is refused: the previous one stays in force.
        tree.policy.write_text("version = 1\n[[rule]]\nroot = 'relative'\n")
        os.kill(b.pid, signal.SIGHUP)
        assert _wait(lambda: any(r["event"] == "reload-failed" for r in tree.audit_lines()))
        assert as_nobody(tree.sock, [{"path": denied}])[0]["ok"]
    finally:
        err = b.stop()
    assert "reload refused, keeping the previous policy" in err
    assert "line 3" in err
    failed = next(r for r in tree.audit_lines() if r["event"] == "reload-failed")
    assert failed["line"] == 3


def test_an_invalid_policy_is_refused_at_start(tree: Tree) -> None:
    tree.policy.write_text('version = 1\n\n[[rule]]\nroot = "/"\nallow = ["read"]\n')
    proc = subprocess.run(
        afunix_cmd("broker", str(tree.sock), "--policy", str(tree.policy)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78  # EX_CONFIG: invalid policy
    assert f"invalid policy {tree.policy}, line 3: the rule names no subject" in proc.stderr
    assert not tree.sock.exists()


def test_audit_is_fail_closed(tree: Tree) -> None:
    """No audit line, no descriptor: with the log on a full disk every open is refused."""
    policy = load_policy(tree.policy)
    with Broker(tree.sock, policy, audit="/dev/full") as b:
        b.start()
        with Client(tree.sock) as c:
            with pytest.raises(OSError) as info:
                c.open_fd(tree.root / "pub.txt")
            assert info.value.errno == errno.EIO
        assert b.counts == {"failed": 1}


def test_stopped_broker_gives_a_timeout_within_the_clients_timeout(tree: Tree) -> None:
    b = BrokerProcess(tree)
    try:
        _wait_serving(tree)
        with Client(tree.sock, timeout=0.5) as c:
            os.close(c.open_fd(tree.root / "pub.txt"))
            os.kill(b.pid, signal.SIGSTOP)
            try:
                # The signal is delivered asynchronously: under load the broker may still
                # run (and answer) for a while after kill() returns. Wait until every
                # one of its threads is stopped.
                assert _wait(lambda: _all_threads_stopped(b.pid), 10), "SIGSTOP took no effect"
                started = time.monotonic()
                with pytest.raises(BrokerError) as info:
                    c.open_fd(tree.root / "pub.txt")
                took = time.monotonic() - started
            finally:
                os.kill(b.pid, signal.SIGCONT)
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.4 < took < 1.5
    finally:
        b.stop()


def test_broker_killed_mid_request_gives_an_error_at_once(tree: Tree) -> None:
    b = BrokerProcess(tree)
    result: list[BaseException] = []
    try:
        with Client(tree.sock, timeout=20) as c:
            os.close(c.open_fd(tree.root / "pub.txt"))
            os.kill(b.pid, signal.SIGSTOP)  # it will never answer the next request

            def ask() -> None:
                try:
                    c.open_fd(tree.root / "pub.txt")
                except BaseException as exc:
                    result.append(exc)

            assert _wait(lambda: _all_threads_stopped(b.pid), 10), "SIGSTOP took no effect"
            t = threading.Thread(target=ask)
            t.start()
            # The request is in the broker's socket once the client's socket has
            # bytes its peer has not read (SIOCOUTQ), and the client waits for the reply.
            assert _wait(lambda: c._chan is not None and _unread_by_peer(c._chan.socket) > 0, 10)
            started = time.monotonic()
            os.kill(b.pid, signal.SIGKILL)
            t.join(10)
            took = time.monotonic() - started
    finally:
        b.stop()
    assert isinstance(result[0], BrokerError)
    assert result[0].errno == errno.ECONNRESET
    assert took < 2  # at once, far below the 20 s timeout


_SIGPIPE_CLIENT = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a C-like process: SIGPIPE kills
    from afunix.broker import Client
    from afunix.broker.client import BrokerError
    c = Client(sys.argv[1], timeout=5)
    os.close(c.open_fd(sys.argv[2]))
    print("ready", flush=True)
    sys.stdin.readline()  # the broker is killed meanwhile
    try:
        c.open_fd(sys.argv[2])
    except BrokerError as e:
        print("errno", e.errno, flush=True)
    """
)


def test_writing_to_a_dead_broker_is_an_error_not_sigpipe(tree: Tree) -> None:
    b = BrokerProcess(tree)
    client = subprocess.Popen(
        [sys.executable, "-c", _SIGPIPE_CLIENT, str(tree.sock), str(tree.root / "pub.txt")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "ready\n"
        os.kill(b.pid, signal.SIGKILL)
        b.proc.wait()
        client.stdin.write("go\n")
        client.stdin.flush()
        out = client.stdout.readline()
        assert client.wait(10) == 0, "killed by a signal"
        assert out.split()[0] == "errno"
        assert int(out.split()[1]) in (errno.ECONNREFUSED, errno.EPIPE, errno.ECONNRESET)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for f in (client.stdin, client.stdout):
            if f:
                f.close()
        b.stop()


def test_socket_activation(tree: Tree) -> None:
    """systemd-socket-activate binds the socket and starts the broker on first use."""
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(tree.sock),
            *afunix_cmd("broker", str(tree.sock), "--policy", str(tree.policy)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait(tree.sock.exists)
        os.chmod(tree.sock, 0o666)
        [res] = as_nobody(tree.sock, [{"path": str(tree.root / "secret.txt")}])
        assert res["ok"] and res["data"] == "secret\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "(activation)" in err


def test_sd_notify_ready_and_stopping(tree: Tree, sockdir: Path) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify = sockdir / "notify.sock"
    manager.bind(str(notify))
    manager.settimeout(10)
    try:
        b = BrokerProcess(tree, env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        try:
            ready = manager.recv(4096).decode()
            assert "READY=1" in ready.split("\n")
            assert as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])[0]["ok"]
        finally:
            b.stop()
        assert "STOPPING=1" in manager.recv(4096).decode().split("\n")
    finally:
        manager.close()


def test_socket_file_mode_owner_group_and_abstract(tree: Tree) -> None:
    gid = grp.getgrnam("nogroup").gr_gid
    policy = load_policy(tree.policy)
    with Broker(tree.sock, policy, mode=0o660, group="nogroup") as b:
        b.start()
        st = os.lstat(tree.sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        # Group nogroup may connect; others may not even reach the broker.
        [res] = as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])
        assert res["ok"]
    name = f"@afunix-broker-test-{os.getpid()}"
    with Broker(name, policy) as b:
        b.start()
        with Client(name) as c, c.open(tree.root / "pub.txt") as f:
            assert f.read() == b"public\n"
    recs = [r for r in tree.audit_lines() if r["event"] == "open"]
    assert recs == []  # these brokers had no audit log


def test_audit_records_start_and_stop(tree: Tree) -> None:
    b = BrokerProcess(tree)
    as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])
    b.stop()
    events = [r["event"] for r in tree.audit_lines()]
    assert events == ["start", "open", "stop"]
    assert all(json.dumps(r) for r in tree.audit_lines())


def test_sigusr2_hands_the_socket_over_to_a_successor(tree: Tree) -> None:
    """Zero-downtime restart (the server's hand-over): the new broker serves, the old exits."""
    b = BrokerProcess(tree)
    successor = None
    try:
        assert as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])[0]["ok"]
        os.kill(b.pid, signal.SIGUSR2)
        assert b.proc.wait(10) == 0
        starts = [r for r in tree.audit_lines() if r["event"] == "start"]
        assert len(starts) == 2
        successor = starts[1]["pid"]
        assert successor != b.pid
        stop = next(r for r in tree.audit_lines() if r["event"] == "stop")
        assert stop["reason"] == f"handed over to pid {successor}"
        assert tree.sock.exists()
        assert as_nobody(tree.sock, [{"path": str(tree.root / "secret.txt")}])[0]["ok"]
    finally:
        if successor is not None:
            os.kill(successor, signal.SIGTERM)
            assert _wait(lambda: not os.path.exists(f"/proc/{successor}"), 10)
        err = b.stop()
    assert "(handoff)" in err
