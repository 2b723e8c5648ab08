"""Per-connection limits and misbehaving peers: only the offender is closed (issue 5, section 2)."""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import afunix
from afunix.server import Limits

from ..conftest import wait_for_path

MODELS = ["asyncio", "thread"]


def _recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _echo_handler(model: str) -> object:
    if model == "asyncio":

        async def aecho(conn: afunix.AsyncConnection) -> None:
            while data := await conn.recv():
                await conn.send(data)

        return aecho

    def echo(conn: afunix.Connection) -> None:
        while data := conn.recv():
            conn.send(data)

    return echo


def answering(
    reply: Callable[[afunix.Message], bytes | None],
) -> Callable[[afunix.Connection], None]:
    """A thread/fork handler: for each message on the connection's channel, send
    ``reply(msg)`` back (unless ``None``), then close the message."""

    def handler(conn: afunix.Connection) -> None:
        with conn.channel() as chan:
            for msg in chan:
                with msg:
                    answer = reply(msg)
                    if answer is not None:
                        chan.send(answer)

    return handler


def _closed_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "closed connection from" in r.getMessage()]


@pytest.mark.parametrize("model", MODELS)
def test_idle_client_is_closed_and_logged_once(
    sockdir: Path, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "idle.sock"
    limits = Limits(idle_timeout=0.2)
    with afunix.Server(path, _echo_handler(model), model=model, limits=limits) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(path) as idle, afunix.connect(path) as busy:
            t0 = time.monotonic()
            for _ in range(5):  # the busy client keeps talking past the idle timeout
                busy.sendall(b"ping")
                assert busy.recv(10) == b"ping"
                time.sleep(0.06)
            assert _recv_until_closed(idle) == b""
            assert 0.15 < time.monotonic() - t0 < 3
            busy.sendall(b"still here")
            assert busy.recv(100) == b"still here"
    logs = _closed_logs(caplog)
    assert len(logs) == 1, logs
    assert f"pid {os.getpid()} uid {os.getuid()}" in logs[0]
    assert "idle for more than 0.2s" in logs[0]


@pytest.mark.parametrize("model", MODELS)
def test_client_that_never_reads_is_closed_after_send_timeout(
    sockdir: Path, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "hog.sock"
    big = b"x" * (8 << 20)

    if model == "asyncio":

        async def handler(conn: afunix.AsyncConnection) -> None:
            await conn.recv()
            await conn.send(big)  # far more than the socket buffers hold

        h: object = handler
    else:

        def sync_handler(conn: afunix.Connection) -> None:
            conn.recv()
            conn.send(big)

        h = sync_handler
    with afunix.Server(path, h, model=model, limits=Limits(send_timeout=0.3)) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(path) as hog:
            hog.sendall(b"give me everything")
            time.sleep(1.0)  # never read while the server tries to send
            got = _recv_until_closed(hog)
            assert 0 < len(got) < len(big)  # cut off, not delivered in full
    logs = _closed_logs(caplog)
    assert len(logs) == 1 and "did not read for more than 0.3s" in logs[0], logs


@pytest.mark.parametrize("model", MODELS)
def test_garbage_frames_close_only_that_connection(
    sockdir: Path, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "msg.sock"

    if model == "asyncio":

        async def handler(conn: afunix.AsyncConnection) -> None:
            chan = conn.channel()
            while True:
                try:
                    msg = await chan.recv()
                except EOFError:
                    return
                with msg:
                    await chan.send(bytes(msg.data), fds=msg.fds)

        h: object = handler
    else:

        def sync_handler(conn: afunix.Connection) -> None:
            with conn.channel() as chan:
                for msg in chan:
                    with msg:
                        chan.send(bytes(msg.data), fds=msg.fds)

        h = sync_handler
    with afunix.Server(path, h, model=model) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(path) as bad, afunix.Channel.connect(path) as good:
            bad.sendall(b"\xde\xad\xbe\xef garbage that is no afunix frame" * 4)
            assert _recv_until_closed(bad) == b""
            with open("/etc/hostname", "rb") as f:
                good.send(b"with a file", fds=[f])
            with good.recv() as reply:
                assert reply.data == b"with a file" and len(reply.fds) == 1
    logs = _closed_logs(caplog)
    assert len(logs) == 1, logs
    assert "uid" in logs[0]


def test_too_many_descriptors_in_one_message(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "fds.sock"
    got: list[int] = []

    handler = answering(lambda msg: got.append(len(msg.fds)))
    limits = Limits(max_fds_per_message=4)
    with afunix.Server(path, handler, model="thread", limits=limits) as srv:
        srv.start()
        files = [open("/dev/null", "rb") for _ in range(5)]  # noqa: SIM115
        try:
            with afunix.Channel.connect(path) as c:
                c.send(b"four", fds=files[:4])
                c.send(b"five", fds=files)
                assert _recv_until_closed(c.socket) == b""
        finally:
            for f in files:
                f.close()
    assert got == [4]
    logs = _closed_logs(caplog)
    assert len(logs) == 1 and "descriptor" in logs[0], logs


FLOOD_SERVER = textwrap.dedent(
    """
    import sys, afunix
    from afunix.server import Limits

    def handler(conn):
        with conn.channel() as chan:
            for msg in chan:
                with msg:
                    chan.send(b"ok %d" % len(msg.fds))

    srv = afunix.Server(sys.argv[1], handler, model="thread", max_clients=8,
                        limits=Limits(idle_timeout=2.0))
    srv.serve_forever()
    """
)


def test_descriptor_flood_under_a_tight_rlimit(sockdir: Path) -> None:
    """Messages full of descriptors, against a server whose RLIMIT_NOFILE is just
    above its needs: afterwards a well-behaved client is served and the server's
    descriptor count is back to its baseline."""
    path = sockdir / "flood.sock"
    proc = subprocess.Popen([sys.executable, "-c", FLOOD_SERVER, str(path)], stderr=subprocess.PIPE)
    try:
        wait_for_path(path)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (40, 40))
        with afunix.Channel.connect(path) as c:
            c.send(b"hello")
            assert c.recv().data == b"ok 0"
        time.sleep(0.1)
        baseline = len(os.listdir(f"/proc/{proc.pid}/fd"))
        files = [open("/dev/null", "rb") for _ in range(16)]  # noqa: SIM115
        flooders = []
        try:
            for _ in range(6):
                ch = afunix.Channel.connect(path)
                flooders.append(ch)
                for _ in range(20):
                    try:
                        ch.send(b"flood", fds=files)
                    except OSError:
                        break
        finally:
            for f in files:
                f.close()
            for ch in flooders:
                ch.close()
        with afunix.Channel.connect(path, timeout=5) as c:
            c.send(b"well-behaved")
            assert c.recv().data == b"ok 0"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = len(os.listdir(f"/proc/{proc.pid}/fd"))
            if now == baseline:
                break
            time.sleep(0.05)
        assert now == baseline
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_descriptors_in_flight_are_bounded(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A handler that keeps messages open: past max_fds_in_flight the peer is cut off."""
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "inflight.sock"
    kept: list[afunix.Message] = []

    def handler(conn: afunix.Connection) -> None:
        with conn.channel() as chan:
            try:
                for msg in chan:
                    kept.append(msg)  # held open: its descriptors stay in flight
                    chan.send(b"held %d" % len(kept))
            finally:
                for m in kept:
                    m.close()

    limits = Limits(max_fds_per_message=4, max_fds_in_flight=10)
    with afunix.Server(path, handler, model="thread", limits=limits) as srv:
        srv.start()
        files = [open("/dev/null", "rb") for _ in range(4)]  # noqa: SIM115
        try:
            with afunix.Channel.connect(path) as c:
                for i in range(2):  # 8 in flight: allowed
                    c.send(b"x", fds=files)
                    assert c.recv().data == b"held %d" % (i + 1)
                c.send(b"x", fds=files)  # 12 > 10: refused, connection closed
                with pytest.raises(EOFError):
                    c.recv()
        finally:
            for f in files:
                f.close()
    logs = _closed_logs(caplog)
    assert len(logs) == 1 and "in flight" in logs[0] and "ETOOMANYREFS" in logs[0], logs


def test_in_flight_count_goes_down_as_messages_are_closed_or_taken() -> None:
    a, b = afunix.Channel.pair(max_fds_in_flight=2)
    with a, b, open("/dev/null", "rb") as f:
        for _ in range(5):  # each message released before the next: never above 2
            a.send(b"one", fds=[f, f])
            with b.recv() as msg:
                os.close(msg.take_fd(0))
        a.send(b"two", fds=[f])
        a.send(b"three", fds=[f, f])
        first = b.recv()
        with pytest.raises(afunix.ProtocolError, match="at most 2 may be in flight"):
            b.recv()
        first.close()
        a.send(b"four", fds=[f, f])
        with b.recv() as msg:
            assert len(msg.fds) == 2


def test_sync_channel_gives_up_after_the_idle_timeout(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The channel's receive keeps the idle timeout and its sends the send timeout (a
    channel used to get the shorter of the two as a socket timeout, both ways)."""
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "ct.sock"

    handler = answering(lambda msg: b"ok")
    with afunix.Server(
        path, handler, model="thread", limits=Limits(idle_timeout=0.2, send_timeout=30)
    ) as srv:
        srv.start()
        with afunix.Channel.connect(path) as c:
            c.send(b"hi")
            assert c.recv().data == b"ok"
            t0 = time.monotonic()
            with pytest.raises(EOFError):
                c.recv()  # we stay silent; the server gives up after 0.2 s
            assert time.monotonic() - t0 < 3
    logs = _closed_logs(caplog)
    assert len(logs) == 1 and "idle_timeout=0.2 s" in logs[0] and "ETIMEDOUT" in logs[0], logs


def test_oversized_message_closes_only_that_connection(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "big.sock"

    handler = answering(lambda msg: b"got %d" % len(msg.data))
    with afunix.Server(path, handler, model="thread", limits=Limits(max_message=1000)) as srv:
        srv.start()
        with afunix.Channel.connect(path) as big, afunix.Channel.connect(path) as small:
            big.send(b"y" * 1001)
            with pytest.raises(EOFError):
                big.recv()
            small.send(b"z" * 1000)
            assert small.recv().data == b"got 1000"
    logs = _closed_logs(caplog)
    assert len(logs) == 1 and "1001" in logs[0], logs


FORK_BOUNDED = textwrap.dedent(
    """
    import os, sys, time, afunix

    def handler(conn):
        conn.recv()
        time.sleep(0.3)
        conn.send(b"%d" % os.getpid())

    afunix.Server(sys.argv[1], handler, model="fork", max_clients=2).serve_forever()
    """
)


def test_fork_model_bounds_children_and_queues_the_rest(sockdir: Path) -> None:
    path = sockdir / "fb.sock"
    proc = subprocess.Popen([sys.executable, "-c", FORK_BOUNDED, str(path)])
    try:
        wait_for_path(path)
        clients = [afunix.connect(path, timeout=5) for _ in range(6)]
        t0 = time.monotonic()
        try:
            for c in clients:
                c.sendall(b"go")
            peak = 0
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # count the server's children meanwhile
                try:
                    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                        peak = max(peak, len(f.read().split()))
                except FileNotFoundError:
                    break
                time.sleep(0.01)
            replies = [_recv_until_closed(c, 10) for c in clients]
        finally:
            for c in clients:
                c.close()
        assert all(r.isdigit() for r in replies)
        assert peak == 2
        assert time.monotonic() - t0 >= 0.85  # three waves of two, 0.3 s each
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("model", [*MODELS, "fork"])
def test_a_connection_channel_keeps_the_servers_idle_timeout(sockdir: Path, model: str) -> None:
    """``conn.channel()`` gets ``Limits.idle_timeout`` as its own: a silent client makes
    ``recv`` raise ``PeerTimeout`` (``expired == "idle"``) and the channel stays usable
    (it used to get a socket timeout: a bare ``TimeoutError``, and none under asyncio)."""
    path = sockdir / "idle.sock"

    if model == "asyncio":

        async def handler(conn: afunix.AsyncConnection) -> None:
            async with conn.channel() as chan:
                try:
                    await chan.recv()
                except afunix.PeerTimeout as exc:
                    await chan.send(f"{type(exc).__name__} {exc.expired}".encode())

        h: object = handler
    else:

        def sync_handler(conn: afunix.Connection) -> None:
            with conn.channel() as chan:
                try:
                    chan.recv()
                except afunix.PeerTimeout as exc:
                    chan.send(f"{type(exc).__name__} {exc.expired}".encode())

        h = sync_handler
    limits = Limits(idle_timeout=0.3)
    with afunix.Server(path, h, model=model, limits=limits) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.Channel.connect(path) as chan:
            started = time.monotonic()
            assert chan.recv(timeout=20).data == b"PeerTimeout idle"
            assert time.monotonic() - started >= 0.25
