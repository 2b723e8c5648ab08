"""systemd integration: LISTEN_PID, the watchdog, reload notifications, the doc's units.

A datagram socket of the test's own, bound in a temp dir and passed as
``NOTIFY_SOCKET``, plays the service manager. The unit files are read from the
"systemd" section of docs/operations.md, so the docs stay true.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import afunix
from afunix._activation import listen_fds, parse_listen_env, watchdog_interval

from ..conftest import afunix_cmd, wait_for_path
from ..security.broker_support import POLICY, Tree, as_nobody, make_tree

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

#: WATCHDOG_USEC for the tests: a ping every 0.1 s.
WATCHDOG_USEC = 200_000
PERIOD = WATCHDOG_USEC / 2_000_000


# ----------------------------------------------------------------- helpers
class Manager:
    """The service manager's end of ``NOTIFY_SOCKET``: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.log: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def recv(self, timeout: float) -> dict[str, str] | None:
        """The next notification as a dict, or ``None`` if none came within *timeout*."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):  # (a zero timeout: non-blocking)
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.log.append((time.monotonic(), fields))
        return fields

    def wait_for(
        self, pred: Callable[[dict[str, str]], bool], timeout: float = 20.0
    ) -> dict[str, str]:
        """Read notifications until one matches *pred*; fail after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            got = self.recv(max(left, 0.0)) if left > 0 else None
            if got is None:
                seen = [f for _, f in self.log]
                raise AssertionError(f"no matching notification within {timeout}s; got {seen}")
            if pred(got):
                return got

    def drain(self) -> None:
        """Forget notifications already queued."""
        while self.recv(0.0) is not None:
            pass

    def pings(self, count: int, timeout: float = 30.0) -> list[float]:
        """Wait for *count* ``WATCHDOG=1``; their arrival times."""
        times = []
        for _ in range(count):
            self.wait_for(lambda f: f.get("WATCHDOG") == "1", timeout)
            times.append(self.log[-1][0])
        return times


@contextmanager
def manager(sockdir: Path) -> Iterator[Manager]:
    m = Manager(sockdir / "notify")
    try:
        yield m
    finally:
        m.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(15)


def _assert_regular(times: list[float]) -> None:
    """Pings about every PERIOD: not a flood, and on time.

    Arrival times are the test's: a busy CPU can delay one reading and bunch two
    pings, so the bounds are on the median gap, with room for load.
    """
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert PERIOD / 2 < statistics.median(gaps) < PERIOD * 5, gaps


def doc_units() -> dict[str, dict[str, str]]:
    """The unit files in docs/operations.md's "systemd" section: file name -> {key: value}."""
    text = DOCS.read_text()
    section = text[text.index("## systemd\n") :]
    section = section[: section.index("\n## ", 1)]
    units: dict[str, dict[str, str]] = {}
    for block in re.findall(r"```ini\n(.*?)```", section, re.S):
        lines = block.splitlines()
        assert lines[0].startswith("# "), block
        keys: dict[str, str] = {}
        for line in lines[1:]:
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.split("=", 1)
                keys[key.strip()] = value.strip()
        units[Path(lines[0][2:].strip()).name] = keys
    return units


def exec_start(unit: dict[str, str], paths: dict[str, str]) -> list[str]:
    """The unit's ExecStart= as an argv of this environment, its paths replaced by *paths*."""
    argv = shlex.split(unit["ExecStart"])
    assert argv[0] == "/usr/bin/afunix", argv
    return afunix_cmd(*(paths.get(a, a) for a in argv[1:]))


def watchdog_usec(value: str) -> int:
    """``WatchdogSec=10s`` -> microseconds (the forms the docs use: ``N``, ``Ns``, ``Nmin``)."""
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1) * 1_000_000


# ---------------------------------------------------------------- LISTEN_PID
def test_listen_fds_needs_listen_pid() -> None:
    """sd_listen_fds: no LISTEN_PID, not for us (the variables may be a parent's)."""
    assert parse_listen_env({"LISTEN_FDS": "1"}, 42) is None
    assert parse_listen_env({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}, 42) is None
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_fds(env) == []
    assert env == {}  # unset all the same, so no child adopts them


def test_serve_without_listen_pid_binds_its_own_socket(sockdir: Path) -> None:
    """A real listener at descriptor 3 and LISTEN_FDS=1 but no LISTEN_PID: not adopted."""
    inherited = afunix.listen(sockdir / "inherited.sock")
    own, pidfile = sockdir / "own.sock", sockdir / "pid"
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.execv(sys.executable, [sys.executable, '-m', 'afunix', 'serve', *sys.argv[2:]])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["LISTEN_FDS"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            str(inherited.fileno()),
            str(own),
            "--pidfile",
            str(pidfile),
        ],
        pass_fds=[inherited.fileno()],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_path(pidfile, 20)  # written once accepting
        with afunix.connect(own, timeout=10) as c:
            c.settimeout(15)
            c.sendall(b"bound")
            assert c.recv(100) == b"bound"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        inherited.close()
    assert "socket bound" in err, err


# ------------------------------------------------------------------ watchdog
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "42"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "41"}, None),  # another process's
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 42) == expected


@pytest.mark.parametrize(
    "env",
    [{"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "1s"}, {"WATCHDOG_USEC": "1", "WATCHDOG_PID": "x"}],
)
def test_watchdog_interval_rejects_malformed(env: dict[str, str]) -> None:
    with pytest.raises(afunix.AfunixError) as info:
        watchdog_interval(env, 42)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("model", ["async", "thread", "fork"])
def test_serve_pings_the_watchdog_and_says_stopping(sockdir: Path, model: str) -> None:
    """Every model: READY=1, WATCHDOG=1 about every half interval, STOPPING=1 on SIGTERM."""
    path = sockdir / "w.sock"
    with manager(sockdir) as m:
        env = dict(os.environ, NOTIFY_SOCKET=str(m.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        proc = subprocess.Popen(
            afunix_cmd("serve", str(path), "--model", model), env=env, stderr=subprocess.DEVNULL
        )
        try:
            m.wait_for(lambda f: f.get("READY") == "1")
            times = m.pings(10)
            _assert_regular(times)
            with afunix.connect(path, timeout=10) as c:  # and it serves meanwhile
                c.settimeout(15)
                c.sendall(b"x")
                assert c.recv(10) == b"x"
            proc.send_signal(signal.SIGTERM)
            m.wait_for(lambda f: f.get("STOPPING") == "1")
            assert proc.wait(15) == 0
        finally:
            _stop(proc)


# A server whose serving loop blocks while a client holds it: the asyncio model
# through an async handler that makes a blocking call, the thread and fork models
# through a verify hook (it runs in the accept loop) that waits for the client.
_STUCK_SERVER = """
import socket, sys
import afunix

def block(sock):
    sock.setblocking(True)
    sock.sendall(b"blocked")
    return sock.recv(1) == b"go"

async def handler(conn):
    block(conn.sock)  # blocks the event loop itself

def sync_handler(conn):
    pass

model = sys.argv[2]
if model == "asyncio":
    srv = afunix.Server(sys.argv[1], handler, model="asyncio")
else:
    srv = afunix.Server(
        sys.argv[1], sync_handler, model=model, verify=lambda sock, peer: block(sock)
    )
srv.serve_forever()
"""


@pytest.mark.parametrize("model", ["asyncio", "thread", "fork"])
def test_a_stuck_serving_loop_stops_pinging(sockdir: Path, model: str) -> None:
    """3 rounds: pings flow; a client blocks the loop: none for 10 periods; released: again."""
    path = sockdir / "stuck.sock"
    with manager(sockdir) as m:
        env = dict(os.environ, NOTIFY_SOCKET=str(m.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        proc = subprocess.Popen(
            [sys.executable, "-c", _STUCK_SERVER, str(path), model],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            m.wait_for(lambda f: f.get("READY") == "1")
            for _round in range(3):
                _assert_regular(m.pings(4))
                with afunix.connect(path, timeout=10) as c:
                    c.settimeout(15)
                    assert c.recv(10) == b"blocked"  # the loop is now stuck in block()
                    m.drain()  # pings sent before it got stuck
                    quiet = m.recv(PERIOD * 10)
                    assert quiet is None, f"a stuck loop pinged: {quiet}"
                    c.sendall(b"go")
                    m.pings(2)  # unstuck: pinging again
            proc.send_signal(signal.SIGTERM)
            m.wait_for(lambda f: f.get("STOPPING") == "1")
            assert proc.wait(15) == 0
        finally:
            _stop(proc)
            assert proc.stderr is not None
            proc.stderr.close()


# ------------------------------------------------------- the docs' unit files
def test_docs_socket_activated_unit_with_systemd_socket_activate(sockdir: Path) -> None:
    """afunix.socket + afunix.service from the docs, through the real systemd-socket-activate."""
    units = doc_units()
    sock_unit, svc = units["afunix.socket"], units["afunix.service"]
    assert svc["Type"] == "notify"
    assert watchdog_usec(svc["WatchdogSec"]) > 0
    path = sockdir / "echo.sock"
    argv = exec_start(svc, {sock_unit["ListenStream"]: str(path)})
    with manager(sockdir) as m:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                str(path),
                f"--fdname={sock_unit['FileDescriptorName']}",
                f"--setenv=NOTIFY_SOCKET={m.path}",
                # systemd would pass WatchdogSec= as is; a short one keeps the test short
                f"--setenv=WATCHDOG_USEC={WATCHDOG_USEC}",
                *argv,
            ],
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_path(path)
            with afunix.connect(path, timeout=10) as c:  # the first client starts it
                c.settimeout(15)
                c.sendall(b"activated")
                assert c.recv(100) == b"activated"
            ready = m.wait_for(lambda f: f.get("READY") == "1")
            assert ready["STATUS"] == f"accepting on {path}"
            _assert_regular(m.pings(5))
            proc.send_signal(signal.SIGTERM)  # (socket-activate exec'd the server)
            m.wait_for(lambda f: f.get("STOPPING") == "1")
            assert proc.wait(15) == 0
        finally:
            _stop(proc)
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            proc.stderr.close()
    assert "socket activation" in err, err


def test_docs_broker_unit_notify_reload_and_watchdog(sockdir: Path) -> None:
    """afunix-broker.service from the docs, run with NOTIFY_SOCKET and WATCHDOG_USEC as
    systemd would: READY=1, WATCHDOG=1, on each of 20 SIGHUPs RELOADING=1 with
    MONOTONIC_USEC then READY=1; a failed reload ends in READY=1 with a STATUS and the
    old policy kept; STOPPING=1 on SIGTERM."""
    tree: Tree = make_tree(sockdir)
    svc = doc_units()["afunix-broker.service"]
    assert svc["Type"] == "notify-reload"
    assert watchdog_usec(svc["WatchdogSec"]) > 0
    argv = exec_start(
        svc,
        {
            "/run/afunix-broker.sock": str(tree.sock),
            "/etc/afunix/broker.toml": str(tree.policy),
            "/var/log/afunix-broker.jsonl": str(tree.audit),
        },
    )
    assert str(tree.sock) in argv and str(tree.policy) in argv, argv
    with manager(sockdir) as m:
        env = dict(os.environ, NOTIFY_SOCKET=str(m.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
        try:
            m.wait_for(lambda f: f.get("READY") == "1")
            _assert_regular(m.pings(5))
            pub = {"path": str(tree.root / "pub.txt")}
            assert as_nobody(tree.sock, [pub])[0]["ok"]
            for _round in range(20):
                before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                proc.send_signal(signal.SIGHUP)
                reloading = m.wait_for(lambda f: "RELOADING" in f)
                after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                assert reloading["RELOADING"] == "1"
                assert before <= int(reloading["MONOTONIC_USEC"]) <= after
                done = m.wait_for(lambda f: "READY" in f)
                assert done["READY"] == "1"
                assert done["STATUS"].startswith("policy reloaded: 2 rule(s)"), done
            # A broken policy: the reload ends all the same, says why, keeps the old policy.
            tree.policy.write_text(POLICY.format(root=tree.root, rw=tree.rw) + "[[rule]\n")
            proc.send_signal(signal.SIGHUP)
            assert m.wait_for(lambda f: "RELOADING" in f)["RELOADING"] == "1"
            done = m.wait_for(lambda f: "READY" in f)
            assert done["READY"] == "1"
            assert done["STATUS"].startswith("reload failed, old policy kept:"), done
            assert str(tree.policy) in done["STATUS"], done
            assert as_nobody(tree.sock, [pub])[0]["ok"]  # the old policy still serves
            m.pings(2)  # and the accept loop still pings
            proc.send_signal(signal.SIGTERM)
            m.wait_for(lambda f: f.get("STOPPING") == "1")
            assert proc.wait(15) == 0
        finally:
            _stop(proc)
            assert proc.stderr is not None
            proc.stderr.close()
