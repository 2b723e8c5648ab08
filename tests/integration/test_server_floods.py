"""Floods against a generic Server: the listen queue, running out of threads or
processes, and one uid taking every slot (issue 15, items 12, 13 and 4).

Fakes appear only to inject the rare errors the kernel gives when it runs out
of tasks (``Thread.start`` raising ``RuntimeError("can't start new thread")``,
``os.fork`` raising ``EAGAIN``); everything else is real sockets and real peers
(a client as uid 65534 through ``setpriv``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afunix
from afunix.server import THREAD_MAX_CLIENTS, somaxconn
from afunix.server._threads import ThreadRunner
from tests.conftest import NOBODY, wait_for_listener, wait_for_path

BURST = 3000


def _connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(path))
    except BaseException:
        s.close()
        raise
    return s


def _recv_all(s: socket.socket) -> bytes:
    """Everything until end of file. A refused client that had sent data is reset
    (the server closed with those bytes unread): what came before the reset counts."""
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --------------------------------------------------------------- item 12: backlog
def test_default_backlog_is_somaxconn() -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        assert somaxconn() == int(f.read())


def test_default_server_takes_a_burst_of_3000_connects(sockdir: Path) -> None:
    """3,000 non-blocking connects (what an asyncio client does) while a default
    Server is not accepting: every one fits in the listen queue (none refused with
    EAGAIN), and each is served once the server accepts again. With a listen queue
    of 128, 2,871 of the 3,000 were refused."""
    path = sockdir / "burst.sock"
    gate = threading.Event()
    busy = threading.Event()

    async def handler(conn: afunix.AsyncConnection) -> None:
        if not busy.is_set():
            busy.set()
            gate.wait(30)  # blocks the event loop on purpose: nobody is accepted meanwhile
        while data := await conn.recv():
            await conn.send(data)

    clients: list[socket.socket] = []
    refused = 0
    with afunix.Server(path, handler).start():  # every default: asyncio, backlog
        first = _connect(path)
        clients.append(first)
        try:
            first.sendall(b"x")
            assert busy.wait(10)
            for _ in range(BURST):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(str(path))
                except BlockingIOError:
                    refused += 1
                    s.close()
                    continue
                clients.append(s)
            gate.set()
            assert first.recv(1) == b"x"
            for s in clients[1:]:
                s.settimeout(20)
                s.sendall(b"p")
            answered = sum(s.recv(1) == b"p" for s in clients[1:])
        finally:
            gate.set()
            for s in clients:
                s.close()
    assert (refused, answered) == (0, BURST), f"{refused} of {BURST} refused"


def test_cli_serve_listens_with_somaxconn_by_default(sockdir: Path) -> None:
    """``afunix serve`` without --backlog passes the library default (somaxconn), not 128."""
    from tests.conftest import serving

    path = sockdir / "bk.sock"
    with serving(sockdir, str(path), "--model", "thread"):
        out = subprocess.run(
            ["ss", "-xlH", "src", str(path)], capture_output=True, text=True, check=True, timeout=10
        ).stdout.split()
    # ss prints a listener's backlog in its Send-Q column: u_str LISTEN Recv-Q Send-Q ...
    assert out[:2] == ["u_str", "LISTEN"], out
    assert int(out[3]) == somaxconn()


def test_negative_backlog_is_a_value_error(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="backlog"):
        afunix.Server(sockdir / "n.sock", afunix.server.echo, model="thread", backlog=-1)
    assert not (sockdir / "n.sock").exists()


# ------------------------------------------------ item 13: no thread, no process
def test_thread_model_is_bounded_by_default(sockdir: Path) -> None:
    with afunix.Server(sockdir / "b.sock", afunix.server.echo, model="thread") as srv:
        assert srv.max_clients == THREAD_MAX_CLIENTS
    with afunix.Server(sockdir / "a.sock", afunix.server.async_echo) as srv:
        assert srv.max_clients is None  # the asyncio model needs no thread per client


def test_thread_start_failure_refuses_that_client_and_keeps_serving(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Thread.start raising "can't start new thread" (what RLIMIT_NPROC gives) for
    three clients in a row: each is closed, one log line says so, and the fourth
    client is served. Before the fix the first failure ended serve_forever."""
    caplog.set_level(logging.WARNING, logger="afunix.server")
    path = sockdir / "t.sock"
    srv = afunix.Server(path, afunix.server.echo, model="thread")
    failures = [3]
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        target = getattr(self, "_target", None)  # a bound method of the thread runner
        if getattr(target, "__func__", None) is ThreadRunner._run_thread and failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with srv.start():
        for _ in range(3):
            with _connect(path) as c:
                assert _recv_all(c) == b""  # refused: closed without a reply
        with _connect(path) as c:
            c.sendall(b"still serving")
            c.shutdown(socket.SHUT_WR)
            assert _recv_all(c) == b"still serving"
        assert srv.refused == {"no-thread": 3}
        assert srv._thread is not None and srv._thread.is_alive()
    lines = [r.getMessage() for r in caplog.records if "cannot start a thread" in r.getMessage()]
    assert len(lines) == 1, lines


FORK_FAILS = textwrap.dedent(
    """
    import errno, os, sys, afunix

    real_fork = os.fork
    failures = [int(sys.argv[2])]

    def fork():  # the rare error only: the process table is full for this uid
        if failures[0] > 0:
            failures[0] -= 1
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    os.fork = fork
    kind = sys.argv[3]
    handler = afunix.server.datagram_echo if kind == "dgram" else afunix.server.echo
    afunix.Server(sys.argv[1], handler, type=kind, model="fork").serve_forever()
    """
)


@contextlib.contextmanager
def _fork_server(path: Path, failures: int, kind: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_FAILS, str(path), str(failures), kind],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_path(path)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_fork_eagain_refuses_that_client_and_keeps_serving(sockdir: Path) -> None:
    """fork() failing with EAGAIN for three clients: each is closed, the server logs
    once and serves the fourth. Before the fix the server exited on the first."""
    path = sockdir / "f.sock"
    with _fork_server(path, 3, "stream") as proc:
        for _ in range(3):
            with _connect(path) as c:
                assert _recv_all(c) == b""
        with _connect(path) as c:
            c.sendall(b"still serving")
            c.shutdown(socket.SHUT_WR)
            assert _recv_all(c) == b"still serving"
        assert proc.poll() is None
        proc.terminate()
        proc.wait(10)
        assert proc.returncode == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    assert err.count("cannot fork a child") == 1, err
    assert "3 refused" not in err.splitlines()[0]


def test_fork_eagain_on_a_datagram_server_drops_it_and_keeps_serving(sockdir: Path) -> None:
    path = sockdir / "fd.sock"
    with _fork_server(path, 1, "dgram") as proc:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
            c.bind(str(sockdir / "c.sock"))
            c.settimeout(10)
            c.sendto(b"lost", str(path))
            c.sendto(b"answered", str(path))
            assert c.recv(100) == b"answered"
        assert proc.poll() is None


# --------------------------------------------------- item 4: a cap per uid
def _as_nobody_echo(path: Path, data: bytes = b"nobody") -> bytes:
    """Connect as uid 65534, send *data*, return what came back."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.settimeout(10);s.connect(sys.argv[1])\n"
        f"s.sendall({data!r});s.shutdown(socket.SHUT_WR)\n"
        "out=b''\n"
        "while c:=s.recv(4096): out+=c\n"
        "sys.stdout.buffer.write(out)\n"
    )
    done = subprocess.run(
        [*NOBODY, sys.executable, "-c", code, str(path)], capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("model", ["asyncio", "thread"])
def test_uid_limit_refuses_at_accept_and_serves_other_uids(
    sockdir: Path, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Root holds its 2 connections; 50 more from root are refused at once with the
    refusal bytes (no handler runs: the handler count stays 2); uid 65534 is served
    meanwhile; one log line covers the 50; a freed slot serves root again."""
    caplog.set_level(logging.WARNING, logger="afunix.server")
    path = sockdir / "u.sock"
    calls = [0]
    handler: Any
    if model == "asyncio":

        async def handler(conn: afunix.AsyncConnection) -> None:
            calls[0] += 1
            while data := await conn.recv():
                await conn.send(data)

    else:

        def handler(conn: afunix.Connection) -> None:
            calls[0] += 1
            for chunk in conn:
                conn.send(chunk)

    srv = afunix.Server(
        path, handler, model=model, max_clients_per_uid=2, refuse_with=b"busy", mode=0o666
    )
    with srv.start():
        held = [_connect(path), _connect(path)]
        try:
            for h in held:
                h.sendall(b"hi")
                assert h.recv(2) == b"hi"
            for _ in range(50):
                with _connect(path) as c:
                    assert _recv_all(c) == b"busy"
            assert calls[0] == 2
            assert _as_nobody_echo(path) == b"nobody"
            held.pop().close()
            _wait(lambda: srv._admission._uid_conns.get(0, 0) < 2)
            with _connect(path) as c:
                c.sendall(b"again")
                c.shutdown(socket.SHUT_WR)
                assert _recv_all(c) == b"again"
        finally:
            for h in held:
                h.close()
        assert srv.refused == {"uid-limit": 50}
    lines = [r.getMessage() for r in caplog.records if "from uid 0" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "limit per uid" in lines[0]


FORK_CAPPED = textwrap.dedent(
    """
    import sys, afunix
    afunix.Server(sys.argv[1], afunix.server.echo, model="fork", max_clients_per_uid=2,
                  refuse_with=b"busy", mode=0o666).serve_forever()
    """
)


def test_uid_limit_in_the_fork_model_counts_children(sockdir: Path) -> None:
    path = sockdir / "fu.sock"
    proc = subprocess.Popen([sys.executable, "-c", FORK_CAPPED, str(path)])
    try:
        wait_for_listener(path)  # not wait_for_path: refused between bind and listen
        held = [_connect(path), _connect(path)]
        try:
            for h in held:
                h.sendall(b"hi")
                assert h.recv(2) == b"hi"
            with _connect(path) as c:
                assert _recv_all(c) == b"busy"
            assert _as_nobody_echo(path) == b"nobody"
            held[0].shutdown(socket.SHUT_WR)  # that child ends and is reaped
            assert _recv_all(held[0]) == b""
            deadline = time.monotonic() + 10
            while True:  # room again once the child is reaped
                with _connect(path) as c:
                    try:
                        c.sendall(b"again")
                        c.shutdown(socket.SHUT_WR)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # refused and closed before our bytes went: still busy
                    got = _recv_all(c)
                if got == b"again":
                    break
                assert got in (b"busy", b"") and time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            for h in held:
                h.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_uid_limit_keeps_a_quarter_of_max_clients_for_other_uids(sockdir: Path) -> None:
    """max_clients=8 with a per-uid cap of 100: one uid gets at most 6 (8 - 8 // 4),
    so uid 65534 still finds a slot while root holds all it may."""
    path = sockdir / "r.sock"
    srv = afunix.Server(
        path,
        afunix.server.echo,
        model="thread",
        max_clients=8,
        max_clients_per_uid=100,
        mode=0o666,
    )
    assert srv.uid_limit == 6
    with srv.start():
        held = [_connect(path) for _ in range(6)]
        try:
            for h in held:
                h.sendall(b"hi")
                assert h.recv(2) == b"hi"
            with _connect(path) as c:
                assert _recv_all(c) == b""  # the 7th from root: refused, not queued
            assert _as_nobody_echo(path) == b"nobody"
        finally:
            for h in held:
                h.close()
    with afunix.Server(sockdir / "s.sock", afunix.server.echo, model="thread") as plain:
        assert plain.uid_limit is None  # no cap unless asked for


def test_uid_limit_needs_connections_on_unix_sockets(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="datagram"):
        afunix.Server(
            sockdir / "d.sock",
            afunix.server.datagram_echo,
            type="dgram",
            model="thread",
            max_clients_per_uid=1,
        )
    with pytest.raises(afunix.UnsupportedFeature, match="Unix-domain"):
        afunix.Server(
            "tcp://127.0.0.1:0", afunix.server.echo, model="thread", max_clients_per_uid=1
        )
    with pytest.raises(ValueError, match="at least 1"):
        afunix.Server(sockdir / "z.sock", afunix.server.echo, model="thread", max_clients_per_uid=0)


def test_uid_limit_drops_clients_that_hung_up_before_accept(sockdir: Path) -> None:
    """With a per-uid cap, a client that connected and closed again before it was
    accepted, sending nothing, gets no handler (a connect-and-close flood costs one
    recv each); one that only shut down its writing side is still served."""
    path = sockdir / "h.sock"
    gate = threading.Event()
    calls = [0]

    def handler(conn: afunix.Connection) -> None:
        calls[0] += 1
        if calls[0] == 1:
            gate.wait(10)  # holds the only slot: the next clients wait in the queue
        conn.send(b"hello")

    srv = afunix.Server(path, handler, model="thread", max_clients=1, max_clients_per_uid=5)
    with srv.start():
        first = _connect(path)
        try:
            _wait(lambda: calls[0] == 1)
            for _ in range(20):
                _connect(path).close()
            half = _connect(path)
            half.shutdown(socket.SHUT_WR)  # still reading: waits for the greeting
            gate.set()
            assert _recv_all(first) == b"hello"
            assert _recv_all(half) == b"hello"
            half.close()
        finally:
            gate.set()
            first.close()
        assert (srv.hung_up, calls[0]) == (20, 2)


NPROC_SERVER = textwrap.dedent(
    """
    import logging, resource, sys, afunix
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    room = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NPROC, (room, room))
    afunix.Server(sys.argv[1], afunix.server.echo, model="thread", mode=0o666).serve_forever()
    """
)


def _tasks_of(uid: int) -> int:
    """Tasks (threads included) of *uid* on the system: what RLIMIT_NPROC counts."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid:
            total += int(fields["Threads"])
    return total


def test_thread_model_under_a_real_rlimit_nproc(sockdir: Path) -> None:
    """A thread-model server as a uid of its own whose RLIMIT_NPROC leaves room for
    about 3 threads (counting the tasks that uid has when it starts); 30 idle clients:
    the ones past the limit are closed, the server stays up, logs once, and serves
    again once threads end (RLIMIT_NPROC is not enforced for root, hence another uid;
    not 65534, whose task count moves with whatever else runs as nobody, such as the
    other core's run of this suite beside this one)."""
    uid = 200_000 + os.getpid()  # no account: only this test's server runs as it
    home = sockdir / "nproc"
    home.mkdir()
    os.chown(home, uid, uid)
    path = home / "n.sock"
    room = _tasks_of(uid) + 4  # the server's main thread, and 3 more
    as_uid = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    proc = subprocess.Popen(
        [*as_uid, sys.executable, "-c", NPROC_SERVER, str(path), str(room)],
        stderr=subprocess.PIPE,
    )
    held: list[socket.socket] = []
    try:
        wait_for_path(path)
        with _connect(path) as c:  # serving: its accept loop runs
            c.sendall(b"up")
            assert c.recv(2) == b"up"
        served = refused = 0
        for _ in range(30):
            c = _connect(path)
            held.append(c)
            try:
                c.sendall(b"hi")
                answer = c.recv(2)
            except (BrokenPipeError, ConnectionResetError):
                # Refused before our "hi" went (EPIPE), or closed with it unread.
                answer = b""
            if answer == b"hi":
                served += 1
            else:
                refused += 1
        assert refused > 0 and proc.poll() is None, (served, refused)
        for c in held:
            c.close()
        held.clear()
        deadline = time.monotonic() + 20
        while True:  # threads end as their clients leave: room again
            with _connect(path) as c:
                c.sendall(b"again")
                c.shutdown(socket.SHUT_WR)
                if _recv_all(c) == b"again":
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        for c in held:
            c.close()
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    print(f"RLIMIT_NPROC: {served} clients served, {refused} refused")
    assert err.count("cannot start a thread") == 1, err
