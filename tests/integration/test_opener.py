"""``my_open`` / ``afunix openfile`` / ``afunix cat``: the book's protocol (UNP 15.7), for real.

``my_open`` runs the helper as a separate program (``afunix openfile``),
which passes the descriptor back with one byte of payload and reports
failure through its exit status (the errno). Also: the 15.7 tour section
and the command-line tools around descriptor passing (``send-fds``,
``serve --show-fds``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import afunix
import afunix.lowlevel
from afunix.opener import DEFAULT_HELPER, HelperError, my_open

from ..conftest import NOBODY, afunix_cmd, wait_for_path


@pytest.fixture
def textfile(tmp_path: Path) -> Path:
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello, descriptor\n")
    return path


def script(tmp_path: Path, name: str, body: str) -> Path:
    """A helper program written as a tiny Python script (to misbehave on purpose)."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------ my_open
def test_my_open_returns_a_descriptor_of_the_file(textfile: Path) -> None:
    fd = my_open(textfile)
    try:
        assert os.read(fd, 100) == b"hello, descriptor\n"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(fd).st_ino == textfile.stat().st_ino
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)


def test_default_helper_is_afunix_openfile_of_this_interpreter() -> None:
    assert (sys.executable, "-m", "afunix", "openfile") == DEFAULT_HELPER


@pytest.mark.parametrize(
    ("name", "flags", "exc", "err"),
    [
        ("missing", os.O_RDONLY, FileNotFoundError, errno.ENOENT),
        ("dir", os.O_WRONLY, IsADirectoryError, errno.EISDIR),
        ("file/below", os.O_RDONLY, NotADirectoryError, errno.ENOTDIR),
    ],
)
def test_my_open_errors_come_from_the_exit_status(
    tmp_path: Path, name: str, flags: int, exc: type[OSError], err: int
) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    path = tmp_path / name
    with pytest.raises(exc) as info:
        my_open(path, flags)
    assert info.value.errno == err
    assert info.value.filename == str(path)
    assert info.value.strerror == os.strerror(err)


def test_my_open_as_another_user_gets_eacces(sockdir: Path) -> None:
    """The helper's rights decide: a nobody helper opens 0644 but not 0600 files."""
    secret = sockdir / "secret"
    secret.write_text("root only")
    secret.chmod(0o644)
    helper = [*NOBODY, *DEFAULT_HELPER]
    os.close(my_open(secret, helper=helper))
    secret.chmod(0o600)
    with pytest.raises(PermissionError) as info:
        my_open(secret, helper=helper)
    assert info.value.errno == errno.EACCES


def test_my_open_with_o_creat_passes_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "new"
    old = os.umask(0)
    try:
        fd = my_open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    finally:
        os.umask(old)
    try:
        os.write(fd, b"written through the helper's descriptor")
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_bytes() == b"written through the helper's descriptor"


def test_helper_killed_by_a_signal(tmp_path: Path, textfile: Path) -> None:
    helper = script(tmp_path, "die", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(HelperError, match="killed by signal 9"):
        my_open(textfile, helper=helper)


def test_helper_exiting_0_without_a_descriptor(tmp_path: Path, textfile: Path) -> None:
    helper = script(tmp_path, "mute", "import sys\nsys.exit(0)\n")
    with pytest.raises(HelperError, match=r"sent 0 byte.*and 0 descriptor"):
        my_open(textfile, helper=helper)


def test_helper_sending_two_descriptors(tmp_path: Path, textfile: Path) -> None:
    helper = script(
        tmp_path,
        "greedy",
        "import socket, sys\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "s.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,"
        " (0).to_bytes(4, 'little') + (1).to_bytes(4, 'little'))])\n",
    )
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(afunix.ControlTruncated):
        my_open(textfile, helper=helper)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_helper_sees_the_books_argv(tmp_path: Path, textfile: Path) -> None:
    """``helper SOCKFD PATH MODE``: three arguments, decimal flags (the book's atoi)."""
    log = tmp_path / "argv"
    helper = script(
        tmp_path,
        "spy",
        f"import sys, os\nopen({str(log)!r}, 'w').write(repr(sys.argv[1:]))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'afunix', 'openfile', *sys.argv[1:]])\n",
    )
    fd = my_open(textfile, os.O_RDWR, helper=helper)
    os.close(fd)
    argv = eval(log.read_text())
    assert len(argv) == 3
    assert int(argv[0]) >= 0
    assert argv[1:] == [str(textfile), str(os.O_RDWR)]


# ------------------------------------------------------------ afunix openfile
def test_openfile_cli_protocol(textfile: Path) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.run(
            afunix_cmd("openfile", str(theirs.fileno()), str(textfile), "0"),
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0
        assert proc.stdout == proc.stderr == b""  # silent, like the book's program
        data, fds, _, _ = afunix.lowlevel.recv_fds(ours, 10, 1)
        assert data == b"\0"  # write_fd(fd, "", 1, fd): one NUL byte
        assert len(fds) == 1
        assert os.read(fds[0], 5) == b"hello"
        os.close(fds[0])


def test_openfile_cli_exit_status_is_errno(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.run(
            afunix_cmd("openfile", str(theirs.fileno()), str(tmp_path / "nope"), "0"),
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode == errno.ENOENT
    assert proc.stdout == proc.stderr == b""


def test_openfile_cli_bad_socket_descriptor(textfile: Path) -> None:
    proc = subprocess.run(
        afunix_cmd("openfile", "0", str(textfile), "0"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == errno.ENOTSOCK


# ------------------------------------------------------------------ afunix cat
def test_cat_prints_files_through_the_helper(tmp_path: Path, textfile: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"second\n")
    proc = subprocess.run(
        afunix_cmd("cat", str(textfile), str(other)), capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello, descriptor\nsecond\n"


def test_cat_reports_failures_and_goes_on(tmp_path: Path, textfile: Path) -> None:
    proc = subprocess.run(
        afunix_cmd("cat", str(tmp_path / "missing"), str(textfile)),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == b"hello, descriptor\n"
    assert f"cannot open {tmp_path / 'missing'}: No such file or directory".encode() in (
        proc.stderr
    )


def test_cat_with_another_helper(tmp_path: Path, textfile: Path) -> None:
    log = tmp_path / "used"
    helper = script(
        tmp_path,
        "wrapper",
        f"import sys, os\nopen({str(log)!r}, 'w').write('yes')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'afunix', 'openfile', *sys.argv[1:]])\n",
    )
    proc = subprocess.run(
        afunix_cmd("cat", "--helper", str(helper), str(textfile)),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello, descriptor\n"
    assert log.read_text() == "yes"


# --------------------------------------------------- send-fds, serve --show-fds
@contextmanager
def show_fds_server(sockdir: Path, kind: str) -> Iterator[tuple[Path, Path]]:
    """``afunix serve --show-fds`` in the background; yields (socket path, stdout file)."""
    path = sockdir / f"{kind}.sock"
    out = sockdir / f"{kind}.out"
    err = sockdir / f"{kind}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            afunix_cmd("serve", str(path), "--show-fds", "--type", kind),
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
        )
    try:
        wait_for_path(path)
        yield path, out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, err.read_text()
    assert not path.exists()  # removed on SIGTERM


def wait_for_text(path: Path, pattern: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text()
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in {text!r}")
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["stream", "dgram", "seqpacket"])
def test_send_fds_to_serve_show_fds(sockdir: Path, textfile: Path, kind: str) -> None:
    r, w = os.pipe()
    try:
        with show_fds_server(sockdir, kind) as (path, out):
            proc = subprocess.run(
                afunix_cmd(
                    "send-fds", str(path), str(textfile), str(sockdir), f"fd:{r}", "--type", kind
                ),
                pass_fds=(r,),
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            assert b"sent 1 byte and 3 descriptor(s)" in proc.stdout
            text = wait_for_text(out, r"pipe")
    finally:
        os.close(r)
        os.close(w)
    assert "1 byte(s) of payload, 3 descriptor(s)" in text
    ino = textfile.stat().st_ino
    assert re.search(
        rf"fd \d+: regular file {re.escape(str(textfile))} \(inode {ino}, open read-only", text
    )
    assert re.search(
        rf"fd \d+: directory {re.escape(str(sockdir))} \(inode {sockdir.stat().st_ino}", text
    )
    assert re.search(r"fd \d+: pipe pipe:\[\d+\] \(inode \d+, open read-only\)", text)


def test_send_fds_errors(sockdir: Path) -> None:
    proc = subprocess.run(
        afunix_cmd("send-fds", str(sockdir / "nobody.sock"), "/etc/hostname"),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 69  # EX_UNAVAILABLE: no such socket
    assert b"no such socket" in proc.stderr
    proc = subprocess.run(
        afunix_cmd("send-fds", str(sockdir / "x.sock"), str(sockdir / "missing")),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 66  # EX_NOINPUT: the FILE to send is missing


def test_show_fds_reports_a_truncation_and_goes_on(sockdir: Path, textfile: Path) -> None:
    with show_fds_server(sockdir, "dgram") as (path, out):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            base = os.open(textfile, os.O_RDONLY)
            try:
                afunix.lowlevel.send_fds(s, b"y", [base] * 253, address=str(path))
                afunix.lowlevel.send_fds(s, b"z", [base], address=str(path))
            finally:
                os.close(base)
        text = wait_for_text(out, r"message 2 ")
    assert "message 1 from <unnamed>: 1 byte(s) of payload, 253 descriptor(s)" in text
    assert text.count(str(textfile)) == 254


# ------------------------------------------------------------------------ tour
def test_tour_section_15_7() -> None:
    proc = subprocess.run(
        afunix_cmd("tour", "--section", "15.7"), capture_output=True, timeout=60, check=False
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "15.7" in out
    assert "[FAILED]" not in out
    assert "at offset 4" in out
    assert "my fd 3 is at offset 8" in out or re.search(r"my fd \d+ is at offset 8", out)
    assert "still readable" in out
    assert "0 failed" in out
