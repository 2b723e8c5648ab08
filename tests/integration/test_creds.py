"""Credentials for real (UNP 15.8): peers run as another user, the kernel vouches.

Clients run as uid/gid 65534 through ``setpriv`` (``NOBODY``); the server side
is this test process (root). Every check is against what the kernel reports.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afunix
import afunix.lowlevel
from afunix import _creds
from afunix._platform import unsupported as _creds_unsupported
from afunix.channel import Channel
from tests.conftest import NOBODY, afunix_cmd

PY = sys.executable

# A client that connects, says its pid, and stays until its stdin closes.
STAY_CLIENT = r"""
import os, socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + a[1:] if a.startswith("@") else a)
print(os.getpid(), flush=True)
sys.stdin.read()
"""

# A client that sends one datagram to argv[1] and exits.
DGRAM_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(sys.argv[2].encode(), sys.argv[1])
"""


@pytest.fixture(params=["path", "abstract"])
def address(request: pytest.FixtureRequest, sockdir: Path) -> str:
    if request.param == "path":
        return str(sockdir / "creds.sock")
    return f"@afunix-test-creds-{os.getpid()}-{threading.get_ident()}"


class Peer:
    """A client process that stays connected until :meth:`release`."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


@pytest.fixture
def accept_peer(address: str) -> Iterator[Any]:
    """``accept_peer(prefix)``: start STAY_CLIENT under *prefix*, return (Peer, conn)."""
    peers: list[Peer] = []
    conns: list[socket.socket] = []
    mode = 0o666 if not address.startswith("@") else None
    with afunix.listen(address, mode=mode) as lst:
        lst.settimeout(10)

        def run(prefix: list[str]) -> tuple[Peer, socket.socket]:
            peer = Peer([*prefix, PY, "-c", STAY_CLIENT, address])
            peers.append(peer)
            conn, _ = lst.accept()
            conns.append(conn)
            return peer, conn

        try:
            yield run
        finally:
            for c in conns:
                c.close()
            for p in peers:
                p.close()


# ----------------------------------------------------------- peer credentials
def test_nobody_client_is_seen_exactly(accept_peer: Any) -> None:
    peer, conn = accept_peer(NOBODY)
    with afunix.peer_credentials(conn) as creds:
        assert (creds.pid, creds.uid, creds.gid) == (peer.pid, 65534, 65534)
        assert creds.groups == ()  # --clear-groups
        assert creds.mechanism == "SO_PEERCRED"
        assert creds.user == "nobody"
        assert "uid 65534 (nobody)" in creds.describe()


def test_root_client_is_seen_as_root(accept_peer: Any) -> None:
    peer, conn = accept_peer([])
    with afunix.peer_credentials(conn) as creds:
        assert (creds.pid, creds.uid, creds.gid) == (peer.pid, 0, 0)


def test_supplementary_groups_even_many(accept_peer: Any) -> None:
    # 100 groups: more than the first SO_PEERGROUPS buffer holds (ERANGE, retry).
    groups = list(range(5000, 5100))
    prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups"]
    peer, conn = accept_peer([*prefix, ",".join(map(str, groups))])
    with afunix.peer_credentials(conn) as creds:
        assert (creds.pid, creds.uid) == (peer.pid, 65534)
        assert creds.groups == tuple(groups)


def test_credentials_are_those_of_connect_time(accept_peer: Any) -> None:
    """SO_PEERCRED is recorded at connect: a later look still reports the connector."""
    peer, conn = accept_peer(NOBODY)
    first = afunix.peer_credentials(conn, pidfd=False)
    peer.release()
    peer.proc.wait(10)
    again = afunix.peer_credentials(conn, pidfd=False)
    assert first == again and again.uid == 65534 and again.pid == peer.pid


def test_pidfd_follows_the_client_and_sees_it_exit(accept_peer: Any) -> None:
    peer, conn = accept_peer(NOBODY)
    creds = afunix.peer_credentials(conn)
    try:
        assert creds.pidfd is not None, "this kernel (6.5+) must give SO_PEERPIDFD"
        # While the client lives the pidfd names it, and it can be signalled safely.
        assert creds.current_pid() == peer.pid
        assert not creds.exited()
        creds.send_signal(0)
        facts = creds.facts()
        assert facts.verified
        assert facts.pid == peer.pid
        assert facts.exe == os.path.realpath(PY)
        assert facts.cmdline is not None and facts.cmdline[1:3] == ("-c", STAY_CLIENT)
        assert facts.cgroup
        # The client exits: the pidfd says so even before it is reaped...
        peer.release()
        assert creds.exited(timeout=10)
        with pytest.raises(afunix.PeerGone) as info:
            creds.facts()  # a zombie's /proc entry is not the client any more
        assert info.value.errno == errno.ESRCH
        peer.proc.wait(10)
        # ...and once reaped the pidfd names no pid at all: never a recycled one.
        assert creds.current_pid() is None
        with pytest.raises(ProcessLookupError):
            creds.send_signal(0)
    finally:
        creds.close()
    assert creds.pidfd is None


def test_facts_refused_when_the_pid_names_another_process() -> None:
    """A recycled pid: /proc/<pid> exists, but the pidfd says our peer is gone."""
    other = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    first = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = os.pidfd_open(first.pid)
    assert first.stdin is not None
    first.stdin.close()
    first.wait(10)
    # `other` is alive; pretend the kernel recycled first's pid to it.
    creds = afunix.PeerCredentials(other.pid, 0, 0, pidfd=pidfd)
    try:
        assert os.path.exists(f"/proc/{other.pid}/exe")
        with pytest.raises(afunix.PeerGone):
            creds.facts()
    finally:
        creds.close()
        assert other.stdin is not None
        other.stdin.close()
        other.wait(10)


def test_without_pidfd_facts_are_unverified(accept_peer: Any) -> None:
    peer, conn = accept_peer(NOBODY)
    creds = afunix.peer_credentials(conn, pidfd=False)
    assert creds.pidfd is None
    facts = creds.facts()
    assert not facts.verified and facts.exe == os.path.realpath(PY)
    assert facts.pid == peer.pid
    with pytest.raises(afunix.UnsupportedFeature, match="needs a pidfd"):
        creds.exited()


def test_socketpair_both_ends() -> None:
    a, b = afunix.pair()
    with a, b, afunix.peer_credentials(a) as ca, afunix.peer_credentials(b) as cb:
        assert ca == cb
        assert (ca.pid, ca.uid, ca.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_tcp_has_no_peer_credentials() -> None:
    with (
        afunix.listen("tcp://127.0.0.1:0") as lst,
        afunix.connect(lst.address) as c,
        pytest.raises(afunix.UnsupportedFeature, match="TCP peer cannot be identified"),
    ):
        afunix.peer_credentials(c)


def test_datagram_socket_has_no_peer_credentials(sockdir: Path) -> None:
    with afunix.listen(sockdir / "d.sock", "dgram") as d:
        with pytest.raises(afunix.AfunixError, match="per message") as info:
            afunix.peer_credentials(d)
        assert info.value.errno == errno.ENOTCONN


def test_unsupported_system_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_creds, "_backend", _creds_unsupported)
    a, b = afunix.pair()
    with a, b:
        with pytest.raises(afunix.UnsupportedFeature, match="not supported on this system") as i:
            afunix.peer_credentials(a)
        assert i.value.errno == errno.EOPNOTSUPP
        with pytest.raises(afunix.UnsupportedFeature, match="not supported on this system"):
            afunix.lowlevel.send_credentials(a, b"x")


def test_mechanisms_reported() -> None:
    got = afunix.lowlevel.credential_mechanisms()
    assert got["system"] == "linux"
    assert got["peer"] == "SO_PEERCRED"
    assert got["message"] == "SCM_CREDENTIALS"


# ----------------------------------------------------- per-message credentials
@pytest.fixture
def receiver(sockdir: Path) -> Iterator[socket.socket]:
    with afunix.listen(sockdir / "recv.sock", "dgram", mode=0o666) as sock:
        sock.settimeout(10)
        yield sock


def test_each_datagram_carries_its_senders_credentials(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver)
    where = receiver.getsockname()
    nobody = subprocess.run([*NOBODY, PY, "-c", DGRAM_CLIENT, where, "from nobody"], timeout=30)
    assert nobody.returncode == 0
    with afunix.connect(where, "dgram") as me:
        me.send(b"from root")
    with (
        afunix.lowlevel.recv_credentials(receiver) as first,
        afunix.lowlevel.recv_credentials(receiver) as second,
    ):
        assert first.data == b"from nobody"
        assert first.credentials is not None
        assert (first.credentials.uid, first.credentials.gid) == (65534, 65534)
        assert first.credentials.mechanism == "SCM_CREDENTIALS"
        assert second.data == b"from root"
        assert second.credentials is not None
        assert (second.credentials.pid, second.credentials.uid) == (os.getpid(), 0)


def test_datagram_pid_is_the_real_senders(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver)
    code = DGRAM_CLIENT + "\nimport os; print(os.getpid())\n"
    out = subprocess.run(
        [*NOBODY, PY, "-c", code, receiver.getsockname(), "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    with afunix.lowlevel.recv_credentials(receiver) as msg:
        assert msg.credentials is not None
        assert msg.credentials.pid == int(out.stdout)


def test_no_credentials_unless_enabled(receiver: socket.socket) -> None:
    with afunix.connect(receiver.getsockname(), "dgram") as me:
        me.send(b"plain")
    msg = afunix.lowlevel.recv_credentials(receiver)
    assert msg.data == b"plain" and msg.credentials is None


def test_privileged_sender_may_claim_other_ids(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver)
    other = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with afunix.connect(receiver.getsockname(), "dgram") as me:
            afunix.lowlevel.send_credentials(me, b"claim", uid=1234, gid=5678, pid=other.pid)
        with afunix.lowlevel.recv_credentials(receiver) as msg:
            assert msg.credentials is not None
            assert (msg.credentials.pid, msg.credentials.uid, msg.credentials.gid) == (
                other.pid,
                1234,
                5678,
            )
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(10)


FORGER = r"""
import errno, json, sys
import afunix
import afunix.lowlevel
sock = afunix.connect(sys.argv[1], "dgram", bind=None)
out = {}
for name, claim in (("uid", {"uid": 0}), ("gid", {"gid": 0}), ("pid", {"pid": 1})):
    try:
        afunix.lowlevel.send_credentials(sock, b"forged " + name.encode(), **claim)
        out[name] = "sent"
    except afunix.lowlevel.CredentialsRefused as exc:
        out[name] = [exc.errno, str(exc)]
afunix.lowlevel.send_credentials(sock, b"honest")
print(json.dumps(out))
"""


def test_forged_credentials_from_nobody_are_refused(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver)
    out = subprocess.run(
        [*NOBODY, PY, "-c", FORGER, receiver.getsockname()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for name in ("uid", "gid", "pid"):
        err, message = result[name]
        assert err == errno.EPERM
        assert "the kernel refused to send credentials" in message
        assert "uid 65534" in message and "[EPERM]" in message
    # Nothing forged got through; the honest message did, as nobody.
    with afunix.lowlevel.recv_credentials(receiver) as msg:
        assert msg.data == b"honest"
        assert msg.credentials is not None and msg.credentials.uid == 65534
    receiver.settimeout(0)
    with pytest.raises(BlockingIOError):
        receiver.recv(100)


def test_claiming_a_pid_that_does_not_exist(receiver: socket.socket) -> None:
    with afunix.connect(receiver.getsockname(), "dgram") as me:
        with pytest.raises(afunix.lowlevel.CredentialsRefused, match="no process has pid") as info:
            afunix.lowlevel.send_credentials(me, b"x", pid=2**22 + 12345)
        assert info.value.errno == errno.ESRCH


def test_per_message_pidfd(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver, pidfd=True)
    with afunix.connect(receiver.getsockname(), "dgram") as me:
        me.send(b"with pidfd")
    with afunix.lowlevel.recv_credentials(receiver) as msg:
        creds = msg.credentials
        assert creds is not None and creds.pidfd is not None
        assert creds.current_pid() == os.getpid()
        assert creds.facts().verified
    assert creds.pidfd is None  # closed with the message


def test_descriptors_where_none_were_expected_are_closed(receiver: socket.socket) -> None:
    afunix.lowlevel.enable_credentials(receiver)
    r, w = os.pipe()
    try:
        with afunix.connect(receiver.getsockname(), "dgram") as me:
            socket.send_fds(me, [b"sneaky"], [r, w])
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(afunix.ProtocolError, match="2 descriptor"):
        afunix.lowlevel.recv_credentials(receiver)
    # (the autouse no_fd_leak fixture checks that both received fds were closed)


def test_channel_messages_carry_peer_credentials(sockdir: Path) -> None:
    path = str(sockdir / "chan.sock")
    with Channel.bind(path, credentials=True) as chan:
        os.chmod(path, 0o666)  # so that nobody may send to it
        code = (
            "import sys\nfrom afunix.channel import Channel\n"
            "c = Channel.connect(sys.argv[1], 'dgram')\nc.send(b'hi')\nc.close()\n"
        )
        subprocess.run([*NOBODY, PY, "-c", code, path], check=True, timeout=30)
        with chan.recv() as msg:
            assert isinstance(msg.credentials, afunix.PeerCredentials)
            assert (msg.credentials.uid, msg.credentials.gid) == (65534, 65534)
            assert msg.credentials.mechanism == "SCM_CREDENTIALS"


# ----------------------------------------------------- handlers see credentials
def _creds_reply(creds: afunix.PeerCredentials) -> bytes:
    return json.dumps([creds.pid, creds.uid, creds.gid, creds.pidfd is not None]).encode()


def thread_handler(conn: afunix.Connection) -> None:
    conn.send(_creds_reply(conn.credentials))


async def async_handler(conn: afunix.AsyncConnection) -> None:
    await conn.send(_creds_reply(conn.credentials))


@pytest.mark.parametrize("model", ["asyncio", "thread", "fork"])
def test_handlers_see_the_clients_credentials(model: str, sockdir: Path) -> None:
    handler = async_handler if model == "asyncio" else thread_handler
    with afunix.Server(sockdir / "h.sock", handler, model=model) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(srv.address, timeout=5) as c:
            c.settimeout(10)
            got = json.loads(c.recv(1000))
    assert got == [os.getpid(), 0, 0, True]


def test_connection_closes_the_pidfd(sockdir: Path) -> None:
    seen: list[afunix.PeerCredentials] = []

    def handler(conn: afunix.Connection) -> None:
        seen.append(conn.credentials)
        conn.send(b"ok")

    with afunix.Server(sockdir / "p.sock", handler, model="thread") as srv:
        srv.start()
        with afunix.connect(srv.address, timeout=5) as c:
            c.settimeout(10)
            assert c.recv(10) == b"ok"
            assert c.recv(10) == b""  # the server closed the connection...
    assert seen and seen[0].pidfd is None  # ...and the client's pidfd with it


@pytest.mark.parametrize("model", ["asyncio", "thread", "fork"])
def test_datagram_handlers_see_each_senders_credentials(model: str, sockdir: Path) -> None:
    def reply(d: afunix.Datagram) -> bytes:
        assert d.credentials is not None
        return json.dumps([d.credentials.pid, d.credentials.uid, d.data.decode()]).encode()

    async def areply(d: afunix.Datagram) -> bytes:
        return reply(d)

    handler = areply if model == "asyncio" else reply
    with afunix.Server(sockdir / "d.sock", handler, type="dgram", model=model) as srv:  # type: ignore[arg-type]
        srv.start()
        with afunix.connect(srv.address, "dgram") as c:
            c.settimeout(10)
            c.send(b"one")
            assert json.loads(c.recv(1000)) == [os.getpid(), 0, "one"]


# ------------------------------------------------------------------------ CLI
class Serve:
    """``afunix serve ...`` in the background, its output collected in files.

    Files, not pipes: reading a pipe line by line and then ``communicate()``
    would lose what the line reader had buffered.
    """

    def __init__(self, where: Path, *args: str) -> None:
        self.out_path, self.err_path = where / "serve.out", where / "serve.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(afunix_cmd("serve", *args), stdout=out, stderr=err)
        deadline = time.monotonic() + 15
        while b"serving" not in self.err_path.read_bytes():
            assert self.proc.poll() is None, self.err_path.read_text()
            assert time.monotonic() < deadline, "afunix serve did not start"
            time.sleep(0.01)

    def stop(self) -> tuple[str, str]:
        self.proc.terminate()
        self.proc.wait(15)
        return self.out_path.read_text(), self.err_path.read_text()


def _creds_cmd(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *afunix_cmd("creds", *args)], capture_output=True, text=True, timeout=30
    )


def test_cli_show_creds_and_allow_uid(sockdir: Path) -> None:
    addr = f"@afunix-test-cli-{os.getpid()}"
    server = Serve(sockdir, addr, "--show-creds", "--allow-uid", "0", "--model", "thread")
    try:
        mine = subprocess.Popen(
            afunix_cmd("creds", addr, "--json"), stdout=subprocess.PIPE, text=True
        )
        out_json, _ = mine.communicate(timeout=30)
        assert mine.returncode == 0
        report = json.loads(out_json)
        assert (report["pid"], report["uid"], report["gid"]) == (mine.pid, 0, 0)
        assert report["mechanism"] == "SO_PEERCRED" and report["pidfd"] is True
        assert report["verified"] is True and report["exe"] == os.path.realpath(PY)
        assert report["policy"] == "uid 0 (root) is allowed"

        refused = _creds_cmd(addr, prefix=tuple(NOBODY))
        assert refused.returncode == 77  # EX_NOPERM
        assert "refused this client (uid 65534, gid 65534)" in refused.stderr
    finally:
        out, err = server.stop()
    assert f"peer: pid={mine.pid} uid=0(root) gid=0(root)" in out
    assert "via=SO_PEERCRED+pidfd" in out
    assert "peer policy: allow uid 0 (root)" in err
    assert "refused connection from pid" in err and "uid 65534 (nobody)" in err
    assert "uid=65534" not in out  # the refused client never reached the handler


def test_cli_datagram_claims(sockdir: Path) -> None:
    addr = str(sockdir / "cli-dg.sock")
    server = Serve(
        sockdir, addr, "--type", "dgram", "--show-creds", "--model", "thread", "--mode", "666"
    )
    try:
        claimed = _creds_cmd(addr, "--type", "dgram", "--claim-uid", "4321", "--claim-gid", "99")
        assert claimed.returncode == 0, claimed.stderr
        assert "uid     4321" in claimed.stdout
        assert "the claim was accepted" in claimed.stdout
        assert "via SCM_CREDENTIALS" in claimed.stdout

        forged = _creds_cmd(addr, "--type", "dgram", "--claim-uid", "0", prefix=tuple(NOBODY))
        assert forged.returncode == 77  # EX_NOPERM (EPERM)
        assert "the kernel refused to send credentials" in forged.stderr

        honest = _creds_cmd(addr, "--type", "dgram", "--json", prefix=tuple(NOBODY))
        assert honest.returncode == 0, honest.stderr
        assert json.loads(honest.stdout)["uid"] == 65534
    finally:
        out, _ = server.stop()
    assert "uid=4321 gid=99" in out and "uid=65534(nobody)" in out


def test_cli_creds_against_a_plain_echo_server(sockdir: Path) -> None:
    addr = str(sockdir / "echo.sock")
    server = Serve(sockdir, addr, "--model", "thread")
    try:
        got = _creds_cmd(addr)
    finally:
        server.stop()
    assert got.returncode == 65  # EX_DATAERR (EPROTO)
    assert "echoed the request back" in got.stderr


def test_tour_section_15_8() -> None:
    out = subprocess.run(
        afunix_cmd("tour", "--section", "15.8"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout
    assert "cmsgcred" in out.stdout
