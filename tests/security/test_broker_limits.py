"""Limits: request rate, connections per uid, request size, descriptors in flight, timeouts."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afunix.broker import Broker, Client, parse_policy
from afunix.broker.client import BrokerError
from afunix.broker.flags import Wire
from afunix.broker.protocol import OpenRequest, encode_request
from afunix.broker.protocol import frame as framed
from tests.security.broker_support import as_nobody


def _broker(sockdir: Path, limits: str) -> Broker:
    data = sockdir / "data"
    data.mkdir(exist_ok=True)
    os.chmod(sockdir, 0o755)
    (data / "f.txt").write_text("f")
    os.chmod(data / "f.txt", 0o644)
    policy = parse_policy(
        f'[limits]\n{limits}\n[[rule]]\nroot = "{data}"\nanyone = true\nallow = ["read"]\n'
    )
    return Broker(sockdir / "b.sock", policy, audit=sockdir / "audit.jsonl", mode=0o666)


@pytest.fixture
def make(sockdir: Path) -> Iterator[object]:
    made: list[Broker] = []

    def factory(limits: str) -> Broker:
        b = _broker(sockdir, limits).start()
        made.append(b)
        return b

    yield factory
    for b in made:
        b.stop()


def _f(b: Broker) -> str:
    return os.path.join(os.path.dirname(b.address.describe()), "data", "f.txt")


def _raw_reply(sock: socket.socket) -> tuple[int, int, list[int]]:
    """Read one reply frame by hand: (id, errno, fds)."""
    head, anc, _fl, _ad = sock.recvmsg(8, socket.CMSG_SPACE(4))
    fds = [struct.unpack("i", data[:4])[0] for _l, _t, data in anc]
    length = struct.unpack("!I", head[4:8])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk
        body += chunk
    _v, _k, _r, rid, err = struct.unpack("!BBHIi", body[:12])
    return rid, err, fds


def test_rate_limit_per_uid(make: object) -> None:
    b = make("requests_per_second = 2\nburst = 3")  # type: ignore[operator]
    with Client(b.address) as c:
        for _ in range(3):
            os.close(c.open_fd(_f(b)))
        with pytest.raises(BlockingIOError) as info:
            c.open_fd(_f(b))
        assert info.value.errno == errno.EAGAIN
        # Another uid has its own bucket.
        assert as_nobody(b.address.describe(), [{"path": _f(b)}])[0]["ok"]
        time.sleep(0.6)  # a token comes back after 1/2 s
        os.close(c.open_fd(_f(b)))
    assert b.counts["limited"] == 1


def test_connections_per_uid(make: object) -> None:
    b = make("connections_per_peer = 2")  # type: ignore[operator]
    first, second = Client(b.address), Client(b.address)
    try:
        for c in (first, second):
            os.close(c.open_fd(_f(b)))
        with Client(b.address) as third:
            with pytest.raises(BrokerError, match="too many connections") as info:
                third.open_fd(_f(b))
            assert info.value.errno == errno.EAGAIN
        # Another uid is not counted against root's connections.
        assert as_nobody(b.address.describe(), [{"path": _f(b)}])[0]["ok"]
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the broker notices the close, then has room again
            try:
                with Client(b.address) as again:
                    os.close(again.open_fd(_f(b)))
                break
            except BrokerError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        first.close()
        second.close()


def test_request_size_limit(make: object) -> None:
    b = make("max_request_bytes = 256")  # type: ignore[operator]
    with Client(b.address) as c:
        with pytest.raises(BrokerError, match="exceeds the maximum") as info:
            c.open_fd("/" + "a" * 400)
        assert info.value.errno == errno.EMSGSIZE
        os.close(c.open_fd(_f(b)))  # a fresh connection is fine


def test_descriptors_in_flight_are_bounded(make: object) -> None:
    """A client that asks and never reads: the broker stops after 4 unread descriptors,
    waits in_flight_timeout, then hangs up; others are served meanwhile."""
    b = make("fds_in_flight = 4\nin_flight_timeout = 0.5")  # type: ignore[operator]
    path = _f(b).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(b.address.sockaddr)
        s.settimeout(5)
        for i in range(1, 11):
            s.sendall(framed(encode_request(OpenRequest(i, path, int(Wire.READ)))))
        started = time.monotonic()
        time.sleep(0.1)
        with Client(b.address, timeout=1) as other:  # not stalled by the hoarder
            os.close(other.open_fd(_f(b)))
        time.sleep(0.6)
        got = []
        while True:
            try:
                rid, err, fds = _raw_reply(s)
            except (AssertionError, ConnectionResetError):
                break
            for fd in fds:
                os.close(fd)
            got.append((rid, err, len(fds)))
            if err:
                break
        assert time.monotonic() - started < 3
    assert got[:4] == [(i, 0, 1) for i in range(1, 5)]
    assert got[4][1] == errno.ETIMEDOUT


def test_pipelined_requests_are_all_answered_when_read(make: object) -> None:
    b = make("fds_in_flight = 4\nin_flight_timeout = 2")  # type: ignore[operator]
    path = _f(b).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(b.address.sockaddr)
        s.settimeout(5)
        s.sendall(b"".join(framed(encode_request(OpenRequest(i, path, 1))) for i in range(1, 13)))
        for i in range(1, 13):
            rid, err, fds = _raw_reply(s)
            assert (rid, err, len(fds)) == (i, 0, 1)
            os.close(fds[0])
            time.sleep(0.01)


def test_slow_request_is_cut_off(make: object) -> None:
    """Half a request, then silence: disconnected after request_timeout (slowloris)."""
    b = make("request_timeout = 0.3")  # type: ignore[operator]
    frame = framed(encode_request(OpenRequest(1, _f(b).encode(), 1)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(b.address.sockaddr)
        s.settimeout(5)
        s.sendall(frame[:10])
        started = time.monotonic()
        rid, err, _ = _raw_reply(s)
        assert (rid, err) == (0, errno.ETIMEDOUT)
        assert s.recv(10) == b""
        assert 0.25 < time.monotonic() - started < 2


def test_idle_connection_closed_and_client_reconnects(make: object) -> None:
    b = make("idle_timeout = 0.2")  # type: ignore[operator]
    with Client(b.address) as c:
        os.close(c.open_fd(_f(b)))
        time.sleep(0.5)  # the broker hangs up meanwhile
        os.close(c.open_fd(_f(b)))  # reconnected transparently


def test_max_clients_queue(make: object) -> None:
    b = make("max_clients = 2\nconnections_per_peer = 10")  # type: ignore[operator]
    held = [Client(b.address), Client(b.address)]
    try:
        for c in held:
            os.close(c.open_fd(_f(b)))
        with Client(b.address, timeout=0.5) as waiting:
            started = time.monotonic()
            with pytest.raises(BrokerError) as info:
                waiting.open_fd(_f(b))
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - started < 1.5
        held.pop().close()
        with Client(b.address, timeout=5) as later:
            os.close(later.open_fd(_f(b)))
    finally:
        for c in held:
            c.close()


def test_too_many_descriptors_attached_closes_the_connection(make: object) -> None:
    """More descriptors than the broker makes room for: MSG_CTRUNC, connection closed,
    nothing leaked (the autouse fixture checks this process, the broker included)."""
    b = make("")  # type: ignore[operator]
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(b.address.sockaddr)
            s.settimeout(5)
            frame = bytearray(framed(encode_request(OpenRequest(1, b"/x", 1))))
            frame[2:4] = struct.pack("!H", 20)
            s.sendmsg(
                [bytes(frame)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("20i", *fds))]
            )
            _rid, err, _ = _raw_reply(s)
            assert err in (errno.EMSGSIZE, errno.EPROTO)
            assert s.recv(10) == b""
    finally:
        for fd in fds:
            os.close(fd)


def test_limits_do_not_block_each_other(make: object) -> None:
    """Many threads, one Client each, concurrently: all served, counts add up."""
    b = make("connections_per_peer = 16")  # type: ignore[operator]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with Client(b.address) as c:
                for _ in range(50):
                    os.close(c.open_fd(_f(b)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert b.counts["granted"] == 400
