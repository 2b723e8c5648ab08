"""``my_open``/``openfile`` against C programs in the book's style (UNP 15.7).

* ``tests/c/fd_openfile.c``: the book's ``openfile`` with its ``write_fd``;
  our ``my_open(helper=...)`` runs it instead of ``afunix openfile``.
* ``tests/c/fd_mycat.c``: the book's ``mycat`` with its ``my_open`` and
  ``read_fd``; it execs *our* ``afunix openfile``.

Both directions must agree on the protocol: argv ``SOCKFD PATH MODE``, one
byte of payload with the descriptor attached, exit status = errno.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from afunix.opener import my_open

from ..conftest import NOBODY


def afunix_script() -> str:
    """The ``afunix`` console script of this environment (what the C mycat execs)."""
    path = Path(sys.executable).parent / "afunix"
    if not path.exists():
        pytest.fail(f"{path} is missing: install the package (pip install -e .)")
    return str(path)


@pytest.fixture
def textfile(sockdir: Path) -> Path:
    """A file in a directory every user may search (the nobody tests need it)."""
    path = sockdir / "book.txt"
    path.write_bytes(b"Stevens, UNP volume 1, chapter 15\n")
    path.chmod(0o644)
    return path


# --------------------------------------------- our my_open, the C openfile helper
def test_my_open_with_the_c_openfile(cbuild: Callable[[str], Path], textfile: Path) -> None:
    helper = cbuild("fd_openfile")
    fd = my_open(textfile, helper=helper)
    try:
        assert os.read(fd, 100) == textfile.read_bytes()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("target", "flags", "err"),
    [
        ("missing", os.O_RDONLY, errno.ENOENT),
        (".", os.O_WRONLY, errno.EISDIR),
    ],
)
def test_c_openfile_errors_become_oserror(
    cbuild: Callable[[str], Path], tmp_path: Path, target: str, flags: int, err: int
) -> None:
    helper = cbuild("fd_openfile")
    path = tmp_path / target
    with pytest.raises(OSError) as info:
        my_open(path, flags, helper=helper)
    assert info.value.errno == err
    assert info.value.filename == str(path)


def test_c_openfile_run_as_nobody(cbuild: Callable[[str], Path], textfile: Path) -> None:
    """The helper's privileges decide: a root-only file is EACCES for a nobody helper."""
    helper = cbuild("fd_openfile")
    textfile.chmod(0o600)
    with pytest.raises(PermissionError) as info:
        my_open(textfile, helper=[*NOBODY, str(helper)])
    assert info.value.errno == errno.EACCES
    textfile.chmod(0o644)
    fd = my_open(textfile, helper=[*NOBODY, str(helper)])
    os.close(fd)


# ----------------------------------------- the C mycat, our afunix openfile helper
def run_mycat(exe: Path, path: Path | str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(exe), str(path)],
        env={**os.environ, "AFUNIX": afunix_script()},
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_c_mycat_with_our_openfile(cbuild: Callable[[str], Path], textfile: Path) -> None:
    proc = run_mycat(cbuild("fd_mycat"), textfile)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == textfile.read_bytes()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing", "No such file or directory"),
        ("book.txt/x", "Not a directory"),
    ],
)
def test_c_mycat_gets_the_errno_from_our_exit_status(
    cbuild: Callable[[str], Path], textfile: Path, target: str, message: str
) -> None:
    path = textfile.parent / target
    proc = run_mycat(cbuild("fd_mycat"), path)
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.decode().strip() == f"cannot open {path}: {message}"
