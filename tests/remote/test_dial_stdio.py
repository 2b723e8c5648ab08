"""``afunix dial-stdio``: a real subprocess relaying to real servers.

Half-close both ways, a peer reset (74), 8 MiB through an echo server with
both directions busy at once (hash compared), ``ssh://`` and ``tcp://`` (as
OpenSSH's ``ProxyCommand``, against the fixture's sshd).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import afunix_cmd, serving
from ..remote_support import Sshd

MIB = 1 << 20


def dial(
    address: str, data: bytes, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        afunix_cmd("dial-stdio", address),
        input=data,
        capture_output=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.fixture
def echo(sockdir: Path) -> Iterator[Path]:
    path = sockdir / "echo.sock"
    with serving(sockdir, str(path)):
        yield path


def _one_client(listener: socket.socket, handle: object) -> threading.Thread:
    """Serve one client on a thread; ``accept`` gives up after 60 s (a client that never came)."""
    listener.settimeout(60)

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            handle(conn)  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_end_of_input_shuts_down_the_write_side_and_the_reply_still_comes(
    sockdir: Path,
) -> None:
    path = str(sockdir / "digest.sock")

    def digest_after_eof(conn: socket.socket) -> None:
        h = hashlib.sha256()
        while chunk := conn.recv(65536):  # ends only if the client shut down writing
            h.update(chunk)
        conn.sendall(h.hexdigest().encode())

    data = os.urandom(300_000)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        server = _one_client(listener, digest_after_eof)
        result = dial(path, data)
        server.join(30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(data).hexdigest().encode()
    assert result.stderr == b""


def test_eight_mib_both_ways_at_once_arrive_intact(echo: Path) -> None:
    data = os.urandom(8 * MIB)
    result = dial(str(echo), data)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_a_peer_reset_is_an_io_error(sockdir: Path) -> None:
    path = str(sockdir / "reset.sock")

    def close_unread(conn: socket.socket) -> None:
        conn.recv(1, socket.MSG_PEEK)  # data waits unread: close() resets the client

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        server = _one_client(listener, close_unread)
        proc = subprocess.Popen(
            afunix_cmd("dial-stdio", path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"request that nobody reads\n")
            proc.stdin.flush()  # standard input stays open: the reset ends the run
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.join(30)
    assert proc.returncode == 74, err
    line = err.decode()
    assert line.startswith("afunix: error: receiving from") and "ECONNRESET" in line
    assert out == b""


def test_nothing_there_is_69_in_one_line(sockdir: Path) -> None:
    result = dial(str(sockdir / "missing.sock"), b"")
    assert result.returncode == 69
    assert result.stderr.decode().count("\n") == 1 and "no such socket" in result.stderr.decode()


def test_ssh_address(ssh_env: Sshd, echo: Path) -> None:
    data = os.urandom(MIB)
    result = dial(ssh_env.url(echo), data, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_as_openssh_proxy_command(sshd: Sshd) -> None:
    proxy = " ".join([sys.executable, "-m", "afunix", "dial-stdio", "tcp://127.0.0.1:%p"])
    result = subprocess.run(
        [
            "ssh",
            "-F",
            str(sshd.client_config),
            "-o",
            f"ProxyCommand={proxy}",
            "-p",
            str(sshd.port),
            "root@127.0.0.1",
            "echo",
            "through dial-stdio",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"through dial-stdio\n"


def test_help_has_an_example() -> None:
    result = subprocess.run(afunix_cmd("dial-stdio", "--help"), capture_output=True, timeout=60)
    assert result.returncode == 0
    assert b"ProxyCommand='afunix dial-stdio" in result.stdout


def test_standard_output_closed_is_141_without_a_word(echo: Path) -> None:
    proc = subprocess.Popen(
        afunix_cmd("dial-stdio", str(echo)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b"x" * 65536)
        proc.stdin.flush()
        assert proc.stdout.read(1) == b"x"
        proc.stdout.close()  # like `| head -c 1`
        with contextlib.suppress(BrokenPipeError):  # it may have exited already
            proc.stdin.write(b"y" * (4 * MIB))  # the echo comes back to a closed pipe
            proc.stdin.flush()
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        err = proc.stderr.read()
        proc.stderr.close()
        proc.wait(60)
    assert proc.returncode == 141, err
    assert err == b""


def test_bash_completes_the_command_name(afunix_on_path: dict[str, str]) -> None:
    env = afunix_on_path
    script = (
        "source <(afunix completion bash) && "
        'COMP_LINE="afunix dial" COMP_POINT=11 COMP_WORDS=(afunix dial) COMP_CWORD=1 && '
        '_python_argcomplete afunix dial afunix && printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert [w.strip() for w in result.stdout.splitlines()] == ["dial-stdio"]
