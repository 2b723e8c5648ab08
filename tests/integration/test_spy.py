"""``afunix spy LISTEN TARGET`` (issue 17): a relay that shows bytes, frames, descriptors
and credentials, with real servers (``afunix serve``, Channel and raw-socket peers in
the test) and real clients (``afunix send-fds`` run as nobody, Channel, raw sockets).

The spy runs as its own process, its standard output in a file; each test waits
for the lines it expects. What is checked: bytes intact both ways (1 MiB, 20
clients at once), descriptors passed both ways referring to the same inode,
message boundaries on seqpacket and datagram sockets, afunix frames decoded,
client credentials shown, ``--json`` lines parsing, the relay surviving 200
clients that vanish mid-message with no descriptor left open in it, and SIGTERM
removing the LISTEN file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from afunix import Channel, Listener, peer_credentials
from afunix._protocol import encode_header
from afunix.lowlevel import recv_fds, send_fds
from afunix.relay import FrameTracker, Relay, decode_packet_frame

from ..conftest import NOBODY, afunix_cmd, serving


def wait_until(what: Callable[[], bool], why: Callable[[], str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.01)


class Spy:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, *needles: str) -> str:
        wait_until(
            lambda: all(n in self.text() for n in needles),
            lambda: f"missing {needles} in:\n{self.text()}\n{self.err.read_text()}",
        )
        return self.text()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextlib.contextmanager
def spying(sockdir: Path, listen: str, target: str, *opts: str) -> Iterator[Spy]:
    out, err = sockdir / "spy.out", sockdir / "spy.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            afunix_cmd("spy", listen, target, *opts), stdin=subprocess.DEVNULL, stdout=o, stderr=e
        )
    spy = Spy(proc, out, err)
    try:
        wait_until(
            lambda: b"relaying" in err.read_bytes() or proc.poll() is not None,
            lambda: "spy did not start",
        )
        assert proc.poll() is None, err.read_text()
        yield spy
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung relay
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def in_thread(target: Callable[[], None]) -> Iterator[list[BaseException]]:
    """Run *target* in a thread; its exception (if any) is re-raised at the end."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield errors
    finally:
        thread.join(30)
        assert not thread.is_alive()
    if errors:
        raise errors[0]


def exchange(path: str, payload: bytes) -> bytes:
    """Send *payload* to an echo server at *path* while reading; return what came back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)

        def write() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        got = bytearray()
        with in_thread(write):
            while chunk := sock.recv(65536):
                got += chunk
    return bytes(got)


# ----------------------------------------------------------------- bytes
def test_bytes_arrive_intact_both_ways_for_20_clients_at_once(sockdir: Path) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    payloads = [os.urandom(1 << 20)] + [os.urandom(65536 + i) for i in range(19)]
    results: dict[int, bytes] = {}
    with serving(sockdir, real, "--model", "thread"), spying(sockdir, spot, real) as spy:
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, exchange(spot, payloads[i])))
            for i in range(len(payloads))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        text = spy.wait_for(*(f"#{n} closed" for n in range(1, 21)))
    assert [results.get(i) == p for i, p in enumerate(payloads)] == [True] * 20
    assert f"to server {1 << 20} bytes, 0 fd(s); to client {1 << 20} bytes" in text
    assert "client -> server: end of stream" in text


# ----------------------------------------------------------- descriptors
@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_descriptors_pass_both_ways_and_name_the_same_files(sockdir: Path, kind: str) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    data_file = sockdir / "data.txt"
    data_file.write_bytes(b"contents\n")
    seen: dict[str, int] = {}
    r, w = os.pipe()
    pipe_inode = os.fstat(r).st_ino
    try:
        with Listener(real, kind) as listener, spying(sockdir, spot, real, "--type", kind) as spy:

            def serve() -> None:
                with listener.accept() as ch:
                    with peer_credentials(ch.socket) as creds:
                        seen["peer pid"] = creds.pid or 0
                    with ch.recv() as msg:
                        seen["inode"] = os.fstat(msg.fds[0]).st_ino
                    ch.send(b"pipe", fds=[w])

            with in_thread(serve), Channel.connect(spot, kind) as client:
                with open(data_file, "rb") as f:
                    client.send(b"hello", fds=[f])
                with client.recv() as reply:
                    assert reply.data == b"pipe"
                    passed = reply.take_fd()
                with os.fdopen(passed, "wb") as pipe_end:
                    assert os.fstat(pipe_end.fileno()).st_ino == os.fstat(r).st_ino
                    pipe_end.write(b"through")
                assert os.read(r, 7) == b"through"
            text = spy.wait_for("#1 closed")
    finally:
        os.close(r)
        os.close(w)
    assert seen["inode"] == data_file.stat().st_ino
    assert seen["peer pid"] == spy.proc.pid  # the server sees the relay, not the client
    assert f"#1 connect: client pid {os.getpid()}, uid {os.getuid()}" in text
    assert "#1 client -> server: 13 byte(s), 1 fd(s)" in text
    assert "af 00 00 01 00 00 00 05 68 65 6c 6c 6f  |........hello|" in text
    assert "frame at byte 0: 5 byte(s) of payload, 1 fd(s)" in text
    assert f"fd: regular file {data_file} (inode {data_file.stat().st_ino}, open read-only)" in text
    assert "#1 server -> client: 12 byte(s), 1 fd(s)" in text
    assert f"fd: pipe pipe:[{pipe_inode}]" in text
    assert "to server 13 bytes, 1 fd(s); to client 12 bytes, 1 fd(s)" in text


def test_show_fds_server_gets_the_file_a_client_run_as_nobody_sent(sockdir: Path) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    shared = sockdir / "shared.txt"
    shared.write_text("for everyone\n")
    shared.chmod(0o644)
    shown = sockdir / "serve.out"
    with open(shown, "wb") as out, open(sockdir / "serve.log", "wb") as log:
        server = subprocess.Popen(
            afunix_cmd("serve", real, "--show-fds"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=log,
        )
    try:
        wait_until(lambda: b"serving" in (sockdir / "serve.log").read_bytes(), lambda: "no serve")
        with spying(sockdir, spot, real, "--mode", "666") as spy:
            sent = subprocess.run(
                [*NOBODY, *afunix_cmd("send-fds", spot, str(shared), "-q")],
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert sent.returncode == 0, sent.stderr
            text = spy.wait_for("#1 closed")
        inode = shared.stat().st_ino
        wait_until(lambda: f"(inode {inode}," in shown.read_text(), shown.read_text)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    assert f"regular file {shared} (inode {inode}, open read-only" in shown.read_text()
    assert "uid 65534" in text and "gid 65534" in text
    assert f"command '{afunix_cmd()[0]}" in text and "send-fds" in text
    assert f"fd: regular file {shared} (inode {inode}, open read-only)" in text


def test_json_lines_parse_and_carry_frames_descriptors_and_credentials(sockdir: Path) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    with Listener(real) as listener, spying(sockdir, spot, real, "--json", "--preview", "4") as spy:

        def serve() -> None:
            with listener.accept() as ch, ch.recv() as msg:
                ch.send(msg.data.upper())

        a, b = socket.socketpair()
        inodes = {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
        with a, b, in_thread(serve), Channel.connect(spot) as client:
            client.send(b"one", fds=[a], more=True)
            client.send(b"two", fds=[b])
            with client.recv() as reply:
                assert reply.data == b"ONE"
        spy.wait_for('"event": "close"')
        spy.proc.send_signal(signal.SIGTERM)
        assert spy.proc.wait(10) == 0
    events = [json.loads(line) for line in spy.text().splitlines()]
    assert {e["schema"] for e in events} == {"afunix.spy/1"}
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["listening", "connect"] and kinds[-2:] == ["close", "stopped"]
    assert events[1]["client"]["pid"] == os.getpid()
    up = [e for e in events if e["event"] == "data" and e["direction"] == "to-server"]
    frames = [f for e in up for f in e["frames"]]
    assert [(f["length"], f["nfds"]) for f in frames] == [(3, 1), (3, 1)]
    fds = [fd for e in up for fd in e["fds"]]
    assert [(fd["kind"], fd["type"]) for fd in fds] == [("socket", "stream")] * 2
    assert {fd["inode"] for fd in fds} == inodes
    assert up[0]["preview"] == {"hex": "af 00 00 01", "ascii": "....", "shown": 4}
    close = events[-2]
    assert close["to-server"]["fds"] == 2 and close["to-client"]["bytes"] == 11


def test_a_memfd_payload_is_shown_as_a_memfd_frame_and_arrives_whole(sockdir: Path) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    payload = os.urandom(300_000)
    got: list[bytes] = []
    with Listener(real) as listener, spying(sockdir, spot, real) as spy:

        def serve() -> None:
            with listener.accept() as ch, ch.recv() as msg:
                got.append(bytes(msg.data))

        with in_thread(serve), Channel.connect(spot) as client:
            client.send(payload, memfd=True)
        text = spy.wait_for("#1 closed")
    assert got == [payload]
    assert "frame at byte 0: 300000 byte(s) of payload, 1 fd(s), payload in a memfd" in text
    assert "fd: memfd /memfd:" in text


def test_a_target_that_is_not_there_is_reported_and_the_client_let_go(sockdir: Path) -> None:
    spot = str(sockdir / "spy.sock")
    with spying(sockdir, spot, str(sockdir / "nobody-home.sock")) as spy:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(spot)
            assert sock.recv(1) == b""
        text = spy.wait_for("#1 connect", "error")
        assert spy.proc.poll() is None
    assert "nobody-home.sock" in text and "[ENOENT]" in text


# ---------------------------------------------------------- boundaries
def test_seqpacket_and_datagram_boundaries_survive_the_relay(sockdir: Path) -> None:
    sizes = [1, 1000, 100_000, 7]
    for kind in ("seqpacket", "dgram"):
        real, spot = str(sockdir / f"{kind}.sock"), str(sockdir / f"spy-{kind}.sock")
        stype = socket.SOCK_SEQPACKET if kind == "seqpacket" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_UNIX, stype) as server:
            server.bind(real)
            if kind == "seqpacket":
                server.listen()
            got: list[tuple[int, int]] = []

            def serve(
                server: socket.socket = server, kind: str = kind, got: list[tuple[int, int]] = got
            ) -> None:
                conn = server.accept()[0] if kind == "seqpacket" else server
                try:
                    for _ in sizes:
                        data, fds, _, sender = recv_fds(conn, 1 << 18, 4)
                        got.append((len(data), len(fds)))
                        for fd in fds:
                            os.close(fd)
                    conn.sendto(b"ack", sender) if sender else conn.send(b"ack")
                finally:
                    if conn is not server:
                        conn.close()

            with spying(sockdir, spot, real, "--type", kind) as spy, in_thread(serve):
                with socket.socket(socket.AF_UNIX, stype) as client:
                    if kind == "dgram":
                        client.bind(str(sockdir / "client.sock"))
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                    client.connect(spot)
                    for size in sizes:
                        send_fds(client, b"x" * size, [0] if size == 7 else [])
                    client.settimeout(30)
                    assert client.recv(10) == b"ack"
                text = spy.wait_for("server -> client: 3 byte(s)")
        assert got == [(1, 0), (1000, 0), (100_000, 0), (7, 1)], kind
        if kind == "dgram":  # no connection: credentials of the first datagram (SCM_CREDENTIALS)
            assert f"datagrams from {sockdir / 'client.sock'}, client pid {os.getpid()}" in text
        else:
            assert f"#1 connect: client pid {os.getpid()}" in text
        assert "client -> server: 100000 byte(s)" in text
        assert "client -> server: 7 byte(s), 1 fd(s)" in text


def test_frame_tracker_follows_frames_split_at_every_byte() -> None:
    stream = encode_header(5, 1) + b"hello" + encode_header(0) + encode_header(3, 2, 1)
    expected = [(0, 5, 1, False), (13, 0, 0, False), (21, 3, 2, True)]
    for cut in range(len(stream) + 1):
        tracker = FrameTracker()
        frames = tracker.feed(stream[:cut]) + tracker.feed(stream[cut:])
        assert [(f["at"], f["length"], f["nfds"], f["memfd"]) for f in frames] == expected
        assert tracker.stopped is None
    other = FrameTracker()
    assert other.feed(b"GET / HTTP/1.1\r\n") == []
    assert other.stopped is not None and "not an afunix frame: first byte 0x47" in other.stopped
    assert decode_packet_frame(encode_header(2) + b"hi")[0] == {
        "at": 0,
        "length": 2,
        "nfds": 0,
        "memfd": False,
        "flags": 0,
    }
    assert "announces 3" in str(decode_packet_frame(encode_header(3) + b"hi")[1])


# ------------------------------------------------------- hostile clients
def test_relay_survives_200_clients_that_vanish_mid_message_and_leaks_nothing(
    sockdir: Path,
) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    with serving(sockdir, real, "--model", "thread"), spying(sockdir, spot, real) as spy:
        assert exchange(spot, b"warm-up") == b"warm-up"
        spy.wait_for("#1 closed")
        baseline = spy.fd_count()
        rounds = 200
        for i in range(rounds):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(spot)
                if i % 2:  # half a frame header, with a descriptor, then gone
                    send_fds(sock, encode_header(100, 1)[:5], [0])
                else:  # a large write whose echo nobody reads: the relay meets EPIPE/reset
                    sock.sendall(os.urandom(200_000)[: 50_000 + i])
        spy.wait_for(f"#{rounds + 1} closed")
        wait_until(
            lambda: spy.fd_count() == baseline,
            lambda: f"relay holds {spy.fd_count()} fds, {baseline} before: {spy.text()[-2000:]}",
        )
        assert exchange(spot, b"still here") == b"still here"
        assert spy.proc.poll() is None
    assert spy.text().count(" closed: ") == rounds + 2


def _free_fd_numbers(pid: int) -> list[int]:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return [n for n in range(max(used) + 4) if n not in used]


def test_descriptors_lost_to_msg_ctrunc_are_reported_and_end_that_connection(
    sockdir: Path,
) -> None:
    """The relay out of descriptors (RLIMIT_NOFILE lowered with prlimit): the kernel
    drops the passed descriptor and sets MSG_CTRUNC; the spy says so, ends that
    connection and goes on relaying once descriptors are available again."""
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    shared = sockdir / "shared.txt"
    shared.write_text("x")
    with serving(sockdir, real, "--show-fds"), spying(sockdir, spot, real) as spy:
        pid = spy.proc.pid
        limits = f"{os.sysconf('SC_OPEN_MAX')}"
        # Room for exactly two more descriptors: the accepted client and the
        # connection to the server; the descriptor passed finds no room.
        room = _free_fd_numbers(pid)[2]
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={room}:"], check=True)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(shared) as f:
                sock.settimeout(30)
                sock.connect(spot)
                send_fds(sock, b"frame", [f])
                try:  # the relay ended the connection: end of file, or a
                    # reset if it closed with bytes of ours unread
                    assert sock.recv(10) == b""
                except ConnectionResetError:
                    pass
            text = spy.wait_for("#1 closed")
        finally:
            subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={limits}:"], check=True)
        assert "#1 client -> server: descriptors lost (MSG_CTRUNC)" in text
        assert "out of descriptors (RLIMIT_NOFILE, ulimit -n)" in text
        assert "to server 0 bytes, 0 fd(s)" in text
        sent = subprocess.run(
            afunix_cmd("send-fds", spot, str(shared), "-q"), capture_output=True, timeout=30
        )
        assert sent.returncode == 0, sent.stderr
        assert f"fd: regular file {shared}" in spy.wait_for("#2 closed")


def test_a_thread_that_cannot_start_costs_one_client_not_the_relay(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected fault (a fake): the first connection's thread fails to start."""
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    events: list[dict[str, object]] = []
    failures = [RuntimeError("can't start new thread")]
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("spy-") and failures:
            raise failures.pop()
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with (
        serving(sockdir, real),
        Relay(spot, real, sink=events.append) as relay,
        in_thread(relay.serve_forever),
        socket.socket(socket.AF_UNIX) as first,
    ):
        first.settimeout(30)
        first.connect(spot)
        assert first.recv(1) == b""  # let go, not left hanging
        assert exchange(spot, b"second") == b"second"
        wait_until(lambda: any(e["event"] == "close" for e in events), lambda: str(events))
        relay.stop()
    assert not os.path.exists(spot)
    error = next(e for e in events if e["event"] == "error")
    assert error["conn"] == 1 and "cannot relay: can't start new thread" in str(error["error"])
    assert [e["conn"] for e in events if e["event"] == "close"] == [2]


def test_sigterm_ends_connections_removes_the_listen_file_and_exits_0(sockdir: Path) -> None:
    real, spot = str(sockdir / "real.sock"), str(sockdir / "spy.sock")
    with serving(sockdir, real), spying(sockdir, spot, real) as spy:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.settimeout(30)
            idle.connect(spot)
            idle.sendall(b"ping")
            assert idle.recv(4) == b"ping"
            spy.proc.send_signal(signal.SIGTERM)
            assert spy.proc.wait(20) == 0
            assert idle.recv(4) == b""  # its connection was ended, not left hanging
        assert not os.path.exists(spot)
    assert "stopped after 1 connection(s)" in spy.text()


def test_help_says_the_server_sees_the_relay_as_its_peer() -> None:
    done = subprocess.run(afunix_cmd("spy", "--help"), capture_output=True, timeout=30, check=True)
    text = " ".join(done.stdout.decode().split())
    assert "the server sees the relay, not the client, as its peer" in text
