"""Malformed and hostile requests (hypothesis): no crash, no leaked descriptor, no stall."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afunix.broker import Broker, Client, parse_policy
from afunix.broker.protocol import OpenRequest, encode_request
from afunix.broker.protocol import frame as framed
from tests.conftest import open_fds


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    base = Path(os.path.realpath(tmp_path_factory.mktemp("fz")))
    data = base / "data"
    data.mkdir()
    (data / "f.txt").write_text("f")
    os.symlink("/etc", data / "abs")
    sock = Path("/tmp") / f"afx-fuzz-{os.getpid()}.sock"
    policy = parse_policy(
        "[limits]\nrequests_per_second = 1000000\nburst = 1000000\n"
        "request_timeout = 0.2\nidle_timeout = 1\nmax_request_bytes = 2048\n"
        "connections_per_peer = 64\n"
        f'[[rule]]\nroot = "{data}"\nanyone = true\n'
        'allow = ["read", "list", "write", "create"]\n'
    )
    broker = Broker(sock, policy, shutdown_timeout=0.5).start()
    try:
        yield broker, data
    finally:
        broker.stop()


def _settled(baseline: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not at *baseline* (after the broker has caught up)."""
    deadline = time.monotonic() + 3
    while True:
        now = open_fds()
        extra = {fd: t for fd, t in now.items() if baseline.get(fd) != t}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.005)


def _good_request_is_served(broker: Broker, data: Path) -> None:
    started = time.monotonic()
    with Client(broker.address, timeout=2) as c, c.open(data / "f.txt") as f:
        assert f.read() == b"f"
    assert time.monotonic() - started < 1.0, "a well-behaved client was stalled"


def _frame(body: bytes, nfds: int = 0, flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack("!BBHI", 0xAF, flags, nfds, len(body) if length is None else length) + body


# A hostile conversation: chunks of bytes, some with descriptors attached, then a close.
bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda v, k, r, i, f, m, p: struct.pack("!BBHIII", v, k, r, i, f, m) + p,
        st.sampled_from([1, 1, 1, 0, 2, 255]),
        st.sampled_from([1, 1, 1, 0, 0x81, 0xFF]),
        st.sampled_from([0, 0, 1]),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1) | st.sampled_from([1, 2, 3, 0x48, 0x41, 0x2A, 0x3F]),
        st.integers(0, 2**32 - 1) | st.sampled_from([0, 0o644]),
        st.sampled_from([b"/", b"..", b"/etc/shadow", b"\0", b"/\xff", b"a" * 300]).map(bytes)
        | st.binary(max_size=40),
    ),
)
chunks = st.lists(
    st.tuples(
        st.one_of(
            bodies.map(_frame),
            st.tuples(bodies, st.integers(0, 2**32 - 1)).map(lambda t: _frame(t[0], length=t[1])),
            st.tuples(bodies, st.integers(0, 255), st.integers(0, 255)).map(
                lambda t: _frame(t[0], nfds=t[1], flags=t[2])
            ),
            st.binary(min_size=1, max_size=80),
        ),
        st.integers(0, 3),  # descriptors to attach to this chunk
        st.booleans(),  # split the chunk in two sends
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(conversation=chunks, read_replies=st.booleans())
def test_hostile_conversations(
    hostile_target: tuple[Broker, Path],
    conversation: list[tuple[bytes, int, bool]],
    read_replies: bool,
) -> None:
    broker, data = hostile_target
    baseline = open_fds()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(broker.address.sockaddr)
        s.settimeout(1)
        try:
            for raw, nfds, split in conversation:
                fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
                try:
                    anc = (
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))]
                        if fds
                        else []
                    )
                    cut = len(raw) // 2 if split and len(raw) > 1 else len(raw)
                    s.sendmsg([raw[:cut]], anc)
                    if cut < len(raw):
                        s.sendall(raw[cut:])
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError:
            pass  # the broker hung up on us: that is allowed
        if read_replies:
            try:
                s.shutdown(socket.SHUT_WR)  # end of our side: the broker answers and hangs up
                while True:
                    _d, anc_in, _f, _a = s.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
                    for _l, _t, blob in anc_in:
                        for (fd,) in struct.iter_unpack("i", blob[: len(blob) - len(blob) % 4]):
                            os.close(fd)
                    if not _d:
                        break
            except OSError:
                pass
    assert broker.server._thread is not None and broker.server._thread.is_alive()
    _good_request_is_served(broker, data)
    assert _settled(baseline) == {}, "the broker kept a descriptor"


def test_a_valid_request_among_garbage_on_other_connections(
    hostile_target: tuple[Broker, Path],
) -> None:
    """Control: the fuzz harness itself can tell a served request from a refused one."""
    broker, data = hostile_target
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(broker.address.sockaddr)
        s.settimeout(2)
        s.sendall(framed(encode_request(OpenRequest(3, os.fsencode(data / "f.txt"), 1))))
        _d, anc, _f, _a = s.recvmsg(4096, socket.CMSG_SPACE(4))
        [(_l, _t, blob)] = anc
        fd = struct.unpack("i", blob)[0]
        assert os.pread(fd, 1, 0) == b"f"
        os.close(fd)
