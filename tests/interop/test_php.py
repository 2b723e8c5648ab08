"""The seed's PHP peers of section 15.7, run with ``php``, against afunix.

The four PHP programs in ``tests/php/`` are the seed's, changed only in their
paths (see the comment at the top of each):

* the PHP stream and datagram *clients* pass a file's descriptor to
  ``afunix serve --show-fds``, which must name the file, its inode and its
  open mode;
* ``afunix send-fds`` passes descriptors to the PHP stream and datagram
  *servers*, whose ``var_dump`` must show an ``SCM_RIGHTS`` message with the
  descriptors as PHP stream resources (and, for the stream server, which
  keeps them, ``/proc/PID/fd`` must show the files open in the PHP process).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..conftest import afunix_cmd, wait_for_path

PHP_DIR = Path(__file__).parent.parent / "php"


@pytest.fixture(scope="module")
def php() -> str:
    exe = shutil.which("php")
    if exe is None:
        pytest.fail("php-cli is required for these tests (apt-get install php-cli)")
    mods = subprocess.run([exe, "-m"], capture_output=True, text=True, check=True).stdout
    if "sockets" not in mods.split():
        pytest.fail("php's sockets extension is required (php-cli on Debian has it)")
    return exe


@pytest.fixture
def textfile(sockdir: Path) -> Path:
    path = sockdir / "common.h"
    path.write_text("#define MAXLINE 4096\n")
    return path


@contextmanager
def background(argv: list[str], out: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


def wait_for_text(path: Path, pattern: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if re.search(pattern, text, re.S):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not found in {text!r}")
        time.sleep(0.02)


# --------------------------------------------- PHP clients -> afunix serve --show-fds
@pytest.mark.parametrize(
    ("kind", "client"), [("stream", "fd_stream_client.php"), ("dgram", "fd_dgram_client.php")]
)
def test_php_client_to_afunix_show_fds(
    php: str, sockdir: Path, textfile: Path, kind: str, client: str
) -> None:
    path = sockdir / "fpm"
    out = sockdir / "serve.out"
    with background(afunix_cmd("serve", str(path), "--show-fds", "--type", kind), out) as server:
        wait_for_text(out, "serving")
        proc = subprocess.run(
            [php, str(PHP_DIR / client), str(path), str(textfile)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert b"bool(true)" in proc.stdout  # socket_connect succeeded
        text = wait_for_text(out, re.escape(str(textfile)))
        assert server.poll() is None
    ino = textfile.stat().st_ino
    assert "1 byte(s) of payload, 1 descriptor(s)" in text
    assert re.search(
        rf"fd \d+: regular file {re.escape(str(textfile))} \(inode {ino}, open read-only, offset 0\)",
        text,
    ), text


# --------------------------------------------- afunix send-fds -> PHP servers
def _assert_php_received(text: str, count: int) -> None:
    # var_dump of socket_recvmsg's result: one SOL_SOCKET(1)/SCM_RIGHTS(1) message
    # whose data are the passed descriptors, as PHP stream resources.
    control = re.search(
        r'\["level"\]=>\s*int\(1\)\s*\["type"\]=>\s*int\(1\)\s*\["data"\]=>\s*'
        rf"array\({count}\)",
        text,
    )
    assert control, text
    assert len(re.findall(r"resource\(\d+\) of type \(stream\)", text)) == count
    assert re.search(r'\["iov"\]=>\s*array\(1\)\s*\{\s*\[0\]=>\s*string\(1\) " "', text), text


def test_send_fds_to_the_php_stream_server(php: str, sockdir: Path, textfile: Path) -> None:
    path = sockdir / "fpm"
    out = sockdir / "php.out"
    with background([php, str(PHP_DIR / "fd_stream_server.php"), str(path)], out) as server:
        wait_for_path(path)
        proc = subprocess.run(
            afunix_cmd("send-fds", str(path), str(textfile), str(sockdir)),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        text = wait_for_text(out, r'\["flags"\]')
        _assert_php_received(text, 2)
        # The PHP server keeps $data until its next accept: the files are open there.
        held = {
            os.readlink(f"/proc/{server.pid}/fd/{n}") for n in os.listdir(f"/proc/{server.pid}/fd")
        }
        assert str(textfile) in held
        assert str(sockdir) in held


def test_send_fds_to_the_php_datagram_server(php: str, sockdir: Path, textfile: Path) -> None:
    path = sockdir / "fpm"
    out = sockdir / "php.out"
    with background([php, str(PHP_DIR / "fd_dgram_server.php"), str(path)], out):
        wait_for_path(path)
        proc = subprocess.run(
            afunix_cmd("send-fds", str(path), str(textfile), "--type", "dgram"),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        text = wait_for_text(out, r'\["flags"\]')
    _assert_php_received(text, 1)
