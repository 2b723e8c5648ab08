"""pair / listen / connect on the real kernel (UNP 15.3-15.6), and their errors."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import afunix
from afunix import (
    ListenQueueFull,
    NoReplyAddress,
    NoSuchSocket,
    NotASocket,
    NothingListening,
    WrongSocketType,
)

from ..conftest import NOBODY

TYPES = ["stream", "dgram", "seqpacket"]


def _addr(kind: str, sockdir: Path, name: str) -> str | Path:
    if kind == "path":
        return sockdir / name
    if kind == "str":
        return str(sockdir / name)
    return f"@afx-{os.getpid()}-{name}"


@pytest.mark.parametrize("sock_type", TYPES)
def test_pair_both_ways(sock_type: str) -> None:
    a, b = afunix.pair(sock_type)
    with a, b:
        assert a.type == afunix._sockets.socket_type(sock_type)
        assert not os.get_inheritable(a.fileno())
        a.send(b"to b")
        assert b.recv(10) == b"to b"
        b.send(b"to a")
        assert a.recv(10) == b"to a"
        assert a.address.kind is afunix.AddressKind.UNNAMED


def test_pair_across_fork() -> None:
    parent, child = afunix.pair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        parent.close()
        child.sendall(b"i am children")
        child.recv(100)
        os._exit(0)
    child.close()
    with parent:
        assert parent.recv(100) == b"i am children"
        parent.sendall(b"i am father")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert parent.recv(100) == b""  # the child exited: end of file


@pytest.mark.parametrize("kind", ["path", "str", "abstract"])
@pytest.mark.parametrize("sock_type", ["stream", "seqpacket"])
def test_connected_types_round_trip(sockdir: Path, kind: str, sock_type: str) -> None:
    addr = _addr(kind, sockdir, f"{sock_type}.sock")
    with afunix.listen(addr, sock_type) as server, afunix.connect(addr, sock_type) as client:
        conn, _ = server.accept()
        with conn:
            client.sendall(b"one")
            client.sendall(b"two")
            if sock_type == "seqpacket":  # record boundaries kept
                assert conn.recv(100) == b"one"
                assert conn.recv(100) == b"two"
            else:
                time.sleep(0.01)
                assert conn.recv(100) == b"onetwo"
            conn.sendall(b"back")
            assert client.recv(100) == b"back"


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_datagram_client_binds_a_private_reply_path(sockdir: Path, kind: str) -> None:
    addr = _addr(kind, sockdir, "dg.sock")
    with afunix.listen(addr, "dgram") as server:
        client = afunix.connect(addr, "dgram")
        with client:
            me = client.address
            assert me.kind is afunix.AddressKind.PATH
            assert me.filesystem_path is not None
            private_dir = os.path.dirname(me.filesystem_path)
            assert os.stat(private_dir).st_mode & 0o777 == 0o711
            client.send(b"ping")
            data, sender = server.recvfrom(100)
            assert data == b"ping"
            assert afunix.Address.from_sockaddr(socket.AF_UNIX, sender) == me
            server.sendto(b"pong", sender)
            assert client.recv(100) == b"pong"
        assert not os.path.exists(me.filesystem_path)
        assert not os.path.exists(private_dir)


def test_two_datagram_clients_get_unique_paths(sockdir: Path) -> None:
    path = sockdir / "dg.sock"
    with (
        afunix.listen(path, "dgram"),
        afunix.connect(path, "dgram") as a,
        afunix.connect(path, "dgram") as b,
    ):
        assert a.address != b.address


def test_datagram_autobind(sockdir: Path) -> None:
    path = sockdir / "dg.sock"
    with (
        afunix.listen(path, "dgram") as server,
        afunix.connect(path, "dgram", bind="autobind") as client,
    ):
        assert client.address.kind is afunix.AddressKind.ABSTRACT
        client.send(b"x")
        _, sender = server.recvfrom(10)
        server.sendto(b"y", sender)
        assert client.recv(10) == b"y"


def test_datagram_explicit_bind(sockdir: Path) -> None:
    path, mine = sockdir / "dg.sock", sockdir / "me.sock"
    with afunix.listen(path, "dgram"), afunix.connect(path, "dgram", bind=mine) as c:
        assert c.address == afunix.Address.parse(mine)
    assert not mine.exists()


def test_unbound_datagram_waiting_for_reply_is_an_error_not_a_hang(sockdir: Path) -> None:
    path = sockdir / "dg.sock"
    with afunix.listen(path, "dgram") as server, afunix.connect(path, "dgram", bind=None) as client:
        client.send(b"hello")
        data, sender = server.recvfrom(100)
        assert data == b"hello" and sender in ("", None, b"")
        for method in (
            lambda: client.recv(10),
            lambda: client.recvfrom(10),
            lambda: client.recv_into(bytearray(10)),
            lambda: client.recvmsg(10),
        ):
            with pytest.raises(NoReplyAddress) as info:
                method()
            assert info.value.errno == errno.EDESTADDRREQ
            assert "15.4 point 8" in str(info.value)


@pytest.mark.parametrize("form", ["str", "bytes", "path", "unix:"])
def test_connect_to_a_path_gives_a_blocking_close_on_exec_socket(sockdir: Path, form: str) -> None:
    # A plain path, no timeout: connect() goes straight to the kernel (its fast
    # path); the socket is what the general path gives.
    path = sockdir / "plain.sock"
    address: str | bytes | Path = {
        "str": str(path),
        "bytes": os.fsencode(path),
        "path": path,
        "unix:": f"unix:{path}",
    }[form]
    with afunix.listen(path) as server, afunix.connect(address) as client:
        assert type(client) is afunix.Socket
        assert client.family == socket.AF_UNIX and client.type == socket.SOCK_STREAM
        assert client.gettimeout() is None and client.getblocking()
        assert not os.get_inheritable(client.fileno())
        assert client.peer_address.filesystem_path == os.fsencode(path)
        assert client.bound_path is None  # a client owns no file
        conn, _ = server.accept()
        with conn:
            client.sendall(b"hi")
            assert conn.recv(2) == b"hi"


def test_connect_with_a_timeout_gives_a_blocking_socket_whatever_the_default(
    sockdir: Path,
) -> None:
    path = sockdir / "timed.sock"
    old = socket.getdefaulttimeout()
    with afunix.listen(path) as server:
        for default in (None, 3.0):
            socket.setdefaulttimeout(default)
            try:
                client = afunix.connect(path, timeout=5)
            finally:
                socket.setdefaulttimeout(old)
            with client:
                assert client.gettimeout() is None and client.getblocking()
                size = struct.calcsize("@ll")  # a struct timeval: the deadline is unset again
                assert client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, size) == bytes(size)
                server.accept()[0].close()


# ----------------------------------------------------------------- errors
def test_no_such_socket(sockdir: Path) -> None:
    with pytest.raises(NoSuchSocket) as info:
        afunix.connect(sockdir / "absent.sock")
    assert info.value.errno == errno.ENOENT
    assert str(sockdir / "absent.sock") in str(info.value)
    assert isinstance(info.value, OSError)


def test_not_a_socket(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("x")
    with pytest.raises(NotASocket, match="a regular file of 1 bytes") as info:
        afunix.connect(path)
    assert info.value.errno == errno.ECONNREFUSED


def test_stale_file_means_nothing_listening(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    with pytest.raises(NothingListening, match="nothing is listening there") as info:
        afunix.connect(path)
    assert info.value.errno == errno.ECONNREFUSED


def test_abstract_nothing_listening() -> None:
    with pytest.raises(NothingListening):
        afunix.connect(f"@afx-{os.getpid()}-nobody-here")


@pytest.mark.parametrize(
    ("server_type", "client_type", "words"),
    [
        ("dgram", "stream", "it is a datagram socket"),
        ("stream", "seqpacket", "it is a stream socket"),
        ("seqpacket", "stream", "it is a seqpacket socket"),
    ],
)
def test_wrong_socket_type(sockdir: Path, server_type: str, client_type: str, words: str) -> None:
    path = sockdir / "t.sock"
    with afunix.listen(path, server_type):
        with pytest.raises(WrongSocketType, match=words) as info:
            afunix.connect(path, client_type)
        assert info.value.errno == errno.EPROTOTYPE


def test_path_too_long_on_connect() -> None:
    with pytest.raises(afunix.AddressError) as info:
        afunix.connect("/tmp/" + "y" * 200)
    assert info.value.errno == errno.ENAMETOOLONG


def test_permission_denied_for_another_user(sockdir: Path) -> None:
    path = sockdir / "private.sock"
    code = (
        "import afunix,sys\n"
        "try:\n afunix.connect(sys.argv[1]).close()\n"
        "except OSError as e:\n print(type(e).__name__, e.errno, e); sys.exit(3)\n"
        "print('connected')\n"
    )
    with afunix.listen(path, mode=0o600):
        out = subprocess.run(
            [*NOBODY, sys.executable, "-c", code, str(path)],
            capture_output=True,
            timeout=30,
            text=True,
        )
        assert out.returncode == 3, out
        assert f"AfunixError {errno.EACCES}" in out.stdout
        assert "permission denied" in out.stdout
    with afunix.listen(path, mode=0o666) as server:
        out = subprocess.run(
            [*NOBODY, sys.executable, "-c", code, str(path)],
            capture_output=True,
            timeout=30,
            text=True,
        )
        assert out.stdout.strip() == "connected", out
        conn, _ = server.accept()
        conn.close()


# ------------------------------------------------------ full listen queue
def _fill_queue(path: Path) -> list[afunix.Socket]:
    held = []
    while True:
        try:
            held.append(afunix.connect(path, timeout=0.05))
        except ListenQueueFull:
            return held
        assert len(held) < 100, "the listen queue never filled"


def test_full_queue_with_timeout_raises_listen_queue_full(sockdir: Path) -> None:
    path = sockdir / "q.sock"
    with afunix.listen(path, backlog=1):
        held = _fill_queue(path)
        try:
            assert len(held) == 2  # Linux admits backlog + 1
            t0 = time.monotonic()
            with pytest.raises(ListenQueueFull, match="listen queue") as info:
                afunix.connect(path, timeout=0.3)
            assert time.monotonic() - t0 >= 0.25  # it waited for room, then gave up
            assert info.value.errno == errno.EAGAIN
            assert not isinstance(info.value, NothingListening)
        finally:
            for s in held:
                s.close()


def test_an_exception_from_a_signal_handler_ends_a_waiting_connect(sockdir: Path) -> None:
    # A blocking connect waits for room in a full queue; a signal handler that raises
    # (an alarm bounding the call) must end it, explained, not start another wait.
    path = sockdir / "q.sock"
    alarms = []

    def alarm(signum: int, frame: object) -> None:
        alarms.append(signum)
        raise TimeoutError("the alarm went off")

    with afunix.listen(path, backlog=1):
        held = _fill_queue(path)
        old = signal.signal(signal.SIGALRM, alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)  # and every 0.2 s after
            with pytest.raises(OSError) as info:
                afunix.connect(path)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            for s in held:
                s.close()
    assert alarms == [signal.SIGALRM]  # one wait, ended by the first alarm
    assert isinstance(info.value.__cause__, TimeoutError)
    assert str(path) in str(info.value)


def test_full_queue_retry_with_backoff_succeeds_once_room_returns(sockdir: Path) -> None:
    path = sockdir / "q.sock"
    with afunix.listen(path, backlog=1) as server:
        held = _fill_queue(path)
        accepted: list[socket.socket] = []

        def make_room() -> None:
            time.sleep(0.2)
            conn, _ = server.accept()
            accepted.append(conn)

        t = threading.Thread(target=make_room)
        t.start()
        try:
            with afunix.connect(path, timeout=0.05, retries=8, backoff=0.02) as late:
                assert late.fileno() >= 0
        finally:
            t.join()
            for s in held + accepted:
                s.close()


def test_retries_cover_a_server_that_starts_late(sockdir: Path) -> None:
    path = sockdir / "late.sock"
    servers: list[afunix.Socket] = []

    def start_later() -> None:
        time.sleep(0.15)
        servers.append(afunix.listen(path))

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with afunix.connect(path, retries=10, backoff=0.02):
            pass
    finally:
        t.join()
        for s in servers:
            s.close()


def test_no_retries_fails_at_once(sockdir: Path) -> None:
    with pytest.raises(NoSuchSocket):
        afunix.connect(sockdir / "never.sock", retries=0)


# ----------------------------------------------------------------- TCP
def test_same_api_over_tcp() -> None:
    with afunix.listen("tcp://127.0.0.1:0") as server:
        port = server.address.port
        assert port
        with afunix.connect(f"tcp://127.0.0.1:{port}", timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"over tcp")
                assert conn.recv(100) == b"over tcp"


def test_seqpacket_over_tcp_is_unsupported() -> None:
    with pytest.raises(afunix.UnsupportedFeature) as info:
        afunix.connect("tcp://127.0.0.1:1", "seqpacket")
    assert info.value.errno == errno.EOPNOTSUPP


def test_tcp_refused_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(afunix.AfunixError, match=f"tcp://127.0.0.1:{port}") as info:
        afunix.connect(f"tcp://127.0.0.1:{port}")
    assert info.value.errno == errno.ECONNREFUSED
