"""Peer policy: who may talk to a server, judged on the kernel's credentials (UNP 15.8).

Refused clients run as uid/gid 65534 through ``setpriv``; they must never
reach the handler, for any concurrency model, on connections and datagrams
alike, and each refusal is logged with the client's credentials.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import afunix
from afunix.policy import Decision
from tests.conftest import NOBODY

PY = sys.executable

# A raw client: send b"ping" and print what came back ("b''" when closed).
CLIENT = r"""
import socket, sys
addr, kind, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET, "dgram": socket.SOCK_DGRAM}
s = socket.socket(socket.AF_UNIX, t[kind])
s.settimeout(timeout)
where = "\0" + addr[1:] if addr.startswith("@") else addr
try:
    if kind == "dgram":
        s.bind("")  # Linux autobind, so that a reply can come back
        s.sendto(b"ping", where)
    else:
        s.connect(where)
        s.sendall(b"ping")
    print(repr(s.recv(100)))
except (ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
    print(type(exc).__name__)
"""


#: What a client sees when the server closes on it: EOF, or a reset/EPIPE on its send.
REFUSED = ("b''", "ConnectionResetError", "BrokenPipeError")


def run_client(prefix: list[str], addr: str, kind: str = "stream", timeout: float = 5.0) -> str:
    out = subprocess.run(
        [*prefix, PY, "-c", CLIENT, addr, kind, str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def creds(uid: int, gid: int, groups: tuple[int, ...] | None = None) -> afunix.PeerCredentials:
    return afunix.PeerCredentials(1234, uid, gid, groups)


# ------------------------------------------------------------ the policy itself
def test_allow_by_uid_and_user_name() -> None:
    policy = afunix.PeerPolicy(uids=[1000], users=["nobody"])
    assert policy.allows(creds(1000, 5))
    assert policy.allows(creds(65534, 5))
    assert not policy.allows(creds(0, 0))


def test_allow_by_gid_group_name_and_supplementary_groups() -> None:
    policy = afunix.PeerPolicy(gids=[4242], groups=["nogroup"])
    assert policy.allows(creds(7, 4242))
    assert policy.allows(creds(7, 65534))
    d = policy.check(creds(7, 100, groups=(3, 4242)))
    assert d.allowed and "supplementary group gid 4242" in d.reason
    assert not policy.allows(creds(7, 100, groups=(3, 4)))
    assert not policy.allows(creds(4242, 100))  # a uid is not a gid


def test_same_user_as_the_server() -> None:
    policy = afunix.PeerPolicy(same_user=True)
    assert policy.allows(creds(os.geteuid(), 12345))
    assert not policy.allows(creds(os.geteuid() + 1, os.getegid()))
    assert "the server's own user" in policy.check(creds(os.geteuid(), 0)).reason


def test_deny_by_default() -> None:
    empty = afunix.PeerPolicy()
    assert empty.empty
    assert not empty.allows(creds(0, 0))
    assert empty.describe() == "allow nobody (no rule set)"
    d = afunix.PeerPolicy(uids=[0]).check(creds(65534, 65534))
    assert d == Decision(False, "no rule allows uid 65534 (nobody), gid 65534 (nogroup)")
    assert not d


def test_unknown_names_fail_at_once() -> None:
    with pytest.raises(afunix.PolicyError, match="no user named 'no-such-user-x'") as info:
        afunix.PeerPolicy(users=["no-such-user-x"])
    assert info.value.errno == errno.EINVAL and isinstance(info.value, ValueError)
    with pytest.raises(afunix.PolicyError, match="--allow-gid for numeric ids"):
        afunix.PeerPolicy(groups=["98765"])
    with pytest.raises(afunix.PolicyError, match="not a valid id"):
        afunix.PeerPolicy(uids=[-1])


# -------------------------------------------------------- the server enforces it
def echo(conn: afunix.Connection) -> None:
    for chunk in conn:
        conn.send(b"served uid %d: " % conn.credentials.uid + chunk)


async def async_echo(conn: afunix.AsyncConnection) -> None:
    async for chunk in conn:
        await conn.send(b"served uid %d: " % conn.credentials.uid + chunk)


def dgram_echo(d: afunix.Datagram) -> bytes:
    assert d.credentials is not None
    return b"served uid %d: " % d.credentials.uid + d.data


async def async_dgram_echo(d: afunix.Datagram) -> bytes:
    return dgram_echo(d)


def handler_for(model: str, kind: str) -> object:
    if kind == "dgram":
        return async_dgram_echo if model == "asyncio" else dgram_echo
    return async_echo if model == "asyncio" else echo


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="afunix.server")
    return caplog


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


@pytest.mark.parametrize("model", ["asyncio", "thread", "fork"])
@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_only_root_is_served(model: str, kind: str, refusals: pytest.LogCaptureFixture) -> None:
    addr = f"@afunix-test-policy-{os.getpid()}-{model}-{kind}"
    policy = afunix.PeerPolicy(uids=[0])
    with afunix.Server(
        addr, handler_for(model, kind), type=kind, model=model, policy=policy
    ) as srv:  # type: ignore[arg-type]
        srv.start()
        assert run_client(NOBODY, addr, kind) in REFUSED
        assert run_client([], addr, kind) == repr(b"served uid 0: ping")
        assert srv.rejected == 1
    lines = refusal_lines(refusals)
    assert len(lines) == 1
    assert lines[0].startswith("refused connection from pid ")
    assert "uid 65534 (nobody), gid 65534 (nogroup)" in lines[0]
    assert f"exe {os.path.realpath(PY)}" in lines[0]
    assert "no rule allows uid 65534" in lines[0]


@pytest.mark.parametrize("model", ["asyncio", "thread", "fork"])
def test_datagrams_from_refused_senders_are_dropped(
    model: str, sockdir: Path, refusals: pytest.LogCaptureFixture
) -> None:
    path = str(sockdir / "dg.sock")
    policy = afunix.PeerPolicy(uids=[0])
    handler = handler_for(model, "dgram")
    with afunix.Server(path, handler, type="dgram", model=model, policy=policy, mode=0o666) as srv:  # type: ignore[arg-type]
        srv.start()
        assert run_client(NOBODY, path, "dgram", timeout=0.5) == "TimeoutError"
        assert run_client([], path, "dgram") == repr(b"served uid 0: ping")
        assert srv.rejected == 1
    lines = refusal_lines(refusals)
    assert len(lines) == 1 and lines[0].startswith("refused datagram from pid ")
    assert "uid 65534 (nobody)" in lines[0]


def test_forged_datagram_cannot_pass_the_policy(sockdir: Path) -> None:
    """Only the kernel's word counts: nobody claiming uid 0 is stopped at sendmsg."""
    path = str(sockdir / "forge.sock")
    code = (
        "import sys, afunix, afunix.lowlevel\n"
        "s = afunix.connect(sys.argv[1], 'dgram')\n"
        "try:\n    afunix.lowlevel.send_credentials(s, b'ping', uid=0, gid=0)\n"
        "except afunix.lowlevel.CredentialsRefused as e:\n    print(e.errno)\n"
    )
    seen: list[afunix.Datagram] = []
    lock = threading.Lock()

    def handler(d: afunix.Datagram) -> None:
        with lock:
            seen.append(d)

    policy = afunix.PeerPolicy(uids=[0])
    with afunix.Server(path, handler, type="dgram", model="thread", policy=policy, mode=0o666):
        srv_out = subprocess.run(
            [*NOBODY, PY, "-c", code, path], capture_output=True, text=True, timeout=30
        )
    assert srv_out.stdout.strip() == str(errno.EPERM), srv_out.stderr
    assert seen == []


def test_group_members_are_allowed(refusals: pytest.LogCaptureFixture) -> None:
    addr = f"@afunix-test-policy-group-{os.getpid()}"
    member = ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "4242"]
    policy = afunix.PeerPolicy(gids=[4242])
    with afunix.Server(addr, echo, model="thread", policy=policy) as srv:
        srv.start()
        assert run_client(member, addr) == repr(b"served uid 65534: ping")
        assert run_client(NOBODY, addr) in REFUSED
        assert run_client([], addr) in REFUSED  # root is not exempt
        assert srv.rejected == 2


def test_same_user_policy(refusals: pytest.LogCaptureFixture) -> None:
    addr = f"@afunix-test-policy-same-{os.getpid()}"
    with afunix.Server(addr, echo, model="thread", policy=afunix.PeerPolicy(same_user=True)) as srv:
        srv.start()
        assert run_client([], addr) == repr(b"served uid 0: ping")
        assert run_client(NOBODY, addr) in REFUSED


def test_policy_runs_before_verify(refusals: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def verify(sock: object, peer: afunix.Address) -> bool:
        calls.append(1)
        return True

    addr = f"@afunix-test-policy-verify-{os.getpid()}"
    policy = afunix.PeerPolicy(uids=[0])
    with afunix.Server(addr, echo, model="thread", policy=policy, verify=verify) as srv:  # type: ignore[arg-type]
        srv.start()
        run_client(NOBODY, addr)
        assert calls == []  # refused by the policy: verify never asked
        assert run_client([], addr) == repr(b"served uid 0: ping")
        assert calls == [1]


def test_policy_over_tcp_is_refused_at_once() -> None:
    with pytest.raises(afunix.UnsupportedFeature, match="only for Unix-domain sockets"):
        afunix.Server("tcp://127.0.0.1:0", echo, model="thread", policy=afunix.PeerPolicy())
    # (no_fd_leak checks that the listening socket was closed)


# ---------------------------------------------------------- CLI wiring of rules
def test_serve_allow_options_build_the_policy() -> None:
    from afunix.cli import build_parser
    from afunix.cli.creds import policy_from_args

    parser = build_parser()
    argv = "serve @x --allow-uid 3 --allow-user nobody --allow-gid 7 --allow-group nogroup"
    args = parser.parse_args([*argv.split(), "--allow-same-user"])
    policy = policy_from_args(args)
    assert policy is not None
    assert policy.uids == {3, 65534}
    assert policy.gids == {7, 65534}
    assert policy.same_user_uid == os.geteuid()
    assert policy_from_args(args) is policy  # built once
    assert policy_from_args(parser.parse_args(["serve", "@x", "--show-creds"])) is None
    with pytest.raises(afunix.PolicyError, match="no group named 'no-such-group-x'"):
        policy_from_args(parser.parse_args(["serve", "@x", "--allow-group", "no-such-group-x"]))
