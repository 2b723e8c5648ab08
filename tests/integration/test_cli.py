"""The ``afunix`` command line, run as a user would: a subprocess per command.

Covers ``bind`` (the book's unixbind plus the mode, ``--json``), ``pair``
(the socketpair parent/child exchange), ``serve`` and ``connect`` for each
socket type, shutdown on SIGTERM/SIGINT with a connection in flight, and the
error contract: one ``afunix: error: ...`` line on stderr and a non-zero exit
status (the errno), a traceback only with ``--debug``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import afunix_cmd, serving

MODELS = ["async", "thread", "fork"]
TYPES = ["stream", "dgram", "seqpacket"]


def afunix(
    *args: str, data: bytes = b"", cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        afunix_cmd(*args), input=data, capture_output=True, timeout=15, check=False, cwd=cwd
    )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the error contract and return the message."""
    assert result.returncode != 0
    assert result.stdout == b""
    lines = result.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("afunix: error: "), lines
    assert "Traceback" not in lines[0]
    return lines[0]


def umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# ------------------------------------------------------------------------- bind
_BOUND = re.compile(r"^bound name = (.*), returned len = (\d+)$")
_MODE = re.compile(r"^mode = ([0-7]{4}) \((s[-rwx]{9})\)$")


def test_bind_prints_name_len_and_mode_and_leaves_the_file(sockdir: Path) -> None:
    path = sockdir / "ux.sock"
    result = afunix("bind", str(path))
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.decode().splitlines()
    m = _BOUND.match(first)
    assert m is not None, first
    assert m.group(1) == str(path)
    assert int(m.group(2)) == 2 + len(str(path)) + 1  # offsetof(sun_path) + strlen + NUL
    mm = _MODE.match(second)
    assert mm is not None, second
    st = os.lstat(path)  # left in place, as unixbind does
    assert stat.S_ISSOCK(st.st_mode)
    assert int(mm.group(1), 8) == stat.S_IMODE(st.st_mode) == 0o777 & ~umask()
    assert mm.group(2) == stat.filemode(st.st_mode)


def test_bind_again_replaces_its_own_stale_file_and_remove_cleans_up(sockdir: Path) -> None:
    path = sockdir / "again.sock"
    assert afunix("bind", str(path)).returncode == 0
    result = afunix("bind", str(path), "--remove")
    assert result.returncode == 0, result.stderr
    assert not path.exists()


@pytest.mark.parametrize("mode", ["600", "0o640", "666"])
def test_bind_mode(sockdir: Path, mode: str) -> None:
    path = sockdir / "m.sock"
    result = afunix("bind", str(path), "--mode", mode)
    assert result.returncode == 0, result.stderr
    want = int(mode.removeprefix("0o"), 8)
    assert f"mode = {want:04o} ".encode() in result.stdout
    assert stat.S_IMODE(os.lstat(path).st_mode) == want


def test_bind_json(sockdir: Path) -> None:
    path = sockdir / "j.sock"
    result = afunix("bind", str(path), "--json", "--mode", "660", "--remove")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == {
        "schema": "afunix.bind/1",
        "name": str(path),
        "kind": "path",
        "type": "stream",
        "removed": True,
        "len": 2 + len(str(path)) + 1,
        "mode": "0660",
    }
    assert not path.exists()


def test_bind_abstract_has_no_file_and_no_mode() -> None:
    name = f"afx-cli-{os.getpid()}"
    text = afunix("bind", f"@{name}")
    assert text.returncode == 0, text.stderr
    assert text.stdout.decode().splitlines() == [
        f"bound name = @{name}, returned len = {2 + 1 + len(name)}",
        "mode = none (abstract names have no file and no permissions)",
    ]
    data = json.loads(afunix("bind", f"@{name}", "--json").stdout)
    assert data == {
        "schema": "afunix.bind/1",
        "name": f"@{name}",
        "kind": "abstract",
        "type": "stream",
        "len": 3 + len(name),
        "mode": None,
        "removed": False,
    }


def test_bind_relative_path_is_made_absolute(sockdir: Path) -> None:
    result = afunix("bind", "rel.sock", "--json", cwd=sockdir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == str(sockdir / "rel.sock")
    assert (sockdir / "rel.sock").is_socket()


def test_bind_non_utf8_path_prints_its_bytes(sockdir: Path) -> None:
    path = os.fsencode(sockdir) + b"/\xff.sock"
    # A strict stdout encoding, as under most non-C locales.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        afunix_cmd("bind", os.fsdecode(path)), capture_output=True, timeout=15, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.splitlines()[0]
        == b"bound name = " + path + f", returned len = {2 + len(path) + 1}".encode()
    )
    assert os.path.exists(path)


# ------------------------------------------------------------------------- pair
@pytest.mark.parametrize(
    ("rounds", "sock_type"), [(1, "stream"), (4, "stream"), (3, "seqpacket"), (2, "dgram")]
)
def test_pair_exchanges_n_messages_both_ways(rounds: int, sock_type: str) -> None:
    result = afunix("pair", "--rounds", str(rounds), "--type", sock_type)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines.count("father say : i am children") == rounds
    assert lines.count("children say : i am father") == rounds
    assert lines[-1] == "child exited with status 0"
    assert len(lines) == 2 * rounds + 1


def test_pair_rejects_zero_rounds_as_a_usage_error() -> None:
    result = afunix("pair", "--rounds", "0")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        "afunix pair: error: argument --rounds: 0 is not allowed: give a whole number "
        "from 1 to 2147483647"
    )


# ------------------------------------------------------------- serve + connect
@pytest.mark.parametrize("sock_type", TYPES)
def test_connect_to_serve_echoes_and_exits_0_at_eof(sockdir: Path, sock_type: str) -> None:
    path = str(sockdir / f"{sock_type}.sock")
    data = b"".join(b"line %d\n" % i for i in range(20))
    with serving(sockdir, path, "--type", sock_type) as proc:
        started = time.monotonic()
        result = afunix("connect", path, "--type", sock_type, "--linger", "30", data=data)
        elapsed = time.monotonic() - started
        assert (result.returncode, result.stdout, result.stderr) == (0, data, b"")
        assert elapsed < 5  # ended when the replies were in, not after the 30 s linger
        assert proc.poll() is None
    assert proc.returncode == 0


@pytest.mark.parametrize("model", MODELS)
def test_connect_waits_for_the_last_replies_of_a_large_input(sockdir: Path, model: str) -> None:
    path = str(sockdir / "big.sock")
    data = os.urandom(1 << 20)  # far more than the socket buffers hold
    with serving(sockdir, path, "--model", model):
        result = afunix("connect", path, data=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_datagram_connect_binds_a_private_path_and_removes_it(sockdir: Path) -> None:
    path = str(sockdir / "dg.sock")
    with serving(sockdir, path, "--type", "dgram", "-v"):
        result = afunix("connect", path, "--type", "dgram", data=b"a\nb\n")
        assert (result.returncode, result.stdout) == (0, b"a\nb\n"), result.stderr
    # The server never saw an unbound sender (it would have logged that it could not reply).
    assert b"unbound" not in (sockdir / "serve.log").read_bytes()


def test_serve_fork_reaps_its_children(sockdir: Path) -> None:
    path = str(sockdir / "fork.sock")
    with serving(sockdir, path, "--model", "fork") as proc:
        for i in range(5):
            result = afunix("connect", path, data=b"client %d\n" % i)
            assert result.stdout == b"client %d\n" % i
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 5
        while children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert children.read_text().split() == []  # SIGCHLD + waitpid(WNOHANG): no zombies


def test_serve_replaces_a_stale_socket_file(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # closed without unlinking: a crashed server's leftover
    with serving(sockdir, str(path)):
        assert afunix("connect", str(path), data=b"fresh\n").stdout == b"fresh\n"


def test_second_serve_on_a_live_path_is_refused_naming_the_holder(sockdir: Path) -> None:
    path = str(sockdir / "live.sock")
    with serving(sockdir, path) as first:
        result = afunix("serve", path)
        line = one_error_line(result)
        assert result.returncode == 73  # EX_CANTCREAT: address in use
        assert path in line
        assert f"held by pid {first.pid} " in line
        assert afunix("connect", path, data=b"still here\n").stdout == b"still here\n"
    assert first.returncode == 0


def _connected(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.connect(path)
        c.sendall(b"first")
        assert c.recv(100) == b"first"  # the server is up and serving this connection
    except BaseException:
        c.close()
        raise
    return c


@pytest.mark.parametrize(
    ("model", "sig"),
    [
        ("async", signal.SIGTERM),
        ("thread", signal.SIGTERM),
        ("fork", signal.SIGTERM),
        ("async", signal.SIGINT),
        ("fork", signal.SIGINT),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_signal_removes_the_socket_and_lets_the_connection_in_flight_finish(
    sockdir: Path, model: str, sig: signal.Signals
) -> None:
    path = str(sockdir / "term.sock")
    with serving(sockdir, path, "--model", model) as proc, _connected(path) as c:
        proc.send_signal(sig)
        deadline = time.monotonic() + 3
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Accepting stopped at once: the file is gone, new clients are told so.
        assert not os.path.exists(path)
        refused = afunix("connect", path)
        assert "no such socket" in one_error_line(refused)
        # The connection in flight is still served, then the server exits cleanly.
        assert proc.poll() is None
        c.sendall(b"second")
        assert c.recv(100) == b"second"
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b""
        assert proc.wait(5) == 0


def test_connect_reports_a_server_that_hangs_up_mid_input(sockdir: Path) -> None:
    """A server closing early is an error naming it, not a silent exit (141 or 0)."""
    path = str(sockdir / "rude.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()

        def rude() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(10)  # read a little, then hang up with the rest unread

        t = threading.Thread(target=rude)
        t.start()
        try:
            result = afunix("connect", path, data=b"x" * (8 << 20))
        finally:
            t.join(10)
    line = one_error_line(result)
    assert result.returncode == 74  # EX_IOERR (EPIPE or ECONNRESET)
    assert f"connection to {path} closed by the server before it read all the input" in line


def test_shutdown_timeout_bounds_a_connection_that_never_ends(sockdir: Path) -> None:
    path = str(sockdir / "slow.sock")
    with (
        serving(sockdir, path, "--model", "thread", "--shutdown-timeout", "0.3") as proc,
        _connected(path) as c,
    ):
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 3
        assert c.recv(100) == b""  # the server closed our idle connection
    assert "still open at shutdown" in (sockdir / "serve.log").read_text()


# ------------------------------------------------------------------------ errors
def _stale(sockdir: Path) -> str:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return str(path)


def _regular_file(sockdir: Path) -> str:
    path = sockdir / "file.txt"
    path.write_text("not a socket\n")
    return str(path)


def _directory(sockdir: Path) -> str:
    path = sockdir / "subdir"
    path.mkdir()
    return str(path)


ERROR_CASES: list[tuple[str, Callable[[Path], str], list[str], int, str]] = [
    # (id, make the target, extra args, errno, words the message must contain)
    ("no-such-socket", lambda d: str(d / "missing.sock"), [], errno.ENOENT, "no such socket"),
    ("stale-file", _stale, [], errno.ECONNREFUSED, "nothing is listening there (a stale socket"),
    ("regular-file", _regular_file, [], errno.ECONNREFUSED, "it is a regular file of 13 bytes"),
    ("directory", _directory, [], errno.ECONNREFUSED, "it is a directory"),
    (
        "parent-not-dir",
        lambda d: _regular_file(d) + "/x.sock",
        [],
        errno.ENOTDIR,
        "not a directory",
    ),
    ("too-long", lambda d: str(d / ("x" * 120)), [], errno.ENAMETOOLONG, "longer than the 107"),
    ("bad-scheme", lambda d: "http://example/x", [], errno.EINVAL, "unknown address scheme 'http'"),
]


# The exit status of each case (the table in docs/operations.md): a path too
# long or a bad scheme is a usage error (2); the rest are "unavailable" (69).
CLIENT_STATUS = {
    errno.ENOENT: 69,
    errno.ECONNREFUSED: 69,
    errno.ENOTDIR: 69,
    errno.ENAMETOOLONG: 2,
    errno.EINVAL: 2,
}
# Creating a socket file: a file in the way or no directory is 73
# (EX_CANTCREAT); a path too long for sun_path is a usage error (2).
CREATE_STATUS = {errno.EEXIST: 73, errno.ENOENT: 73, errno.ENAMETOOLONG: 2}


@pytest.mark.parametrize(
    ("target", "extra", "err", "words"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_connect_errors_are_one_clear_line(
    sockdir: Path, target: Callable[[Path], str], extra: list[str], err: int, words: str
) -> None:
    address = target(sockdir)
    result = afunix("connect", address, *extra, data=b"x\n")
    line = one_error_line(result)
    assert result.returncode == CLIENT_STATUS[err]
    assert words in line
    assert address in line
    assert f"[{errno.errorcode[err]}]" in line


@pytest.mark.parametrize(
    ("server_type", "client_type"),
    [("dgram", "stream"), ("stream", "dgram"), ("dgram", "seqpacket"), ("seqpacket", "stream")],
)
def test_connect_to_the_wrong_socket_type_names_the_servers_type(
    sockdir: Path, server_type: str, client_type: str
) -> None:
    path = str(sockdir / "typed.sock")
    with serving(sockdir, path, "--type", server_type):
        result = afunix("connect", path, "--type", client_type, data=b"x\n")
    line = one_error_line(result)
    assert result.returncode == 69  # EX_UNAVAILABLE (EPROTOTYPE)
    theirs = {"dgram": "datagram"}.get(server_type, server_type)
    assert f"it is a {theirs} socket" in line
    assert path in line


@pytest.mark.parametrize(
    ("command", "target", "err", "words"),
    [
        ("bind", _regular_file, errno.EEXIST, "it is a regular file of 13 bytes, not a socket"),
        ("serve", _directory, errno.EEXIST, "it is a directory, not a socket"),
        (
            "bind",
            lambda d: str(d / "no" / "dir.sock"),
            errno.ENOENT,
            "the directory does not exist",
        ),
        ("serve", lambda d: str(d / ("y" * 120)), errno.ENAMETOOLONG, "sun_path"),
    ],
)
def test_bind_and_serve_errors_are_one_clear_line(
    sockdir: Path, command: str, target: Callable[[Path], str], err: int, words: str
) -> None:
    address = target(sockdir)
    before = os.path.lexists(address) and os.lstat(address)
    result = afunix(command, address)
    line = one_error_line(result)
    assert result.returncode == CREATE_STATUS[err]
    assert words in line
    assert address in line
    if before:  # afunix never replaces a file that is not a socket
        after = os.lstat(address)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


@pytest.mark.parametrize("argv", [["connect", "{d}/missing.sock"], ["bind", "{d}/" + "z" * 120]])
def test_debug_shows_the_traceback(sockdir: Path, argv: list[str]) -> None:
    args = [a.format(d=sockdir) for a in argv]
    plain = afunix(*args)
    debug = afunix("--debug", *args)
    assert debug.returncode == plain.returncode != 0
    text = debug.stderr.decode()
    assert text.startswith("Traceback (most recent call last):")
    assert text.splitlines()[-1] == one_error_line(plain)


def test_usage_errors_still_get_argparse_usage() -> None:
    result = afunix("serve", "/tmp/x.sock", "--mode", "999")
    assert result.returncode == 2
    assert b"usage: afunix serve" in result.stderr
    assert b"mode must be octal" in result.stderr
