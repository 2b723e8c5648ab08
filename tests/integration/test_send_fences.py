"""Fences for the three send defects of issue 13, before the channel core is rebuilt.

* **The caller's descriptors are read once and kept.** ``send(b"cfg",
  fds=[open(path)])`` (nobody else holds the file) and a generator of files
  must send *that* file: the receiver checks the inode. Before the fix,
  ``send`` turned the list into numbers and dropped the only reference, so
  CPython closed the file before ``sendmsg``: ``EBADF``, or, with another
  thread opening files meanwhile, some other file under the reused number.
* **An iterator survives the EMSGSIZE -> memfd resend** of an unconnected
  datagram channel: the message arrives with its one descriptor.
* **No SIGPIPE.** A process with ``SIGPIPE`` at its default that writes to a
  peer that has gone gets ``BrokenPipeError`` from every send of the
  library, instead of dying (status -13, 141 in a shell).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from afunix import AsyncChannel, Channel, Message

TYPES = ["stream", "seqpacket", "dgram"]
#: Sends of the threaded wrong-file race (each with a freshly opened file).
RACE_SENDS = 2000


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def path_inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "app.cfg"
    path.write_bytes(b"setting = 1\n")
    return path


def received_inodes(msg: Message) -> list[tuple[int, int]]:
    with msg:
        return [inode(fd) for fd in msg.fds]


# ------------------------------------------- the caller's files, read once and kept
# The files below are opened inline and never closed by the test, exactly as
# docs/descriptors.md shows it: the channel must keep them alive until sent.
# CPython closes them when the send returns (with a ResourceWarning).


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("kind", TYPES)
def test_inline_opened_file_is_the_file_sent(kind: str, cfg: Path) -> None:
    a, b = Channel.pair(kind)
    with a, b:
        a.send(b"cfg", fds=[open(cfg)])  # noqa: SIM115
        assert received_inodes(b.recv()) == [path_inode(cfg)]
        a.send(b"gen", fds=(open(p) for p in [cfg, cfg]))  # noqa: SIM115
        assert received_inodes(b.recv()) == [path_inode(cfg)] * 2
        a.send(b"big", fds=[open(cfg)], memfd=True)  # noqa: SIM115
        assert received_inodes(b.recv()) == [path_inode(cfg)]
        a.send(b"held", fds=[open(cfg)], more=True)  # noqa: SIM115
        a.send(b"last", fds=(open(p) for p in [cfg]))  # noqa: SIM115
        assert received_inodes(b.recv()) == [path_inode(cfg)]
        assert received_inodes(b.recv()) == [path_inode(cfg)]


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("kind", TYPES)
def test_async_inline_opened_file_is_the_file_sent(kind: str, cfg: Path) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair(kind)
        with a, b:
            await a.send(b"cfg", fds=[open(cfg)])  # noqa: SIM115
            assert received_inodes(await b.recv()) == [path_inode(cfg)]
            await a.send(b"gen", fds=(open(p) for p in [cfg, cfg]))  # noqa: SIM115
            assert received_inodes(await b.recv()) == [path_inode(cfg)] * 2
            await a.send(b"big", fds=[open(cfg)], memfd=True)  # noqa: SIM115
            assert received_inodes(await b.recv()) == [path_inode(cfg)]
            await a.send(b"held", fds=[open(cfg)], more=True)  # noqa: SIM115
            await a.send(b"last", fds=(open(p) for p in [cfg]))  # noqa: SIM115
            assert received_inodes(await b.recv()) == [path_inode(cfg)]
            assert received_inodes(await b.recv()) == [path_inode(cfg)]

    run(body())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_send_buffer_and_send_fds_keep_a_generators_files(cfg: Path) -> None:
    from afunix._memfd import MemfdBuffer
    from afunix.lowlevel import recv_fds, send_fds, sendall_fds

    a, b = Channel.pair("seqpacket")
    with a, b:
        buf = MemfdBuffer(64)
        buf.view[:4] = b"zero"
        a.send_buffer(buf, 4, (open(p) for p in [cfg]))  # noqa: SIM115
        assert received_inodes(b.recv()) == [path_inode(cfg)]
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with x, y:
        for send in (send_fds, sendall_fds):
            send(x, b"f", (open(p) for p in [cfg]))  # noqa: SIM115
            got = recv_fds(y, 16, 4)
            try:
                assert [inode(fd) for fd in got.fds] == [path_inode(cfg)]
            finally:
                for fd in got.fds:
                    os.close(fd)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("kind", TYPES)
def test_threaded_sender_never_sends_another_threads_file(kind: str, tmp_path: Path) -> None:
    """One thread sends ``fds=[open(path_a)]`` RACE_SENDS times while two others open
    and close /etc/passwd in a loop: every message must carry path_a's inode.

    Before the fix the inline file was closed before ``sendmsg``; an opener
    thread then got its number, and /etc/passwd (or EBADF) went out instead.
    """
    path_a = tmp_path / "a.cfg"
    path_a.write_bytes(b"a")
    want = path_inode(path_a)
    stop = threading.Event()
    failed: list[OSError] = []

    def churn() -> None:
        while not stop.is_set():
            with open("/etc/passwd", "rb") as f:
                f.read(1)

    def send_all(chan: Channel) -> None:
        try:
            for _ in range(RACE_SENDS):
                try:
                    chan.send(b"x", fds=[open(path_a)])  # noqa: SIM115
                except OSError as exc:  # counted: EBADF when the file was closed first
                    failed.append(exc)
        finally:
            chan.send(b"end")

    a, b = Channel.pair(kind)
    with a, b:
        openers = [threading.Thread(target=churn) for _ in range(2)]
        sender = threading.Thread(target=send_all, args=(a,))
        for t in openers:
            t.start()
        sender.start()
        wrong = got = 0
        try:
            while True:
                msg = b.recv()
                if msg.data == b"end":
                    break
                got += 1
                wrong += received_inodes(msg) != [want]
        finally:
            stop.set()
            sender.join(30)
            for t in openers:
                t.join(30)
        assert (got, wrong, len(failed)) == (RACE_SENDS, 0, 0), (
            f"of {RACE_SENDS} sends {len(failed)} failed ({failed[:1]!r}) and "
            f"{wrong} of the {got} messages received carried another file"
        )


# ------------------------------------------- an iterator through the memfd resend


@pytest.fixture
def unconnected(sockdir: Path) -> Iterator[tuple[socket.socket, str]]:
    """An unconnected datagram socket with a 4 KiB send buffer, and a bound path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    yield sock, str(sockdir / "dst.sock")
    sock.close()


def test_iterator_fds_survive_the_memfd_resend(
    unconnected: tuple[socket.socket, str], cfg: Path
) -> None:
    sock, path = unconnected
    payload = os.urandom(400 * 1024)  # EMSGSIZE inline: resent as a memfd
    with Channel.bind(path) as server, Channel(sock, memfd_threshold=None) as client:
        r, w = os.pipe()
        try:
            client.send(payload, fds=iter([r]), address=path)
        finally:
            os.close(w)
            want = inode(r)
            os.close(r)
        with server.recv() as msg:
            assert msg.data == payload
            assert [inode(fd) for fd in msg.fds] == [want]


def test_async_iterator_fds_survive_the_memfd_resend(
    unconnected: tuple[socket.socket, str], cfg: Path
) -> None:
    sock, path = unconnected
    payload = os.urandom(400 * 1024)

    async def body() -> None:
        with Channel.bind(path) as server, AsyncChannel(sock, memfd_threshold=None) as client:
            r, w = os.pipe()
            try:
                await client.send(payload, fds=iter([r]), address=path)
            finally:
                os.close(w)
                want = inode(r)
                os.close(r)
            with server.recv() as msg:
                assert msg.data == payload
                assert [inode(fd) for fd in msg.fds] == [want]

    run(body())


# ------------------------------------------- no SIGPIPE from any send of the library

_PIPE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, socket, sys
    from afunix import AsyncChannel, Channel
    from afunix.lowlevel import sendall_fds, send_fds
    from afunix._memfd import MemfdBuffer

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a gone peer kills us if we let it
    api, kind = sys.argv[1], sys.argv[2]
    big = b"b" * (100 * 1024)

    def sync_cases(chan):
        yield "plain", lambda: chan.send(b"x")
        yield "fds", lambda: chan.send(b"x", [0])
        yield "big", lambda: chan.send(big)
        yield "memfd", lambda: chan.send(b"x", memfd=True)
        yield "held", lambda: (chan.send(b"x", more=True), chan.flush())
        yield "buffer", lambda: chan.send_buffer(MemfdBuffer(8), 1)

    def report(name, call):
        for attempt in (1, 2):  # twice: the second write is the one that kills
            try:
                result = call()
                if asyncio.iscoroutine(result):
                    asyncio.run(result)
            except BrokenPipeError:
                print(name, attempt, "BrokenPipeError", flush=True)
            except Exception as exc:
                print(name, attempt, type(exc).__name__, exc, flush=True)
            else:
                print(name, attempt, "sent", flush=True)

    if api == "raw":
        a, b = socket.socketpair(socket.AF_UNIX, getattr(socket, "SOCK_" + kind.upper()))
        b.close()
        report("send_fds", lambda: send_fds(a, b"x", [0]))
        report("sendall_fds", lambda: sendall_fds(a, b"x", [0]))
    elif api == "server":  # a thread-model Server's Connection.send to a gone client
        import threading
        from afunix import Server
        done = threading.Event()
        def handler(conn):
            while conn.recv(10):
                pass  # until the client has gone
            report("connection", lambda: conn.send(b"x" * 10))
            done.set()
        srv = Server(sys.argv[3], handler, model="thread", type=kind).start()
        c = socket.socket(socket.AF_UNIX, getattr(socket, "SOCK_" + kind.upper()))
        c.connect(sys.argv[3])
        c.sendall(b"x")
        c.close()
        done.wait(20)
        srv.stop()
    elif api == "sync":
        a, b = Channel.pair(kind)
        b.close()
        for name, call in sync_cases(a):
            report(name, call)
    else:
        async def make():
            return AsyncChannel.pair(kind)
        a, b = asyncio.run(make())
        b.close()
        async def flush_after(coro):
            await coro
            await a.flush()
        for name, call in [
            ("plain", lambda: a.send(b"x")),
            ("fds", lambda: a.send(b"x", [0])),
            ("big", lambda: a.send(big)),
            ("memfd", lambda: a.send(b"x", memfd=True)),
            ("held", lambda: flush_after(a.send(b"x", more=True))),
            ("buffer", lambda: a.send_buffer(MemfdBuffer(8), 1)),
        ]:
            report(name, call)
    print("alive", flush=True)
    """
)


@pytest.mark.parametrize(
    ("api", "kind"),
    [
        ("sync", "stream"),
        ("sync", "seqpacket"),
        ("asyncio", "stream"),
        ("asyncio", "seqpacket"),
        ("raw", "stream"),
        ("raw", "seqpacket"),
        ("server", "stream"),
    ],
)
def test_writing_to_a_gone_peer_raises_broken_pipe(api: str, kind: str, sockdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PIPE_SCRIPT, api, kind, str(sockdir / "s.sock")],
        capture_output=True,
        timeout=50,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"exit status {proc.returncode} after:\n{out}{proc.stderr!r}"
    lines = out.splitlines()
    assert lines[-1] == "alive"
    assert len(lines) > (2 if api == "server" else 4)
    for line in lines[:-1]:
        assert line.split(" ", 2)[2] == "BrokenPipeError", line
