"""``afunix ls`` and ``afunix probe`` against real sockets, files, users and servers.

Every verdict of ``probe`` with its exit status, the peers and queues ``ls``
reads from the kernel (sock_diag), the filters, both JSON schemas, and the
table for humans (plain through a pipe, coloured only on a terminal without
``NO_COLOR``). Other programs' sockets share the host, so each test looks
only at the addresses it made.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afunix.probe import EXIT_STATUS

from ..conftest import NOBODY, afunix_cmd, background, serving

NOBODY_UID = 65534


def cli(
    *args: str, nobody: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [*NOBODY, *afunix_cmd(*args)] if nobody else afunix_cmd(*args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, env=env)


def probe(addr: str | Path, *, nobody: bool = False) -> tuple[int, dict[str, Any]]:
    done = cli("probe", "--json", str(addr), nobody=nobody)
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


def ls(*filters: str) -> list[dict[str, Any]]:
    done = cli("ls", "--json", *filters)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["schema"] == "afunix.ls/1"
    assert out["source"] == "sock_diag"
    return list(out["sockets"])


def ino(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@pytest.fixture
def nobody_dir(sockdir: Path) -> Path:
    d = sockdir / "n"
    d.mkdir()
    os.chown(d, NOBODY_UID, NOBODY_UID)
    return d


@pytest.fixture
def listener(sockdir: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sockdir / "l.sock"))
        s.listen(4)
        yield s


# ---------------------------------------------------------------- probe verdicts


def test_live_thread_server_owned_by_root(sockdir: Path) -> None:
    path = sockdir / "srv.sock"
    with serving(sockdir, str(path), "--model", "thread") as proc:
        rc, out = probe(path)
        human = cli("probe", str(path))
    assert rc == 0 == EXIT_STATUS["live"]
    assert out["verdict"] == "live" and out["type"] == "stream"
    assert {"pid": proc.pid, "command": "python3", "uid": 0} in out["holders"] or [
        h["pid"] for h in out["holders"]
    ] == [proc.pid]
    assert out["server"] == {"pid": proc.pid, "uid": 0, "gid": 0}
    assert isinstance(out["accept_queue"], int) and out["backlog"] >= 1
    assert human.returncode == 0
    assert f"{path}: live - a stream server answers" in human.stdout
    assert f"server    pid {proc.pid}, uid root(0), gid 0 (SO_PEERCRED)" in human.stdout


def test_live_server_run_as_nobody(sockdir: Path, nobody_dir: Path) -> None:
    path = nobody_dir / "srv.sock"
    log = sockdir / "nobody.log"
    argv = [*NOBODY, *afunix_cmd("serve", str(path), "--model", "thread", "--mode", "666")]
    with background(argv, log, lambda: b"serving" in log.read_bytes()) as proc:
        rc, out = probe(path)
        rc_nobody, out_nobody = probe(path, nobody=True)
        mine = ls("--user", "nobody", "--path", str(path))
        by_uid = ls("--user", str(NOBODY_UID), "--path", str(path), "--listening")
        as_root = ls("--user", "root", "--path", str(path))
    assert rc == 0 and rc_nobody == 0
    assert out["server"] == {"pid": proc.pid, "uid": NOBODY_UID, "gid": NOBODY_UID}
    assert [(h["pid"], h["uid"]) for h in out["holders"]] == [(proc.pid, NOBODY_UID)]
    assert out_nobody["server"] == out["server"]  # a user may probe its own server
    assert [s["uid"] for s in mine] == [NOBODY_UID] and mine[0]["state"] == "listening"
    assert by_uid == mine
    assert as_root == []


def test_stale_socket_file(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
    rc, out = probe(path)
    assert (rc, out["verdict"], out["type"], out["holders"]) == (5, "stale", None, [])
    assert "nobody is bound" in out["detail"]


def test_bound_not_listening_is_starting(sockdir: Path) -> None:
    path = sockdir / "starting.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        rc, out = probe(path)
        assert (rc, out["verdict"], out["inode"]) == (6, "starting", ino(s))
    assert [h["pid"] for h in out["holders"]] == [os.getpid()]


def test_foreign_socket_in_private_dir_probed_as_nobody(sockdir: Path) -> None:
    private = sockdir / "private"
    private.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(private / "root.sock"))
        s.listen()
        rc, out = probe(private / "root.sock", nobody=True)
        rc_root, _ = probe(private / "root.sock")
    assert (rc, out["verdict"]) == (7, "denied")
    assert "directory on the way" in out["detail"]
    assert rc_root == 0


def test_socket_file_mode_refuses_nobody(sockdir: Path) -> None:
    path = sockdir / "mode.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen()
        rc, out = probe(path, nobody=True)
    assert (rc, out["verdict"], out["server"]) == (7, "denied", None)
    assert "socket file's mode" in out["detail"]


@pytest.mark.parametrize("kind", ["file", "dir", "fifo"])
def test_not_a_socket(sockdir: Path, kind: str) -> None:
    path = sockdir / kind
    if kind == "file":
        path.write_bytes(b"hello")
    elif kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    rc, out = probe(path)
    assert (rc, out["verdict"]) == (4, "not-socket")
    expected = {"file": "a regular file of 5 bytes", "dir": "a directory", "fifo": "a FIFO"}[kind]
    assert expected in out["detail"]


@pytest.mark.parametrize("tail", ["missing.sock", "no/such/dir.sock"])
def test_missing_path(sockdir: Path, tail: str) -> None:
    rc, out = probe(sockdir / tail)
    assert (rc, out["verdict"], out["inode"]) == (3, "nothing", None)


def test_abstract_names(sockdir: Path) -> None:
    name = f"afx-probe-{os.getpid()}-{sockdir.name}"
    assert probe(f"@{name}")[0] == 3
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(b"\0" + name.encode())
        assert probe(f"@{name}")[1]["verdict"] == "starting"
        s.listen()
        rc, out = probe(f"@{name}")
        assert (rc, out["verdict"], out["type"], out["inode"]) == (0, "live", "stream", ino(s))
    assert out["server"]["pid"] == os.getpid()


def test_datagram_socket(sockdir: Path) -> None:
    path = sockdir / "dg.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        rc, out = probe(path)
        (row,) = ls("--path", str(path))
        assert (rc, out["verdict"], out["type"], out["inode"]) == (0, "live", "dgram", ino(s))
    assert out["accept_queue"] is None and out["backlog"] is None
    # The probe connected to it: Linux now marks it established, yet it has no peer.
    assert (row["type"], row["state"], row["peer"]) == ("dgram", "unconnected", None)


def test_connected_datagram_client(sockdir: Path) -> None:
    path = sockdir / "dg.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.connect(str(path))
            rows = {r["inode"]: r for r in ls("--pid", str(os.getpid()))}
            srv, cli_row = rows[ino(server)], rows[ino(client)]
            assert (cli_row["state"], cli_row["peer"]["inode"]) == ("connected", ino(server))
            assert cli_row["peer"]["address"] == str(path)
    assert (srv["state"], srv["peer"]) == ("unconnected", None)


PROBE_ROUNDS = 200


def test_probes_leave_no_connection_behind(sockdir: Path) -> None:
    """200 probes in a row against a thread-model server: each one live, and
    afterwards the server holds no connection (each probe closed its own)."""
    from afunix._address import Address
    from afunix.diag import dump, holders
    from afunix.probe import probe as probe_call

    path = sockdir / "srv.sock"
    with serving(sockdir, str(path), "--model", "thread") as proc:
        verdicts = [probe_call(Address.parse(str(path))).verdict for _ in range(PROBE_ROUNDS)]
        deadline = time.monotonic() + 15
        while True:
            held = holders()
            mine = [
                s
                for s in dump()
                if s.address == str(path) and proc.pid in [h.pid for h in held.get(s.inode, [])]
            ]  # (the server's own unnamed socketpair, its wake-up channel, is left out)
            connected = [s for s in mine if s.state_name == "connected"]
            if not connected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert verdicts == ["live"] * PROBE_ROUNDS
    assert [s.state_name for s in mine] == ["listening"]


def test_seqpacket_server(sockdir: Path) -> None:
    path = sockdir / "sp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(path))
        s.listen()
        rc, out = probe(path)
        s.accept()[0].close()
    assert (rc, out["type"]) == (0, "seqpacket")


def test_probe_does_not_leave_a_connection_hanging(listener: socket.socket) -> None:
    rc, _ = probe(listener.getsockname())
    assert rc == 0
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        assert conn.recv(1) == b""  # the probe closed: end of file at once


def test_full_accept_queue_is_live(listener: socket.socket) -> None:
    clients = []
    try:
        while True:  # Linux takes backlog + 1 connections before EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            clients.append(c)
            try:
                c.connect(listener.getsockname())
            except BlockingIOError:
                break
        rc, out = probe(listener.getsockname())
        assert (rc, out["verdict"], out["queue_full"], out["server"]) == (0, "live", True, None)
        assert (out["accept_queue"], out["backlog"]) == (5, 4)
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------- ls


def test_connected_pair_are_each_others_peer() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello")
        rows = {r["inode"]: r for r in ls("--pid", str(os.getpid()))}
        ia, ib = ino(a), ino(b)
    ra, rb = rows[ia], rows[ib]
    assert ra["peer"]["inode"] == ib and rb["peer"]["inode"] == ia
    assert ra["state"] == rb["state"] == "connected"
    assert [h["pid"] for h in ra["peer"]["holders"]] == [os.getpid()]
    assert rb["rqueue"] == 5  # five bytes b has not read
    assert ra["address"] is None and ra["accept_queue"] is None


def test_queue_lengths_with_unaccepted_clients(listener: socket.socket) -> None:
    path = listener.getsockname()
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for c in clients:
            c.connect(path)
        rows = ls("--path", path)
        (row,) = [r for r in rows if r["state"] == "listening"]
        client_rows = {r["inode"]: r for r in ls("--pid", str(os.getpid())) if r["address"] is None}
        table = cli("ls", "--path", path, "--listening")
        _, out = probe(path)
        inodes = sorted(ino(c) for c in clients)
    finally:
        for c in clients:
            c.close()
    assert (row["accept_queue"], row["backlog"]) == (3, 4)
    assert sorted(row["pending"]) == inodes
    assert (out["accept_queue"], out["backlog"]) == (3, 4)  # read before its own connect
    # Each waiting client is connected; its peer, the server end, lives only in
    # the accept queue and has no inode until accepted: no peer yet.
    assert [(client_rows[i]["state"], client_rows[i]["peer"]) for i in inodes] == [
        ("connected", None)
    ] * 3
    assert [r["state"] for r in rows] == ["listening"]
    assert f"{ino(listener)}  {path}  stream  listening  {os.getpid()}" in table.stdout
    assert "3/4" in table.stdout


def test_filters(listener: socket.socket, sockdir: Path) -> None:
    path = listener.getsockname()
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
        conn, _ = listener.accept()
        with conn:  # the accepted end carries the listener's name
            everything = ls("--path", str(sockdir))
            listening = ls("--path", str(sockdir), "--listening")
            nobody = ls("--path", str(sockdir), "--user", "nobody")
            other_pid = ls("--path", str(sockdir), "--pid", "1")
            accepted = ino(conn)
    assert {(r["inode"], r["state"]) for r in everything} == {
        (ino(listener), "listening"),
        (accepted, "connected"),
    }
    assert [r["inode"] for r in listening] == [ino(listener)]
    assert nobody == [] and other_pid == []


def test_usage_errors_exit_2() -> None:
    for args in (
        ["ls", "--user", "no-such-user-xyz"],
        ["ls", "--pid", "abc"],
        ["probe", "tcp://h:1"],
        ["probe"],
    ):
        done = cli(*args)
        assert done.returncode == 2, args
        assert "usage:" in done.stderr


def test_exit_statuses_are_distinct_and_documented() -> None:
    assert sorted(EXIT_STATUS.values()) == [0, 3, 4, 5, 6, 7]
    text = cli("probe", "--help").stdout
    for verdict, status in EXIT_STATUS.items():
        assert f"  {status}  {verdict}" in text


# --------------------------------------------------------------- JSON schemas

LS_KEYS: dict[str, tuple[type, ...]] = {
    "inode": (int,),
    "address": (str, type(None)),
    "type": (str,),
    "state": (str,),
    "uid": (int, type(None)),
    "holders": (list,),
    "peer": (dict, type(None)),
    "accept_queue": (int, type(None)),
    "backlog": (int, type(None)),
    "pending": (list,),
    "rqueue": (int, type(None)),
    "wqueue": (int, type(None)),
}
PROBE_KEYS: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "address": (str,),
    "verdict": (str,),
    "exit_status": (int,),
    "detail": (str,),
    "type": (str, type(None)),
    "inode": (int, type(None)),
    "holders": (list,),
    "server": (dict, type(None)),
    "accept_queue": (int, type(None)),
    "backlog": (int, type(None)),
    "queue_full": (bool,),
}


def check_holders(holders: list[dict[str, Any]]) -> None:
    for h in holders:
        assert set(h) == {"pid", "command", "uid"}
        assert (
            isinstance(h["pid"], int)
            and isinstance(h["command"], str)
            and isinstance(h["uid"], int)
        )


def test_ls_json_schema(listener: socket.socket) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(listener.getsockname())
        rows = ls()  # every socket on the host, whoever made it
    assert rows
    for row in rows:
        assert set(row) == set(LS_KEYS)
        for key, types in LS_KEYS.items():
            assert isinstance(row[key], types), (key, row)
        assert row["type"] in {"stream", "dgram", "seqpacket"}
        assert row["state"] in {"listening", "connected", "unconnected"}
        check_holders(row["holders"])
        if row["peer"] is not None:
            assert set(row["peer"]) == {"inode", "address", "holders"}
            check_holders(row["peer"]["holders"])
        if row["state"] == "listening":
            assert isinstance(row["accept_queue"], int) and row["rqueue"] is None
        else:
            assert row["accept_queue"] is None and row["pending"] == []


def test_probe_json_schema(sockdir: Path, listener: socket.socket) -> None:
    (sockdir / "file").write_bytes(b"")
    for addr in (listener.getsockname(), sockdir / "file", sockdir / "none", "@afx-none"):
        rc, out = probe(addr)
        assert set(out) == set(PROBE_KEYS)
        for key, types in PROBE_KEYS.items():
            assert isinstance(out[key], types), (key, out)
        assert out["schema"] == "afunix.probe/1"
        assert out["exit_status"] == rc == EXIT_STATUS[out["verdict"]]
        check_holders(out["holders"])
        if out["server"] is not None:
            assert set(out["server"]) == {"pid", "uid", "gid"}


# ------------------------------------------------------------------- the table


def run_on_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run the CLI with a pseudo-terminal as standard output; return what it wrote."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(afunix_cmd(*args), stdout=slave, stderr=subprocess.DEVNULL, env=env)
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                out += chunk
        proc.wait(10)
        return out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_table_colour_only_on_a_terminal_without_no_color(listener: socket.socket) -> None:
    path = listener.getsockname()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="200")
    piped = cli("ls", "--path", path, env=env).stdout
    assert piped.startswith("INODE") and "\x1b[" not in piped
    coloured = run_on_terminal(["ls", "--path", path], env)
    plain = run_on_terminal(["ls", "--path", path], {**env, "NO_COLOR": "1"})
    assert path.encode() in coloured and path.encode() in plain
    assert b"\x1b[" in coloured
    assert b"\x1b[3" not in plain and b"\x1b[1m" not in plain  # no colour, no bold


def test_fallback_to_proc_net_unix(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where sock_diag is refused (no unix_diag module, a seccomp filter), ls reads
    /proc/net/unix: names, types and states, no peers or queues, and says so."""
    from afunix import diag as _diag
    from afunix.cli import main

    def refused() -> list[_diag.UnixSocketInfo]:
        raise OSError(2, "sock_diag refused the request: No such file or directory")

    monkeypatch.setattr(_diag, "dump", refused)
    assert main(["ls", "--json", "--path", listener.getsockname()]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["sockets"]
    assert out["source"] == "/proc/net/unix"
    assert (row["inode"], row["state"], row["uid"], row["backlog"]) == (
        ino(listener),
        "listening",
        None,
        None,
    )
    assert main(["ls", "--path", listener.getsockname()]) == 0
    table = capsys.readouterr()
    assert "sock_diag unavailable" in table.err
    assert f"stream  listening  {os.getpid()}" in table.out and "None" not in table.out
