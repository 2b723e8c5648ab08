"""``ssh://``: a Unix socket on another host through a real ``sshd`` started by the test.

The "far host" is this host: the fixture's sshd on 127.0.0.1 with keys made for
it, the far server a real afunix server (or a socket of the test) in a short
temporary directory. What is checked: bytes both ways, the far server's view of
its peer (the sshd session of the SSH login user), errors with ssh's own words
and an errno for a missing far socket, a refused port, a refused key and an
unknown host key, a timeout, a dying ssh (end of file, ``BrokenPipeError``,
never a hang), and 50 connect/close rounds that leave no ssh process, no child
and no descriptor behind.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import afunix
from afunix._remote import RemoteError, SshSocket, connect_ssh

from ..conftest import afunix_cmd, open_fds, serving, wait_until
from ..remote_support import Sshd, free_port, keygen

ROUNDS = 50  # each a full SSH login (about 0.5 s here)


@pytest.fixture
def echo(sockdir: Path) -> Iterator[Path]:
    """An ``afunix serve`` echo server at ``sockdir/echo.sock``."""
    path = sockdir / "echo.sock"
    with serving(sockdir, str(path)):
        yield path


def test_the_fixture_sshd_takes_the_generated_key(sshd: Sshd) -> None:
    result = subprocess.run(
        ["ssh", "-F", str(sshd.client_config), "-p", str(sshd.port), "root@127.0.0.1", "true"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_echo_through_ssh_to_an_afunix_server(ssh_env: Sshd, echo: Path) -> None:
    url = ssh_env.url(echo)
    with afunix.connect(url, timeout=30) as sock:
        assert isinstance(sock, afunix.Socket) and isinstance(sock, SshSocket)
        assert sock.carries_fds is False and sock.carries_credentials is False
        assert sock.peer_address == afunix.Address.parse(url)
        assert url in sock.peer_description and "ssh pid" in sock.peer_description
        sock.sendall(b"over ssh\n")
        got = b""
        while len(got) < 9:
            chunk = sock.recv(100)
            assert chunk, "end of file before the echo"
            got += chunk
        assert got == b"over ssh\n"
        proc = sock.process
        assert proc is not None and proc.poll() is None
    assert proc.returncode is not None  # close() reaped it
    assert sock.process is None


def _accept_one(
    listener: socket.socket, seen: list[afunix.PeerCredentials], comms: list[bytes]
) -> None:
    conn, _ = listener.accept()
    with conn:
        creds = afunix.peer_credentials(conn, pidfd=False)
        seen.append(creds)
        with open(f"/proc/{creds.pid}/comm", "rb") as f:
            comms.append(f.read().strip())
        conn.sendall(conn.recv(16))


@pytest.mark.parametrize(("user", "uid"), [("root", 0), ("nobody", 65534)])
def test_the_far_server_sees_the_ssh_login_user(
    ssh_env: Sshd, sockdir: Path, user: str, uid: int
) -> None:
    path = sockdir / "creds.sock"
    seen: list[afunix.PeerCredentials] = []
    comms: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        os.chmod(path, 0o777)  # the nobody session must be able to connect
        listener.listen()
        listener.settimeout(60)  # a client that never comes cannot hang the thread
        server = threading.Thread(target=_accept_one, args=(listener, seen, comms), daemon=True)
        server.start()
        try:
            with afunix.connect(ssh_env.url(path, user=user), timeout=30) as sock:
                sock.sendall(b"ping")
                assert sock.recv(16) == b"ping"
        finally:
            server.join(30)
    assert [c.uid for c in seen] == [uid]  # SO_PEERCRED: the login user, not ours
    assert comms == [b"sshd"]  # the peer process is the far sshd session


def test_a_missing_far_socket_is_refused_at_connect(ssh_env: Sshd, sockdir: Path) -> None:
    url = ssh_env.url(sockdir / "missing.sock")
    with pytest.raises(RemoteError) as info:
        afunix.connect(url, timeout=30)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ECONNREFUSED
    text = str(info.value)
    assert url in text and "open failed" in text and "is the path right" in text
    assert wait_until(lambda: not ssh_env.ssh_processes())


def test_a_refused_port_says_what_ssh_said(ssh_env: Sshd, sockdir: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RemoteError) as info:
        afunix.connect(f"ssh://root@127.0.0.1:{port}{sockdir}/x.sock", timeout=30)
    assert info.value.errno == errno.ECONNREFUSED
    assert f"port {port}: Connection refused" in str(info.value)
    assert f"port {port}: Connection refused" in info.value.ssh_message


def test_a_refused_key_is_permission_denied(sshd: Sshd, sockdir: Path, echo: Path) -> None:
    other = sockdir / "other_key"
    keygen(other, "not-authorized")
    config = sockdir / "ssh_config"
    config.write_text(sshd.client_config.read_text().replace(str(sshd.client_key), str(other)))
    with pytest.raises(RemoteError) as info:
        connect_ssh(sshd.url(echo), timeout=30, config=config)
    assert info.value.errno == errno.EACCES
    assert "Permission denied (publickey)" in str(info.value)


def test_a_key_without_forwarding_is_refused_at_connect(
    sshd: Sshd, sockdir: Path, echo: Path
) -> None:
    restricted = sockdir / "restricted_key"
    keygen(restricted, "restricted")
    pub = (sockdir / "restricted_key.pub").read_text()
    with open(sshd.directory / "authorized_keys", "a") as keys:
        keys.write(f"restrict {pub}")  # logs in, may forward nothing
    config = sockdir / "ssh_config"
    config.write_text(sshd.client_config.read_text().replace(str(sshd.client_key), str(restricted)))
    with pytest.raises(RemoteError) as info:
        connect_ssh(sshd.url(echo), timeout=30, config=config)
    # sshd 9.2 gives the same reason as for a missing socket ("connect failed"), so
    # the message names both causes; the echo server is there and listening.
    assert info.value.errno == errno.ECONNREFUSED
    text = str(info.value)
    assert "open failed" in text and "authorized_keys" in text


def test_an_unknown_host_key_is_refused(sshd: Sshd, sockdir: Path, echo: Path) -> None:
    empty = sockdir / "known_hosts"
    empty.write_text("")
    with pytest.raises(RemoteError) as info:
        connect_ssh(
            sshd.url(echo),
            timeout=30,
            config=sshd.client_config,
            options=["-o", f"UserKnownHostsFile={empty}"],
        )
    assert info.value.errno == errno.EACCES
    assert "Host key verification failed" in str(info.value)


def test_a_silent_host_times_out_and_leaves_no_ssh(ssh_env: Sshd) -> None:
    with socket.socket() as mute:  # the kernel accepts; nobody ever says SSH-2.0
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        with pytest.raises(RemoteError) as info:
            afunix.connect(f"ssh://root@127.0.0.1:{port}/x.sock", timeout=1.5)
    assert info.value.errno == errno.ETIMEDOUT
    assert "timed out" in str(info.value)
    assert not ssh_env.ssh_processes()


def test_a_dead_ssh_gives_end_of_file_and_broken_pipe(ssh_env: Sshd, echo: Path) -> None:
    with afunix.connect(ssh_env.url(echo), timeout=30) as sock:
        sock.settimeout(30)  # a hang would fail here instead of blocking the run
        assert sock.process is not None
        sock.process.kill()
        sock.process.wait()
        assert sock.recv(100) == b""
        with pytest.raises(BrokenPipeError):
            for _ in range(1000):
                sock.sendall(b"x" * 65536)


def test_refusals_before_anything_starts(sockdir: Path) -> None:
    with pytest.raises(afunix.UnsupportedFeature, match="not served"):
        afunix.listen("ssh://h/run/app.sock")
    with pytest.raises(afunix.UnsupportedFeature, match="stream sockets only"):
        afunix.connect("ssh://h/run/app.sock", "dgram")
    for call in (afunix.listen, afunix.connect):
        with pytest.raises(afunix.UnsupportedFeature, match=r"needs an ssl\.SSLContext"):
            call("tls://127.0.0.1:1")
    with pytest.raises(afunix.AddressError, match="':'"):
        connect_ssh("ssh://h/run/a:b.sock")


def test_a_missing_ssh_binary_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, sockdir: Path
) -> None:
    monkeypatch.setenv("AFUNIX_SSH", str(sockdir / "no-such-ssh"))
    with pytest.raises(RemoteError) as info:
        afunix.connect("ssh://h/run/app.sock")
    assert info.value.errno == errno.ENOENT
    assert "AFUNIX_SSH" in str(info.value)


def test_detach_is_refused_the_process_is_owned(ssh_env: Sshd, echo: Path) -> None:
    with afunix.connect(ssh_env.url(echo), timeout=30) as sock:
        with pytest.raises(OSError) as info:
            sock.detach()
        assert info.value.errno == errno.EOPNOTSUPP
        assert sock.fileno() >= 0


def _zombies() -> list[int]:
    """Our children that exited and were not reaped."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and fields[1] == me:
            found.append(int(name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_connect_close_rounds_leave_nothing_behind(
    ssh_env: Sshd, echo: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ssh_env.url(echo)
    # The private directories go to a temp dir of this test's own, so another
    # program's ssh:// connections in /tmp cannot be mistaken for ours.
    private_parent = sockdir / "t"
    private_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_parent))
    before = open_fds()
    for i in range(ROUNDS):
        with afunix.connect(url, timeout=60) as sock:
            byte = bytes([i % 256])
            sock.sendall(byte)
            assert sock.recv(1) == byte
    assert ssh_env.ssh_processes() == []
    assert _zombies() == []
    assert open_fds().keys() == before.keys()
    assert not list(private_parent.iterdir())


def test_afunix_connect_command_over_ssh(ssh_env: Sshd, echo: Path) -> None:
    result = subprocess.run(
        afunix_cmd("connect", ssh_env.url(echo), "--timeout", "60"),
        input=b"one\ntwo\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"one\ntwo\n"


def test_afunix_connect_command_to_a_missing_far_socket_is_69(ssh_env: Sshd, sockdir: Path) -> None:
    url = ssh_env.url(sockdir / "missing.sock")
    result = subprocess.run(
        afunix_cmd("connect", url, "--timeout", "60"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 69  # ECONNREFUSED: unavailable
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("afunix: error: cannot connect to " + url)


def _example_client(address: str) -> list[bytes]:
    """The same program for every address: three messages out, three replies in.

    Bytes only, below the memfd threshold (32 MiB): descriptors and memfd payloads
    over ``ssh://`` are for the channel integration (refused / sent inline).
    """
    with afunix.Channel.connect(address, timeout=60) as channel:
        replies = []
        for word in (b"one", b"two", b"x" * 200_000):
            channel.send(word)
            replies.append(channel.recv().data)
        return replies


@pytest.mark.parametrize("over_ssh", [False, True], ids=["path", "ssh"])
def test_the_same_channel_program_runs_over_a_path_and_ssh(
    ssh_env: Sshd, sockdir: Path, over_ssh: bool
) -> None:
    path = sockdir / "ch.sock"
    listener = afunix.Channel.listen(path)

    def serve() -> None:
        with listener.accept() as channel:
            for _ in range(3):
                channel.send(b"re: " + channel.recv().data)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    served = False
    try:
        address = ssh_env.url(path) if over_ssh else str(path)
        assert _example_client(address) == [b"re: one", b"re: two", b"re: " + b"x" * 200_000]
        served = True
    finally:
        server.join(60 if served else 1)  # a client that failed leaves accept() waiting
        listener.close()
