"""``AsyncServer``: an afunix server embedded in the caller's event loop (issue 14).

What is asyncio's own is here (a program's tasks and queue beside the server, the loop's
signal handlers and readers, ``asyncio.Runner``); what both runtimes do alike (policy,
drain, cancellation, EMFILE, datagrams, max_clients) runs under asyncio and trio in
``test_async_server_trio.py``.

Real sockets in short temp dirs, a real uid-65534 client (setpriv), real
descriptors checked by inode. The only fake is the ``EMFILE`` of one test,
injected by the listening socket's ``accept``. Each program is bounded by
``asyncio.timeout`` (and pytest-timeout), and waits on conditions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import afunix
from afunix.server import AsyncConnection, AsyncServer, async_echo

from ..conftest import NOBODY, NOBODY_CLIENT, open_fds

LIMIT = 30.0  # seconds any one program may take
DOCS = Path(__file__).parents[2] / "docs" / "servers.md"


async def _echo(path: Path, data: bytes = b"ping") -> bytes:
    """One connection: send *data*, read as many bytes back, close."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        return await reader.readexactly(len(data))
    finally:
        writer.close()
        await writer.wait_closed()


async def _until(pred: Callable[[], object], what: str) -> None:
    """Wait (looking every 10 ms, without blocking the loop) until *pred* holds."""
    async with asyncio.timeout(10):
        while not pred():
            await asyncio.sleep(0.01)
    assert pred(), what


def _run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(LIMIT):
            await main()

    asyncio.run(bounded())


# ------------------------------------------- an asyncio program embeds a server


def test_embedded_server_refuses_nobody_serves_root_and_passes_descriptors(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An asyncio program runs an AsyncServer (policy: uid 0) beside a task of its own.

    uid 65534 (setpriv) is refused before the handler and logged; root is served
    in the same loop: it sends a file through the connection's AsyncChannel and
    gets another one back, both checked by inode; the handler reports to the
    program's own task through a queue. Leaving ``async with`` drains, closes
    and removes the socket file.
    """
    caplog.set_level(logging.WARNING, logger="afunix.server")
    path = sockdir / "app.sock"
    secret = sockdir / "secret.txt"
    secret.write_bytes(b"from the server")
    upload = sockdir / "upload.txt"
    upload.write_bytes(b"from the client")
    seen: list[tuple[int, int]] = []

    async def main() -> None:
        reports: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        async def auditor() -> None:  # the program's own task
            while True:
                seen.append(await reports.get())

        async def handle(conn: AsyncConnection) -> None:
            uid = conn.credentials.uid
            async with conn.channel() as chan:
                async for msg in chan:
                    with msg:
                        inode = os.fstat(msg.fds[0]).st_ino
                    await reports.put((uid, inode))
                    with open(secret, "rb") as f:
                        await chan.send(str(inode).encode(), [f])

        policy = afunix.PeerPolicy(uids=[0])
        audit = asyncio.create_task(auditor())
        async with AsyncServer(path, handle, policy=policy, mode=0o666) as server:
            serving = asyncio.create_task(server.serve_forever())
            nobody = await asyncio.create_subprocess_exec(
                *NOBODY,
                sys.executable,
                "-c",
                NOBODY_CLIENT,
                str(path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await nobody.communicate()
            assert (nobody.returncode, out) == (0, b"refused\n"), err
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
            await _until(lambda: seen, "the handler's report reached the program's task")
            assert server.served == 1
        assert serving.done() and serving.result() is None
        audit.cancel()
        await asyncio.gather(audit, return_exceptions=True)

    _run(main)
    assert seen == [(0, os.stat(upload).st_ino)]
    assert not path.exists()
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert len(refusals) == 1 and "uid 65534" in refusals[0], refusals


# ------------------------------------------------------------- shutdown()
def _ask_from_thread(server: AsyncServer) -> None:
    threading.Thread(target=server.shutdown).start()


def _ask_from_signal_handler(server: AsyncServer) -> None:
    # a Python-level handler, run by the main thread (the loop's) between bytecodes;
    # the signal comes from another thread while the loop waits in epoll_wait
    signal.signal(signal.SIGUSR1, lambda *_: server.shutdown())
    threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR1)).start()


def _ask_from_a_task(server: AsyncServer) -> None:
    asyncio.get_running_loop().call_soon(server.shutdown)


@pytest.mark.parametrize(
    "ask",
    [_ask_from_thread, _ask_from_signal_handler, _ask_from_a_task],
    ids=["thread", "signal-handler", "task"],
)
def test_shutdown_drains_connected_clients_then_removes_the_path(
    sockdir: Path, ask: Callable[[AsyncServer], None]
) -> None:
    """Three clients mid-conversation; shutdown() from another thread, a signal
    handler or a task: the file goes at once (new clients get ENOENT), the three
    finish their conversations, then serve_forever returns."""
    path = sockdir / "s.sock"
    ended: list[str] = []
    previous = signal.getsignal(signal.SIGUSR1)

    async def handle(conn: AsyncConnection) -> None:
        try:
            await async_echo(conn)
            ended.append("finished")
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async def main() -> None:
        async with AsyncServer(path, handle, shutdown_timeout=20) as server:
            serving = asyncio.create_task(server.serve_forever())
            conns = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
            for i, (reader, writer) in enumerate(conns):
                writer.write(b"before %d" % i)
                assert await reader.readexactly(8) == b"before %d" % i
            ask(server)
            await _until(lambda: not path.exists(), "the socket file is removed at once")
            with pytest.raises(afunix.NoSuchSocket):
                afunix.connect(path)
            assert not serving.done()  # still draining: three connections in flight
            for i, (reader, writer) in enumerate(conns):
                writer.write(b"after! %d" % i)
                assert await reader.readexactly(8) == b"after! %d" % i
                writer.close()
                await writer.wait_closed()
            await serving
            assert server.served == 3

    try:
        _run(main)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ended == ["finished"] * 3
    assert not path.exists()


RACE_ROUNDS = 1000


def test_shutdown_from_a_thread_racing_the_start_of_serving(sockdir: Path) -> None:
    """1,000 rounds: shutdown() from a thread started as serve_forever begins lands
    before, while or after the loop arms its wake-up; every round ends (never a
    server deaf to its stop request) and removes the file."""
    path = sockdir / "race.sock"
    ended = 0

    async def main() -> None:
        nonlocal ended
        for i in range(RACE_ROUNDS):
            server = AsyncServer(path, async_echo)
            serving = asyncio.create_task(server.serve_forever())
            stopper = threading.Thread(target=server.shutdown)
            stopper.start()
            for _ in range(i % 4):  # let serve_forever get a little further each round
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                await serving
            stopper.join()
            assert not path.exists(), f"round {i}"
            ended += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython can: a wide race
    try:
        _run(main)
    finally:
        sys.setswitchinterval(interval)
    assert ended == RACE_ROUNDS


def test_shutdown_before_serving_ends_serving_at_once(sockdir: Path) -> None:
    path = sockdir / "early.sock"

    async def main() -> None:
        server = AsyncServer(path, async_echo)
        server.shutdown()
        await server.serve_forever()
        assert not path.exists()
        with pytest.raises(RuntimeError, match="runs once"):
            await server.serve_forever()
        await server.aclose()  # closing twice is harmless

    _run(main)


# ------------------------------------------------------------------ anyio
def test_anyio_task_group_start_returns_once_accepting(sockdir: Path) -> None:
    """``await tg.start(server.serve_forever)`` under anyio (asyncio backend): the
    server accepts when it returns (no waiting), on_ready saw the AsyncServer;
    shutdown() ends the task and so the task group."""
    path = sockdir / "anyio.sock"
    ready: list[AsyncServer] = []

    async def main() -> None:
        with anyio.fail_after(LIMIT):
            async with AsyncServer(path, async_echo, on_ready=ready.append) as server:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve_forever)
                    assert ready == [server]
                    assert await _echo(path, b"started") == b"started"
                    server.shutdown()
                assert not path.exists()

    anyio.run(main, backend="asyncio")


# ----------------------------------------------------------- cancellation
async def _cancel_under_asyncio(serve: Callable[[], Awaitable[None]], body: Any) -> None:
    task = asyncio.create_task(serve())
    await body()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancel_under_anyio(serve: Callable[[], Awaitable[None]], body: Any) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await body()
        tg.cancel_scope.cancel()


async def _loop_can_reuse(fd: int) -> None:
    """A new socket that gets the old listener's number *fd* works with the loop:
    the server left no reader registered on it (asyncio would then fail with
    ``ENOENT`` from ``epoll_ctl``, or call the server's accept)."""
    held: list[socket.socket] = []
    try:
        while not held or held[-1].fileno() < fd:
            held.extend(socket.socketpair())
        a = next(s for s in held if s.fileno() == fd)
        a.setblocking(False)
        peer = held[held.index(a) ^ 1]
        loop = asyncio.get_running_loop()
        reading = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        peer.send(b"reused")
        async with asyncio.timeout(5):
            assert await reading == b"reused"
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("runtime", ["asyncio", "anyio"])
def test_cancelling_the_serve_task_closes_everything(sockdir: Path, runtime: str) -> None:
    """Cancel serve_forever while a client is mid-conversation (task.cancel(), or an
    anyio cancel scope, which cancels again at every await): the handler is
    cancelled and finishes its clean-up before serve_forever ends, the client
    sees end of file, the listener and the file are gone,
    and the process holds exactly the descriptors it held before the server."""
    path = sockdir / "c.sock"
    before = open_fds()
    handler_ended = asyncio.Event()

    async def handle(conn: AsyncConnection) -> None:
        try:
            await async_echo(conn)
        except asyncio.CancelledError:
            for _ in range(3):  # a clean-up that takes a few turns of the loop, during
                await asyncio.sleep(0)  # which anyio cancels serve_forever again
            handler_ended.set()
            raise

    async def main() -> None:
        server = AsyncServer(path, handle)
        listener_fd = server.sock.fileno()
        reader, writer = await asyncio.open_unix_connection(str(path))

        async def body() -> None:
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"

        try:
            if runtime == "asyncio":
                await _cancel_under_asyncio(server.serve_forever, body)
            else:
                await _cancel_under_anyio(server.serve_forever, body)
            assert handler_ended.is_set()  # ended before serve_forever did
            assert await reader.read() == b""  # the server's end is closed
            assert not path.exists()
            assert server.sock.fileno() == -1
            await _loop_can_reuse(listener_fd)
        finally:
            writer.close()
            await writer.wait_closed()

    if runtime == "asyncio":
        _run(main)
    else:
        anyio.run(main, backend="asyncio")
    assert open_fds() == before


# ------------------------------------------------------- two in one loop
def test_two_servers_in_one_loop(sockdir: Path) -> None:
    """Two AsyncServers side by side; one shut down from a task, the other serves on."""
    a_path, b_path = sockdir / "a.sock", sockdir / "b.sock"

    async def shout(conn: AsyncConnection) -> None:
        while chunk := await conn.recv():
            await conn.send(chunk.upper())

    async def main() -> None:
        async with AsyncServer(a_path, async_echo) as a, AsyncServer(b_path, shout) as b:
            a_task = asyncio.create_task(a.serve_forever())
            b_task = asyncio.create_task(b.serve_forever())
            assert await asyncio.gather(_echo(a_path, b"aa"), _echo(b_path, b"bb")) == [
                b"aa",
                b"BB",
            ]
            a.shutdown()
            await a_task
            assert not a_path.exists()
            assert not b_task.done()
            assert await _echo(b_path, b"still") == b"STILL"
        assert b_task.done() and not b_path.exists()
        assert (a.served, b.served) == (1, 2)

    _run(main)


# --------------------------------------------------------------- signals
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP)


def test_the_embedding_loops_signal_handlers_are_untouched(sockdir: Path) -> None:
    """handle_signals=False (the default): the program's own SIGTERM handler (on its
    loop) gets SIGTERM while the server serves, and the server does not stop;
    no signal's disposition changes while serving or after."""
    path = sockdir / "sig.sock"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        mine = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, mine.set)
        try:
            installed = {sig: signal.getsignal(sig) for sig in _SIGNALS}
            async with AsyncServer(path, async_echo) as server:
                serving = asyncio.create_task(server.serve_forever())
                assert await _echo(path) == b"ping"
                assert {sig: signal.getsignal(sig) for sig in _SIGNALS} == installed
                os.kill(os.getpid(), signal.SIGTERM)
                await mine.wait()
                assert await _echo(path, b"still serving") == b"still serving"
                assert not serving.done()
            assert {sig: signal.getsignal(sig) for sig in _SIGNALS} == installed
            mine.clear()
            os.kill(os.getpid(), signal.SIGTERM)  # still the program's
            await mine.wait()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    _run(main)


def test_handle_signals_true_stops_on_sigterm(sockdir: Path) -> None:
    """The contrast: asked to, the server takes SIGTERM (and gives it back after)."""
    path = sockdir / "sig.sock"

    async def main() -> None:
        server = AsyncServer(path, async_echo, handle_signals=True)
        serving = asyncio.create_task(server.serve_forever())
        assert await _echo(path) == b"ping"
        os.kill(os.getpid(), signal.SIGTERM)
        await serving
        assert not path.exists()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    _run(main)


# ------------------------------------------------------------------ misuse
def test_a_plain_function_is_refused_before_binding(sockdir: Path) -> None:
    path = sockdir / "plain.sock"
    with pytest.raises(TypeError, match="'async def' handler"):
        AsyncServer(path, afunix.server.echo)
    assert not path.exists()


def test_a_server_never_served_is_closed_by_aclose_or_close(sockdir: Path) -> None:
    """Bound at construction (no loop needed); closing removes the file."""
    first, second = sockdir / "one.sock", sockdir / "two.sock"
    one = AsyncServer(first, async_echo)
    two = AsyncServer(second, async_echo)
    assert first.exists() and second.exists() and one.origin == "bound"
    asyncio.run(one.aclose())
    two.close()
    assert not first.exists() and not second.exists()


# ------------------------------------------------------ docs/servers.md runs
def _examples() -> list[tuple[str, str]]:
    """Each ```python block of docs/servers.md and the ```text block after it (its output)."""
    return re.findall(
        r"```python\n(.*?)```\n\nIt prints:\n\n```text\n(.*?)```", DOCS.read_text(), re.S
    )


@pytest.mark.parametrize("index", [0, 1, 2], ids=["asyncio", "anyio", "trio"])
def test_the_examples_in_docs_servers_md_run_and_print_what_the_page_says(index: int) -> None:
    examples = _examples()
    assert len(examples) == 3, "docs/servers.md: three examples, each followed by its output"
    code, output = examples[index]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=LIMIT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == output
