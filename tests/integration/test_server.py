"""Server: three concurrency models, stream/seqpacket/datagram, shutdown, reaping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import afunix
from afunix.server import echo_handler

from ..conftest import wait_for_path

MODELS = ["asyncio", "thread", "fork"]


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # Bytes: a process name (comm) can be any bytes, not UTF-8 (seen: 0xff).
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("sock_type", ["stream", "seqpacket"])
def test_echo_every_model(sockdir: Path, model: str, sock_type: str) -> None:
    path = sockdir / "e.sock"
    st = afunix._sockets.socket_type(sock_type)
    with afunix.Server(path, echo_handler(model, st), type=sock_type, model=model) as srv:  # type: ignore[arg-type]
        srv.start()
        clients = [afunix.connect(path, sock_type) for _ in range(5)]
        try:
            for i, c in enumerate(clients):
                c.sendall(f"msg {i}".encode())
            for i, c in enumerate(clients):
                assert c.recv(100) == f"msg {i}".encode()
        finally:
            for c in clients:
                # shutdown, not just close: a fork-model child forked from this very
                # process inherited copies of these client sockets, so only shutdown
                # makes its connection see end of file.
                c.shutdown(socket.SHUT_WR)
                c.close()
    assert not path.exists()


@pytest.mark.parametrize("model", MODELS)
def test_datagram_echo_every_model(sockdir: Path, model: str) -> None:
    path = sockdir / "d.sock"
    handler = echo_handler(model, socket.SOCK_DGRAM)  # type: ignore[arg-type]
    with afunix.Server(path, handler, type="dgram", model=model) as srv:
        srv.start()
        with afunix.connect(path, "dgram") as a, afunix.connect(path, "dgram") as b:
            a.send(b"from a")
            b.send(b"from b")
            a.settimeout(5)
            b.settimeout(5)
            assert a.recv(100) == b"from a"  # each reply goes to its own sender
            assert b.recv(100) == b"from b"


def test_datagram_from_unbound_client_gets_no_reply_and_server_survives(sockdir: Path) -> None:
    path = sockdir / "d.sock"
    with afunix.Server(path, afunix.server.datagram_echo, type="dgram", model="thread") as srv:
        srv.start()
        with afunix.connect(path, "dgram", bind=None) as mute:
            mute.send(b"nobody can answer me")
        with afunix.connect(path, "dgram") as ok:
            ok.settimeout(5)
            ok.send(b"hi")
            assert ok.recv(10) == b"hi"


def test_handler_exception_does_not_stop_the_server(sockdir: Path) -> None:
    path = sockdir / "boom.sock"

    def handler(conn: afunix.Connection) -> None:
        data = conn.recv()
        if data == b"boom":
            raise RuntimeError("handler failure on purpose")
        conn.send(data)

    with afunix.Server(path, handler, model="thread") as srv:
        srv.start()
        with afunix.connect(path) as bad:
            bad.sendall(b"boom")
            assert bad.recv(10) == b""  # closed by the server after the failure
        with afunix.connect(path) as good:
            good.sendall(b"fine")
            assert good.recv(10) == b"fine"


def test_async_handler_exception_does_not_stop_the_server(sockdir: Path) -> None:
    path = sockdir / "aboom.sock"

    async def handler(conn: afunix.AsyncConnection) -> None:
        data = await conn.recv()
        if data == b"boom":
            raise RuntimeError("async failure on purpose")
        await conn.send(data)

    with afunix.Server(path, handler) as srv:
        srv.start()
        with afunix.connect(path) as bad:
            bad.sendall(b"boom")
            assert bad.recv(10) == b""
        with afunix.connect(path) as good:
            good.sendall(b"fine")
            assert good.recv(10) == b"fine"


@pytest.mark.parametrize("model", MODELS)
def test_verify_rejects_before_the_handler(sockdir: Path, model: str) -> None:
    path = sockdir / "v.sock"
    count = [0]

    def verify(sock: socket.socket, peer: afunix.Address) -> bool:
        count[0] += 1
        return count[0] % 2 == 0  # refuse every other client

    if model == "asyncio":

        async def handler(conn: afunix.AsyncConnection) -> None:
            await conn.send(b"served")

        h: object = handler
    else:

        def sync_handler(conn: afunix.Connection) -> None:
            conn.send(b"served")

        h = sync_handler
    with afunix.Server(path, h, model=model, verify=verify) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(path) as refused:
            assert refused.recv(10) == b""  # closed unseen by the handler
        with afunix.connect(path) as served:
            assert served.recv(10) == b"served"
        assert srv.rejected == 1


def test_model_and_handler_must_match(sockdir: Path) -> None:
    with pytest.raises(TypeError, match="needs an 'async def' handler"):
        afunix.Server(sockdir / "a.sock", afunix.server.echo)
    with pytest.raises(TypeError, match="needs a plain function"):
        afunix.Server(sockdir / "a.sock", afunix.server.async_echo, model="thread")
    with pytest.raises(ValueError, match="unknown model"):
        afunix.Server(sockdir / "a.sock", afunix.server.echo, model="green")  # type: ignore[arg-type]
    assert not (sockdir / "a.sock").exists()


def test_thread_model_bounds_clients(sockdir: Path) -> None:
    path = sockdir / "m.sock"
    active = [0]
    peak = [0]
    lock = threading.Lock()

    def handler(conn: afunix.Connection) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        conn.send(b"ok")
        with lock:
            active[0] -= 1

    with afunix.Server(path, handler, model="thread", max_clients=2) as srv:
        srv.start()
        clients = [afunix.connect(path) for _ in range(6)]
        try:
            for c in clients:
                c.settimeout(10)
                assert c.recv(10) == b"ok"
        finally:
            for c in clients:
                c.close()
    assert peak[0] == 2


def test_shutdown_lets_in_flight_connections_finish(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    started = threading.Event()

    def slow(conn: afunix.Connection) -> None:
        started.set()
        time.sleep(0.3)
        conn.send(b"finished")

    srv = afunix.Server(path, slow, model="thread", shutdown_timeout=5).start()
    with afunix.connect(path) as c:
        assert started.wait(5)
        srv.stop()
        assert c.recv(100) == b"finished"
    assert not path.exists()


def test_shutdown_is_bounded(sockdir: Path) -> None:
    path = sockdir / "h.sock"

    def hang(conn: afunix.Connection) -> None:
        conn.recv()  # returns only when the server shuts the socket down

    srv = afunix.Server(path, hang, model="thread", shutdown_timeout=0.2).start()
    with afunix.connect(path):
        time.sleep(0.05)
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 3


FORK_SERVER = textwrap.dedent(
    """
    import sys, time, afunix

    def handler(conn):
        data = conn.recv()
        time.sleep(float(data or b"0"))
        conn.send(b"done")

    srv = afunix.Server(sys.argv[1], handler, model="fork", shutdown_timeout=5)
    print("ready", flush=True)
    srv.serve_forever()
    """
)


def test_fork_model_reaps_children_and_stops_on_sigterm(sockdir: Path) -> None:
    path = sockdir / "f.sock"
    proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        for _ in range(10):
            with afunix.connect(path) as c:
                c.sendall(b"0")
                assert c.recv(10) == b"done"
        # SIGCHLD + waitpid(WNOHANG): no zombie children remain.
        deadline = time.monotonic() + 5
        while _children_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _children_of(proc.pid) == []
        # An in-flight client is let finish when SIGTERM arrives.
        with afunix.connect(path) as slow:
            slow.sendall(b"0.3")
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            slow.settimeout(5)
            assert slow.recv(10) == b"done"
        assert proc.wait(10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_fork_model_child_does_not_remove_the_socket_file(sockdir: Path) -> None:
    path = sockdir / "keep.sock"
    proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(path)], stdout=subprocess.PIPE)
    try:
        wait_for_path(path)
        for _ in range(3):
            with afunix.connect(path) as c:
                c.sendall(b"0")
                assert c.recv(10) == b"done"
        time.sleep(0.1)
        assert path.exists()  # the children closed the listener without unlinking it
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert not path.exists()


def test_asyncio_server_in_main_thread_stops_on_sigterm(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    code = (
        "import sys, afunix\n"
        "from afunix.server import async_echo\n"
        "afunix.Server(sys.argv[1], async_echo).serve_forever()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    try:
        wait_for_path(path)
        with afunix.connect(path) as c:
            c.sendall(b"x")
            assert c.recv(10) == b"x"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_over_tcp() -> None:
    with afunix.Server("tcp://127.0.0.1:0", afunix.server.echo, model="thread") as srv:
        srv.start()
        with afunix.connect(srv.address) as c:
            c.sendall(b"tcp echo")
            assert c.recv(100) == b"tcp echo"


@pytest.mark.parametrize("default", [None, 0.2])
def test_thread_model_connections_block_whatever_the_default_timeout(
    sockdir: Path, default: float | None
) -> None:
    """Each client's socket is blocking in the handler (no timeout, no O_NONBLOCK),
    with or without ``socket.setdefaulttimeout`` (which accept's new socket takes):
    a message that comes after the default timeout still arrives (the server makes
    it blocking only where it may not be)."""
    path = sockdir / "block.sock"
    seen: list[tuple[float | None, bool]] = []

    def handler(conn: afunix.Connection) -> None:
        seen.append((conn.sock.gettimeout(), os.get_blocking(conn.sock.fileno())))
        conn.send(conn.recv())

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(default)
    try:
        with afunix.Server(path, handler, model="thread") as srv:
            srv.start()
            with afunix.connect(path) as client:
                client.settimeout(30)
                # past the default timeout (the handler waits for it all the same)
                timer = threading.Timer(0.5, client.sendall, (b"late",))
                timer.start()
                try:
                    assert client.recv(10) == b"late"
                finally:
                    timer.join()
    finally:
        socket.setdefaulttimeout(old)
    assert seen == [(None, True)]


SIGCHLD_RACE = textwrap.dedent(
    """
    import faulthandler, os, signal, time
    from afunix.server._admission import Admission
    from afunix.server._threads import ForkRunner

    adm = Admission(policy=None, verify=None, max_clients=None, max_clients_per_uid=None,
                    refuse_with=b"", fork=True)
    adm.tls = object()  # a tls:// server

    class SlowCounts(dict):  # widens the window inside the count (timing only)
        def get(self, *a):
            time.sleep(0.3)
            return dict.get(self, *a)

    adm.refusals.counts = adm.refused = SlowCounts()
    runner = object.__new__(ForkRunner)
    runner.admission = adm
    runner._setup()
    for delay in (0.0, 0.1):  # two children that refused their TLS client (exit 76)
        pid = os.fork()
        if pid == 0:
            time.sleep(delay)
            os._exit(76)
        runner._children.add(pid)
    time.sleep(0.05)  # the first has ended; the second ends while the loop counts
    signal.signal(signal.SIGCHLD, lambda *_: runner._reap())  # as ForkRunner.run does
    faulthandler.dump_traceback_later(20, exit=True)
    while runner._children:
        runner._reap()  # the accept loop's turn
        runner._count_refusals()
        time.sleep(0.01)
    runner._count_refusals()
    print(adm.rejected, dict(adm.refused))
    """
)


def test_fork_model_counts_refusals_outside_the_sigchld_handler() -> None:
    """A child's refusal is counted by the accept loop, not in the SIGCHLD handler:
    the handler interrupting the loop while it counts (under the count's lock) once
    deadlocked the server (a second refused child ending at that moment)."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGCHLD_RACE], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "2 {'tls-handshake': 2}"
