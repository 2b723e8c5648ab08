"""Socket file permissions for real: a client running as uid/gid 65534 (nobody).

``afunix serve --mode/--owner/--group/--parent-mode`` set what the kernel
checks on ``connect``: write permission on the socket file and search
permission on every directory above it (UNP 15.4 point 1). The client is
``afunix connect`` run through ``setpriv`` as nobody, so the kernel, not
afunix, decides.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from ..conftest import NOBODY, afunix_cmd, serving

NOBODY_UID = NOBODY_GID = 65534
TYPES = ["stream", "dgram", "seqpacket"]


def connect_as_nobody(
    path: str, *opts: str, data: bytes = b"hello\n"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*NOBODY, *afunix_cmd("connect", path, *opts)],
        input=data,
        capture_output=True,
        timeout=15,
        check=False,
        cwd="/",
    )


def assert_refused(result: subprocess.CompletedProcess[bytes], path: str) -> None:
    assert result.returncode == 77, result.stderr  # EX_NOPERM
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("afunix: error: ")
    assert "permission denied" in lines[0]
    assert path in lines[0]


def assert_served(result: subprocess.CompletedProcess[bytes], data: bytes = b"hello\n") -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, data, b"")


def test_nobody_really_is_nobody(sockdir: Path) -> None:
    """The client the other tests run is unprivileged (else they prove nothing)."""
    out = subprocess.run([*NOBODY, "id", "-u"], capture_output=True, timeout=10, check=True)
    assert out.stdout.strip() == b"65534"


@pytest.mark.parametrize("sock_type", TYPES)
def test_nobody_is_refused_on_mode_600_and_served_on_666(sockdir: Path, sock_type: str) -> None:
    path = str(sockdir / "p.sock")
    with serving(sockdir, path, "--type", sock_type, "--mode", "600"):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert_refused(connect_as_nobody(path, "--type", sock_type), path)
    with serving(sockdir, path, "--type", sock_type, "--mode", "666"):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
        assert_served(connect_as_nobody(path, "--type", sock_type))


def test_owner_takes_effect(sockdir: Path) -> None:
    path = str(sockdir / "own.sock")
    with serving(sockdir, path, "--owner", str(NOBODY_UID), "--mode", "600"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY_UID, 0, 0o600)
        assert_served(connect_as_nobody(path))  # the owner may connect to its 0600 socket
        # ...and someone else may not: uid 65533 is neither owner nor in the group.
        other = subprocess.run(
            ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups",
             *afunix_cmd("connect", path)],
            input=b"x\n", capture_output=True, timeout=15, check=False, cwd="/",
        )  # fmt: skip
        assert_refused(other, path)


def test_group_takes_effect(sockdir: Path) -> None:
    path = str(sockdir / "grp.sock")
    with serving(sockdir, path, "--group", str(NOBODY_GID), "--mode", "660"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY_GID, 0o660)
        assert_served(connect_as_nobody(path))  # nobody's gid is 65534
    with serving(sockdir, path, "--mode", "660"):  # group root: nobody is out
        assert os.lstat(path).st_gid == 0
        assert_refused(connect_as_nobody(path), path)


def test_owner_and_group_by_name(sockdir: Path) -> None:
    user = pwd.getpwuid(NOBODY_UID).pw_name
    group = grp.getgrgid(NOBODY_GID).gr_name
    path = str(sockdir / "names.sock")
    with serving(sockdir, path, "--owner", user, "--group", group, "--mode", "640"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY_UID, NOBODY_GID, 0o640)


def test_unknown_owner_is_one_line_and_leaves_no_file(sockdir: Path) -> None:
    path = sockdir / "x.sock"
    result = subprocess.run(
        afunix_cmd("serve", str(path), "--owner", "no-such-user-afx"),
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert result.returncode == 65  # EX_DATAERR: no such user (EINVAL)
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "no such user 'no-such-user-afx'" in lines[0]
    assert not path.exists()


def test_directory_search_permission_is_checked_too(sockdir: Path) -> None:
    private = sockdir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    path = str(private / "s.sock")
    with serving(sockdir, path, "--mode", "666"):
        assert_refused(connect_as_nobody(path), path)  # 0666 socket, but no way in
        private.chmod(0o711)  # search, not read: enough to reach a known name
        assert_served(connect_as_nobody(path))


def test_parent_mode_creates_the_directory(sockdir: Path) -> None:
    parent = sockdir / "run" / "app"
    path = str(parent / "s.sock")
    with serving(
        sockdir, path, "--parent-mode", "750", "--group", str(NOBODY_GID), "--mode", "660"
    ):
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o750
        # The directory's group is root's, so nobody cannot search it.
        assert_refused(connect_as_nobody(path), path)
        os.chown(parent, -1, NOBODY_GID)
        os.chown(parent.parent, -1, NOBODY_GID)
        assert_served(connect_as_nobody(path))
    assert not os.path.exists(path)
