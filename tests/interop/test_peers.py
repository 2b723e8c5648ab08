"""afunix against real peers: socat, nc -U and C programs in the book's style (UNP 15.2-15.6).

The servers and clients here are separate processes talking through the
kernel: ``afunix serve`` with each concurrency model against ``socat``,
OpenBSD ``nc -U -N`` and ``tests/c/unp_str_cli.c``; the datagram echo
server against ``tests/c/unp_dg_cli.c``, which binds its own path
(15.4 point 8); ``afunix connect`` against ``socat ... EXEC:cat`` and the
book's fork-per-connection server ``tests/c/unp_str_echo_serv.c``; and
``afunix bind`` against the book's ``unixbind``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import afunix_cmd, background, serving, wait_for_path

MODELS = ["async", "thread", "fork"]
LINES = b"hello world\nsecond line\n\xff\xfe not utf-8\n"


def run(
    argv: list[str], data: bytes = b"", timeout: float = 10
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is required for the interop tests (.ci/run installs it)")


# ------------------------------------------------------------ stream / seqpacket
@pytest.mark.parametrize("model", MODELS)
def test_stream_echo_server_with_socat_nc_and_c_str_cli(
    sockdir: Path, model: str, cbuild: Callable[[str], Path]
) -> None:
    require("socat")
    require("nc")
    str_cli = cbuild("unp_str_cli")
    path = str(sockdir / "echo.sock")
    with serving(sockdir, path, "--model", model) as proc:
        got = run(["socat", "-", f"UNIX-CONNECT:{path}"], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        got = run(["nc", "-U", "-N", path], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        got = run([str(str_cli), path], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        assert proc.poll() is None  # every client came and went; the server still serves
    assert proc.returncode == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize("model", MODELS)
def test_seqpacket_echo_server_with_socat_and_c_str_cli(
    sockdir: Path, model: str, cbuild: Callable[[str], Path]
) -> None:
    require("socat")
    str_cli = cbuild("unp_str_cli")
    path = str(sockdir / "seq.sock")
    with serving(sockdir, path, "--type", "seqpacket", "--model", model) as proc:
        # socktype=5 is SOCK_SEQPACKET; socat sends its input as one record.
        got = run(["socat", "-", f"UNIX-CONNECT:{path},socktype=5"], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        # The C client sends a record per line and reads a record per reply.
        got = run([str(str_cli), path, "seqpacket"], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        # A stream client is refused by the kernel: EPROTOTYPE.
        got = run([str(str_cli), path], LINES)
        assert got.returncode != 0
        assert b"Protocol wrong type" in got.stderr
    assert proc.returncode == 0


def test_c_str_cli_reports_a_server_that_closes_early(
    sockdir: Path, cbuild: Callable[[str], Path]
) -> None:
    """The C client really checks what it reads: a silent peer would fail it."""
    str_cli = cbuild("unp_str_cli")
    path = str(sockdir / "close.sock")
    require("socat")
    ready = lambda: os.path.exists(path)  # noqa: E731
    # The peer reads one line and exits without replying: the write succeeds, the read sees EOF.
    with background(["socat", f"UNIX-LISTEN:{path}", "SYSTEM:read line"], sockdir / "s.log", ready):
        got = run([str(str_cli), path], b"anyone there?\n")
    assert got.returncode == 1
    assert b"server terminated prematurely" in got.stderr


def test_abstract_echo_server_with_socat(sockdir: Path) -> None:
    require("socat")
    name = f"afx-test-{os.getpid()}-{secrets.token_hex(4)}"
    with serving(sockdir, f"@{name}", "--model", "thread"):
        got = run(["socat", "-", f"ABSTRACT-CONNECT:{name}"], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        mine = run(afunix_cmd("connect", f"unix-abstract:{name}"), LINES)
        assert (mine.returncode, mine.stdout) == (0, LINES), mine.stderr


# --------------------------------------------------------------------- datagram
@pytest.mark.parametrize("model", MODELS)
def test_datagram_echo_server_with_c_client_that_binds_a_path(
    sockdir: Path, model: str, cbuild: Callable[[str], Path]
) -> None:
    dg_cli = cbuild("unp_dg_cli")
    path = str(sockdir / "dg.sock")
    client_path = str(sockdir / "client.sock")
    with serving(sockdir, path, "--type", "dgram", "--model", model) as proc:
        # The C client checks that each reply comes from the server's path.
        got = run([str(dg_cli), path, client_path], LINES)
        assert (got.returncode, got.stdout) == (0, LINES), got.stderr
        assert not os.path.exists(client_path)  # the C client removed its own path
        assert proc.poll() is None
    assert proc.returncode == 0
    assert not os.path.exists(path)


def test_c_dg_cli_fails_without_a_reply(sockdir: Path, cbuild: Callable[[str], Path]) -> None:
    """Against a server that never answers the C client fails (no false passes)."""
    dg_cli = cbuild("unp_dg_cli")
    path = str(sockdir / "mute.sock")
    client_path = str(sockdir / "client.sock")
    require("socat")
    ready = lambda: os.path.exists(path)  # noqa: E731
    # A datagram sink: it reads and never replies.
    with background(
        ["socat", "-u", f"UNIX-RECV:{path}", "OPEN:/dev/null"], sockdir / "s.log", ready
    ):
        got = run([str(dg_cli), path, client_path, "300"], b"ping\n")
    assert got.returncode != 0
    assert b"recvfrom" in got.stderr
    assert got.stdout == b""


# ---------------------------------------------------------------- afunix connect
def test_connect_against_socat_exec_cat(sockdir: Path) -> None:
    require("socat")
    path = str(sockdir / "cat.sock")
    ready = lambda: os.path.exists(path)  # noqa: E731
    with background(["socat", f"UNIX-LISTEN:{path},fork", "EXEC:cat"], sockdir / "s.log", ready):
        big = os.urandom(300_000)  # more than the socket buffers hold: replies must be awaited
        for data in (LINES, big):
            started = time.monotonic()
            got = run(afunix_cmd("connect", path, "--linger", "30"), data)
            assert got.returncode == 0, got.stderr
            assert got.stdout == data
            assert got.stderr == b""
            assert time.monotonic() - started < 5  # ended at EOF, not by the linger


def test_connect_against_c_fork_echo_server(sockdir: Path, cbuild: Callable[[str], Path]) -> None:
    server = cbuild("unp_str_echo_serv")
    path = str(sockdir / "c.sock")
    ready = lambda: os.path.exists(path)  # noqa: E731
    with background([str(server), path], sockdir / "c.log", ready):
        for i in range(3):  # one child per connection, reaped by SIGCHLD
            data = LINES * (i + 1)
            started = time.monotonic()
            got = run(afunix_cmd("connect", path, "--linger", "30"), data)
            assert (got.returncode, got.stdout, got.stderr) == (0, data, b"")
            assert time.monotonic() - started < 5


# ------------------------------------------------------------------- afunix bind
_BOUND = re.compile(rb"^bound name = (.*), returned len = (\d+)$", re.MULTILINE)


def _bound(out: bytes) -> tuple[bytes, int]:
    m = _BOUND.search(out)
    assert m is not None, out
    return m.group(1), int(m.group(2))


@pytest.mark.parametrize("name", ["ux.sock", "u", "a-much-longer-socket-name-" + "x" * 40])
def test_bind_len_matches_the_c_unixbind(
    sockdir: Path, name: str, cbuild: Callable[[str], Path]
) -> None:
    unixbind = cbuild("unp_unixbind")
    path = str(sockdir / name)
    c = run([str(unixbind), path])
    assert c.returncode == 0, c.stderr
    c_name, c_len = _bound(c.stdout)
    os.unlink(path)
    mine = run(afunix_cmd("bind", path))
    assert mine.returncode == 0, mine.stderr
    assert _bound(mine.stdout) == (c_name, c_len) == (os.fsencode(path), 2 + len(path) + 1)


def test_bind_len_is_15_for_a_tmp_ux_sock_style_path(cbuild: Callable[[str], Path]) -> None:
    """The book's example: ``unixbind /tmp/ux.sock`` prints ``returned len = 15``."""
    unixbind = cbuild("unp_unixbind")
    path = "/tmp/x" + secrets.token_hex(3)  # 12 bytes, like /tmp/ux.sock
    assert len(path) == len("/tmp/ux.sock") and not os.path.lexists(path)
    try:
        c = run([str(unixbind), path])
        assert _bound(c.stdout) == (path.encode(), 15)
        mine = run(afunix_cmd("bind", path, "--remove"))
        assert _bound(mine.stdout) == (path.encode(), 15)
        assert not os.path.lexists(path)  # afunix replaced C's stale socket, then --remove
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_bind_replaces_the_stale_file_unixbind_leaves(
    sockdir: Path, cbuild: Callable[[str], Path]
) -> None:
    unixbind = cbuild("unp_unixbind")
    path = sockdir / "left.sock"
    assert run([str(unixbind), str(path)]).returncode == 0
    wait_for_path(path)  # the book's program leaves its socket file behind
    mine = run(afunix_cmd("bind", str(path), "--remove"))
    assert mine.returncode == 0, mine.stderr
    assert not path.exists()
