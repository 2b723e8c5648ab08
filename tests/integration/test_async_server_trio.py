"""``AsyncServer``, ``AsyncConnection`` and ``AsyncChannel`` under trio (issue 14).

Each test is one anyio program run under both runtimes (the ``runtime``
fixture: asyncio and trio), so the two runners (``server._async`` and
``server._trio``) are held to the same behaviour. Real sockets in short temp
dirs, a real uid-65534 client (setpriv), descriptors checked by inode and the
process's descriptor table checked before and after. The only fake is the
``EMFILE`` of one test, injected by the listening socket's ``accept``. Every
program is bounded by ``anyio.fail_after`` and waits on conditions.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import afunix
from afunix.server import AsyncConnection, AsyncServer, Datagram, async_echo

from ..conftest import NOBODY, NOBODY_CLIENT, open_fds

LIMIT = 30.0  # seconds any one program may take


def _run(
    runtime: str, main: Callable[[], Awaitable[None]], before: dict[int, str] | None = None
) -> None:
    """Run *main* under *runtime*; the descriptors open before (or *before*) are all
    that is open after."""

    async def bounded() -> None:
        with anyio.fail_after(LIMIT):
            await main()

    if before is None:
        before = open_fds()
    anyio.run(bounded, backend=runtime)
    assert open_fds() == before


async def _until(pred: Callable[[], object], what: str) -> None:
    """Wait (looking every 10 ms, without blocking the loop) until *pred* holds."""
    with anyio.fail_after(10):
        while not pred():
            await anyio.sleep(0.01)
    assert pred(), what


async def _echo(path: Path, data: bytes = b"ping") -> bytes:
    """One connection: send *data*, read as many bytes back, close."""
    async with await anyio.connect_unix(path) as stream:
        await stream.send(data)
        got = b""
        while len(got) < len(data):
            got += await stream.receive()
        return got


def test_policy_refuses_nobody_serves_root_and_passes_descriptors(
    sockdir: Path, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server (policy: uid 0) started with ``await tg.start(...)``: uid 65534 is
    refused before the handler and logged; root sends a file through the
    connection's AsyncChannel and gets another one back, both checked by inode."""
    caplog.set_level(logging.WARNING, logger="afunix.server")
    path = sockdir / "app.sock"
    secret = sockdir / "secret.txt"
    secret.write_bytes(b"from the server")
    upload = sockdir / "upload.txt"
    upload.write_bytes(b"from the client")
    seen: list[tuple[int, int]] = []
    ready: list[AsyncServer] = []

    async def handle(conn: AsyncConnection) -> None:
        uid = conn.credentials.uid
        async with conn.channel() as chan:
            async for msg in chan:
                with msg:
                    inode = os.fstat(msg.fds[0]).st_ino
                seen.append((uid, inode))
                with open(secret, "rb") as f:
                    await chan.send(str(inode).encode(), [f])

    async def main() -> None:
        policy = afunix.PeerPolicy(uids=[0])
        async with (
            AsyncServer(path, handle, policy=policy, mode=0o666, on_ready=ready.append) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            assert ready == [server]
            nobody = await anyio.run_process(
                [*NOBODY, sys.executable, "-c", NOBODY_CLIENT, str(path)]
            )
            assert nobody.stdout == b"refused\n", nobody.stderr
            assert server.rejected == 1 and server.served == 0

            async with await afunix.AsyncChannel.connect(path) as chan:
                with open(upload, "rb") as f:
                    await chan.send(b"take this", [f])
                with await chan.recv() as reply:
                    assert int(reply.data) == os.stat(upload).st_ino
                    got = reply.take_fd(0)
            try:
                assert os.fstat(got).st_ino == os.stat(secret).st_ino
                assert os.pread(got, 100, 0) == b"from the server"
            finally:
                os.close(got)
            await _until(lambda: server.served == 1, "served root")
            server.shutdown()
        assert not path.exists()

    _run(runtime, main)
    assert seen == [(0, os.stat(upload).st_ino)]
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert len(refusals) == 1 and "uid 65534" in refusals[0], refusals


def test_shutdown_from_a_thread_drains_then_removes_the_path(sockdir: Path, runtime: str) -> None:
    """Three clients mid-conversation; shutdown() from another thread: the file goes
    at once (new clients get ENOENT), the three finish, then serve_forever returns."""
    path = sockdir / "s.sock"
    ended: list[str] = []

    async def handle(conn: AsyncConnection) -> None:
        await async_echo(conn)
        ended.append("finished")

    async def main() -> None:
        returned = anyio.Event()
        async with AsyncServer(path, handle, shutdown_timeout=20) as server:

            async def serve() -> None:
                await server.serve_forever()
                returned.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                await _until(path.exists, "bound")
                streams = [await anyio.connect_unix(path) for _ in range(3)]
                for i, s in enumerate(streams):
                    await s.send(b"before %d" % i)
                    assert await s.receive() == b"before %d" % i
                await _until(lambda: server.served == 3, "three served")
                threading.Thread(target=server.shutdown).start()
                await _until(lambda: not path.exists(), "the socket file is removed at once")
                with pytest.raises(afunix.NoSuchSocket):
                    afunix.connect(path)
                assert not returned.is_set()  # still draining: three connections in flight
                for i, s in enumerate(streams):
                    await s.send(b"after! %d" % i)
                    assert await s.receive() == b"after! %d" % i
                    await s.aclose()
            assert returned.is_set()

    _run(runtime, main)
    assert ended == ["finished"] * 3


def test_drain_cancels_what_outlives_the_shutdown_timeout(
    sockdir: Path, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="afunix.server")
    path = sockdir / "slow.sock"
    ended: list[str] = []

    async def handle(conn: AsyncConnection) -> None:
        try:
            await async_echo(conn)
        finally:
            ended.append("ended")

    async def main() -> None:
        async with (
            AsyncServer(path, handle, shutdown_timeout=0.2) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            async with await anyio.connect_unix(path) as stream:
                await stream.send(b"x")
                assert await stream.receive() == b"x"
                server.shutdown()  # the client stays silent: cancelled after 0.2 s
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()

    _run(runtime, main)
    assert ended == ["ended"]
    assert any("cancelled 1 connections" in r.getMessage() for r in caplog.records)


def test_cancelling_the_serve_task_closes_everything(sockdir: Path, runtime: str) -> None:
    """A cancel scope around serve_forever, a client mid-conversation: the handler is
    cancelled and finishes its clean-up first, the client sees end of file, the
    listener and its file are gone, and no descriptor is left (checked by _run)."""
    path = sockdir / "c.sock"
    cleaned: list[bool] = []

    async def handle(conn: AsyncConnection) -> None:
        try:
            await async_echo(conn)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)  # a clean-up that awaits
            cleaned.append(True)

    async def main() -> None:
        server = AsyncServer(path, handle)
        async with await anyio.connect_unix(path) as stream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve_forever)
                await stream.send(b"hello")
                assert await stream.receive() == b"hello"
                tg.cancel_scope.cancel()
            assert cleaned == [True]
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
        assert not path.exists()
        assert server.sock.fileno() == -1

    _run(runtime, main)


def test_aclose_from_a_handler_of_the_server_does_not_wait_for_itself(
    sockdir: Path, runtime: str
) -> None:
    path = sockdir / "quit.sock"

    async def main() -> None:
        async def handle(conn: AsyncConnection) -> None:
            while chunk := await conn.recv():
                if chunk == b"quit":
                    await server.aclose()
                await conn.send(chunk)

        server = AsyncServer(path, handle, shutdown_timeout=20)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve_forever)
                assert await _echo(path, b"quit") == b"quit"
        assert not path.exists()

    _run(runtime, main)


ROUNDS = 300


def test_shutdown_from_a_thread_racing_the_start_of_serving(sockdir: Path, runtime: str) -> None:
    """300 rounds: shutdown() from a thread started as serve_forever begins; every
    round ends and removes the file (never a server deaf to its stop request)."""
    path = sockdir / "race.sock"
    ended = 0

    async def main() -> None:
        nonlocal ended
        for i in range(ROUNDS):
            server = AsyncServer(path, async_echo)
            stopper = threading.Thread(target=server.shutdown)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(server.serve_forever)
                    stopper.start()
                    for _ in range(i % 4):
                        await anyio.lowlevel.checkpoint()
            stopper.join()
            assert not path.exists(), f"round {i}"
            ended += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _run(runtime, main)
    finally:
        sys.setswitchinterval(interval)
    assert ended == ROUNDS


def test_max_clients_serves_the_rest_in_turn(sockdir: Path, runtime: str) -> None:
    """max_clients=2 and five clients: never more than two handlers at once, all served."""
    path = sockdir / "max.sock"
    active = 0
    peak = 0

    async def handle(conn: AsyncConnection) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await async_echo(conn)
        finally:
            active -= 1

    async def main() -> None:
        async with (
            AsyncServer(path, handle, max_clients=2) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            results: list[bytes] = []

            async def client(i: int) -> None:
                results.append(await _echo(path, b"client %d" % i))

            async with anyio.create_task_group() as clients:
                for i in range(5):
                    clients.start_soon(client, i)
            assert sorted(results) == [b"client %d" % i for i in range(5)]
            server.shutdown()
            assert server.served == 5

    _run(runtime, main)
    assert peak == 2


def test_idle_timeout_ends_a_silent_client(
    sockdir: Path, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="afunix.server")
    path = sockdir / "idle.sock"

    async def main() -> None:
        limits = afunix.Limits(idle_timeout=0.2)
        async with (
            AsyncServer(path, async_echo, limits=limits) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            async with await anyio.connect_unix(path) as stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()  # the server hangs up on its silent client
            server.shutdown()

    _run(runtime, main)


def test_handle_signals_true_stops_on_sigterm(sockdir: Path, runtime: str) -> None:
    path = sockdir / "sig.sock"
    previous = signal.getsignal(signal.SIGTERM)

    async def main() -> None:
        async with (
            AsyncServer(path, async_echo, handle_signals=True) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            assert await _echo(path) == b"ping"
            os.kill(os.getpid(), signal.SIGTERM)
        assert not path.exists()

    _run(runtime, main)
    assert signal.getsignal(signal.SIGTERM) == previous  # given back


class _OutOfDescriptors(socket.socket):
    """A listener whose first three accepts of a waiting client fail with EMFILE."""

    failures = 3

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures and select.select([self], [], [], 0)[0]:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().accept()


def test_emfile_on_accept_pauses_and_serves_the_queued_client(
    sockdir: Path, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="afunix.server")
    path = sockdir / "emfile.sock"
    before = open_fds()
    listener = _OutOfDescriptors(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    async def main() -> None:
        async with (
            AsyncServer(path, async_echo, sock=listener) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            assert await _echo(path, b"after 3 EMFILEs") == b"after 3 EMFILEs"
            assert listener.failures == 0
            assert await _echo(path, b"and after") == b"and after"
            server.shutdown()
            assert server.served == 2

    try:
        _run(runtime, main, before)  # the server closes the listener it was given
    finally:
        path.unlink()  # ... but a given socket's file is the caller's
        listener.close()
    failed = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(failed) == 3, [r.getMessage() for r in failed]
    assert "Too many open files" in failed[0].getMessage()


def test_datagram_server_with_policy(sockdir: Path, runtime: str) -> None:
    """type="dgram": each datagram judged on its own credentials (nobody's dropped),
    the reply returned to the sender's bound address."""
    path = sockdir / "dg.sock"
    uids: list[int | None] = []

    async def upper(dgram: Datagram) -> bytes:
        uids.append(dgram.credentials.uid if dgram.credentials else None)
        return dgram.data.upper()

    def client() -> bytes:
        with afunix.connect(path, "dgram") as c:  # binds a private reply path
            c.settimeout(10)
            c.send(b"datagram")
            return c.recv(100)

    async def main() -> None:
        policy = afunix.PeerPolicy(uids=[0])
        async with (
            AsyncServer(path, upper, type="dgram", policy=policy, mode=0o666) as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(server.serve_forever)
            nobody = await anyio.run_process(
                [
                    *NOBODY,
                    sys.executable,
                    "-c",
                    "import socket, sys; s = socket.socket(socket.AF_UNIX, "
                    "socket.SOCK_DGRAM); s.sendto(b'me too', sys.argv[1])",
                    str(path),
                ]
            )
            assert nobody.returncode == 0
            assert await anyio.to_thread.run_sync(client) == b"DATAGRAM"
            await _until(lambda: server.rejected == 1, "nobody's datagram dropped")
            assert server.served == 1
            server.shutdown()

    _run(runtime, main)
    assert uids == [0]
    assert not path.exists()


def test_the_runtime_is_chosen_per_call_and_outside_both_is_an_error() -> None:
    a, b = afunix.AsyncChannel.pair()
    with a, b:

        async def roundtrip() -> None:
            await a.send(b"x")
            assert (await b.recv()).data == b"x"

        anyio.run(roundtrip, backend="trio")
        anyio.run(roundtrip, backend="asyncio")
        with (
            socket.socket(socket.AF_UNIX) as sock,
            pytest.raises(RuntimeError, match="asyncio or trio"),
        ):
            AsyncConnection(sock, afunix.Address.parse("@x"), None)
