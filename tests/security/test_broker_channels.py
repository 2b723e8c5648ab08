"""The broker over channels (issue 13 step 6): the clients under asyncio and trio,
the clients' ``timeout`` end to end, a memfd request, and the goodbye's bound.

Real brokers in this process (the autouse fixture checks that neither side
leaks a descriptor), real sockets; a "broker" that stalls mid-reply is a
plain listening socket written to by hand.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from afunix.broker import AsyncClient, Broker, Client, parse_policy
from afunix.broker.client import BrokerError
from afunix.broker.protocol import CLOSING, KIND_ERROR, Reply, encode_reply
from afunix.broker.protocol import frame as framed
from afunix.broker.server import GOODBYE_TIMEOUT

from ..conftest import run_under


@pytest.fixture
def broker(sockdir: Path) -> Iterator[tuple[Broker, Path]]:
    data = sockdir / "data"
    data.mkdir()
    (data / "f.txt").write_text("f")
    (data / "g.txt").write_text("g")
    policy = parse_policy(
        "[limits]\nrequests_per_second = 100000\nburst = 100000\n"
        f'[[rule]]\nroot = "{data}"\nanyone = true\nallow = ["read", "list"]\n'
    )
    b = Broker(sockdir / "b.sock", policy, audit=None).start()
    try:
        yield b, data
    finally:
        b.stop()


def test_async_client_against_a_real_broker(broker: tuple[Broker, Path], runtime: str) -> None:
    """Files, directories, refusals and 10 concurrent requests on one client (serialized,
    each gets its own file), under asyncio and under trio."""
    b, data = broker

    async def main() -> None:
        async with AsyncClient(b.address.describe(), timeout=10) as c:
            with await c.open(data / "f.txt") as f:
                assert f.read() == b"f"
            assert await c.listdir(data) == ["f.txt", "g.txt"]
            with pytest.raises(FileNotFoundError):
                await c.open(data / "nope.txt")
            with pytest.raises(PermissionError):
                await c.open(data / "f.txt", "w")
            got: dict[int, bytes] = {}

            async def one(i: int) -> None:
                name = "f.txt" if i % 2 else "g.txt"
                with await c.open(data / name) as f:
                    got[i] = f.read()

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one, i)
            assert got == {i: (b"f" if i % 2 else b"g") for i in range(10)}

    run_under(runtime, main)
    assert b.counts["granted"] == 12


def _stalling_broker(sockdir: Path, delay: float) -> tuple[socket.socket, threading.Thread]:
    """A "broker" that reads one request, waits *delay*, sends the first half of its
    reply, and says nothing more until the client hangs up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sockdir / "stall.sock"))
    listener.listen(1)
    reply = framed(encode_reply(Reply(1, errno.ENOENT, "no such file")))

    def serve() -> None:
        listener.settimeout(30)  # (a client that never came: the test fails, this ends)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)
            time.sleep(delay)  # the scenario: the reply begins late
            conn.sendall(reply[: len(reply) // 2])
            conn.settimeout(30)
            while conn.recv(4096):  # until the client hangs up
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


TIMEOUT = 1.0
DELAY = 0.7  # the reply begins late: a fresh message timeout would end at 1.7 s


@pytest.mark.parametrize("kind", ["sync", "asyncio", "trio"])
def test_timeout_holds_end_to_end(sockdir: Path, kind: str) -> None:
    """The client's ``timeout`` bounds the whole request: a reply that begins at 0.7 s
    and never ends fails with ETIMEDOUT at 1.0 s (not 0.7 + 1.0)."""
    listener, thread = _stalling_broker(sockdir, DELAY)
    address = str(sockdir / "stall.sock")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError) as info:
            if kind == "sync":
                with Client(address, timeout=TIMEOUT) as c:
                    c.open("/x")
            else:

                async def main() -> None:
                    async with AsyncClient(address, timeout=TIMEOUT) as c:
                        await c.open("/x")

                run_under(kind, main)
        took = time.monotonic() - started
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes an accept still waiting
        thread.join(30)
        listener.close()
    assert info.value.errno == errno.ETIMEDOUT
    assert TIMEOUT - 0.05 <= took < TIMEOUT + DELAY - 0.1, took


def test_a_memfd_request_is_invalid_and_closes(broker: tuple[Broker, Path]) -> None:
    """A request sent as a memfd payload: EINVAL, an ERROR reply with CLOSING, then the
    broker hangs up; the memfd was closed as it arrived (this process holds no copy
    beyond ours: the autouse fixture), and the broker still serves."""
    b, data = broker
    memfd = os.memfd_create("request")
    try:
        os.write(memfd, b"\x01\x01\x00\x00" + bytes(12) + b"/etc/shadow")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(b.address.sockaddr)
            s.settimeout(10)
            header = struct.pack("!BBHI", 0xAF, 0x01, 1, 27)  # MEMFD flag, one descriptor
            s.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))])
            head = s.recv(8, socket.MSG_WAITALL)
            body = s.recv(struct.unpack("!I", head[4:])[0], socket.MSG_WAITALL)
            _v, kind, rflags, rid, err = struct.unpack("!BBHIi", body[:12])
            assert (kind, rid, err, rflags & CLOSING) == (KIND_ERROR, 0, errno.EINVAL, CLOSING)
            assert b"memfd" in body
            assert s.recv(1) == b""
    finally:
        os.close(memfd)
    assert b.counts["invalid"] == 1
    with Client(b.address.describe()) as c, c.open(data / "f.txt") as f:
        assert f.read() == b"f"


def test_the_goodbye_is_bounded_for_a_client_that_does_not_read(
    broker: tuple[Broker, Path],
) -> None:
    """A goodbye to a client whose receive queue is full gives up after GOODBYE_TIMEOUT
    (0.5 s): a client that never reads cannot hold a handler thread."""
    b, _ = broker
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setblocking(False)
        try:
            while True:
                ours.send(b"x" * 1024)
        except BlockingIOError:
            pass
        ours.setblocking(True)
        started = time.monotonic()
        b._goodbye(ours, errno.EPROTO, "bye")  # closes ours
        took = time.monotonic() - started
        assert ours.fileno() == -1
    assert GOODBYE_TIMEOUT - 0.05 <= took < GOODBYE_TIMEOUT + 1.5, took
