"""Escape attempts: refused, logged, and no descriptor outside the root ever leaves."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import afunix
from afunix.broker import Broker, Client, confine, parse_policy
from afunix.broker.flags import Wire
from afunix.broker.protocol import OpenRequest, encode_request
from afunix.broker.protocol import frame as framed
from tests.security.broker_support import (
    POLICY,
    BrokerProcess,
    Tree,
    as_nobody,
    make_tree,
    tree,
)

__all__ = ["tree"]

RESOLVERS = [confine.Openat2Resolver(), confine.WalkResolver()]

PROC_POLICY = (
    POLICY
    + """
[[rule]]
name = "proc"
root = "/proc"
anyone = true
allow = ["read"]
"""
)


def _raw(path: bytes, wire: int = Wire.READ, mode: int = 0) -> dict[str, object]:
    return {"path": path.hex(), "raw": True, "wire": int(wire), "mode": mode}


@pytest.fixture
def proc_broker(sockdir: Path) -> tuple[Tree, BrokerProcess]:
    t = make_tree(sockdir, PROC_POLICY)
    b = BrokerProcess(t)
    yield t, b
    b.stop()


def test_escape_attempts_are_refused_and_logged(
    proc_broker: tuple[Tree, BrokerProcess],
) -> None:
    t, b = proc_broker
    root = os.fsencode(t.root)
    # A descriptor of the broker's that points outside every root: its audit log.
    audit_fd = next(
        int(n)
        for n in os.listdir(f"/proc/{b.pid}/fd")
        if os.readlink(f"/proc/{b.pid}/fd/{n}") == str(t.audit)
    )
    attempts: list[tuple[str, dict[str, object], int]] = [
        ("dotdot", _raw(root + b"/../outside/outside.txt"), errno.EACCES),
        ("dotdot-deep", _raw(root + b"/sub/../../outside/outside.txt"), errno.EACCES),
        ("absolute outside", {"path": str(t.outside / "outside.txt")}, errno.EACCES),
        ("etc shadow", {"path": "/etc/shadow"}, errno.EACCES),
        ("symlink out", {"path": str(t.root / "out" / "outside.txt")}, errno.EACCES),
        ("absolute symlink", {"path": str(t.root / "abs" / "shadow")}, errno.EACCES),
        (
            "relative symlink up",
            {"path": str(t.root / "up" / "outside" / "outside.txt")},
            errno.EACCES,
        ),
        ("/proc/self/root", {"path": "/proc/self/root/etc/shadow"}, errno.ELOOP),
        ("/proc/pid/root", {"path": f"/proc/{b.pid}/root/etc/shadow"}, errno.ELOOP),
        ("/proc/pid/fd/N", {"path": f"/proc/{b.pid}/fd/{audit_fd}"}, errno.ELOOP),
        ("/proc/self/cwd", {"path": "/proc/self/cwd/etc/shadow"}, errno.ELOOP),
        ("long path", _raw(root + b"/" + b"a/" * 2100), errno.ENAMETOOLONG),
        ("long component", _raw(root + b"/" + b"x" * 300 + b".txt"), errno.ENAMETOOLONG),
        ("non-UTF-8", _raw(root + b"/\xff\xfe.txt"), errno.EILSEQ),
        ("overlong '..'", _raw(root + b"/\xc0\xae\xc0\xae/outside/outside.txt"), errno.EILSEQ),
        ("NUL byte", _raw(root + b"/pub.txt\0/../../../etc/shadow"), errno.EINVAL),
        ("relative path", _raw(b"pub.txt"), errno.EINVAL),
    ]
    results = as_nobody(t.sock, [a[1] for a in attempts])
    got = {name: r.get("errno") for (name, _, _), r in zip(attempts, results, strict=True)}
    want = {name: err for name, _, err in attempts}
    assert got == want
    assert not any(r.get("ok") for r in results)
    recs = t.opens()
    assert len(recs) == len(attempts)
    for (name, _, err), rec in zip(attempts, recs, strict=True):
        assert rec["decision"] == "denied", name
        assert rec["errno"] == errno.errorcode[err], name
        assert rec["peer"]["uid"] == 65534
        assert "file" not in rec
    # Non-UTF-8 and NUL bytes are logged escaped, as valid JSON, and long paths cut.
    by_name = dict(zip([a[0] for a in attempts], recs, strict=True))
    assert "\\xff\\xfe" in by_name["non-UTF-8"]["request"]["path"]
    assert "\x00" in by_name["NUL byte"]["request"]["path"]
    assert len(by_name["long path"]["request"]["path"]) < 600
    assert "'..'" in by_name["dotdot"]["reason"]
    assert "EXDEV" in by_name["symlink out"]["reason"]


def test_the_proc_rule_itself_works(proc_broker: tuple[Tree, BrokerProcess]) -> None:
    """Control for the test above: the /proc rule grants plain files (not magic links)."""
    t, b = proc_broker
    [res] = as_nobody(t.sock, [{"path": f"/proc/{b.pid}/status"}])
    assert res["ok"] and res["data"].startswith("Name:")


def test_descriptors_sent_with_a_request_are_closed_unused(
    tree: Tree,
) -> None:
    """A client that attaches a directory descriptor (to make the broker resolve relative
    to it, openat-style) gets EINVAL; the descriptor is closed in the broker."""
    b = BrokerProcess(tree)
    try:
        base = _serving(b)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(tree.sock))
            s.settimeout(10)
            dirfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            try:
                frame = bytearray(
                    framed(encode_request(OpenRequest(7, b"etc/shadow", int(Wire.READ))))
                )
                frame[2:4] = struct.pack("!H", 1)  # the header announces the descriptor
                s.sendmsg(
                    [bytes(frame)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", dirfd))],
                )
            finally:
                os.close(dirfd)
            reply = s.recv(4096)
            assert struct.unpack("!i", reply[16:20])[0] == errno.EINVAL
            assert b"requests carry no descriptors" in reply
        left = _settles(b, base)
        assert not left, f"the broker still holds {left}"
    finally:
        b.stop()
    warmup, rec = tree.opens()
    assert warmup["decision"] == "denied"  # no such file (the _serving() request)
    assert rec["decision"] == "invalid" and rec["errno"] == "EINVAL"


def _serving(b: BrokerProcess) -> dict[int, str]:
    """The broker's descriptor table once it is serving and idle.

    Its socket file appears at ``bind``, before ``listen`` and before the accept loop
    makes its selector
    (an epoll descriptor): one request answered first, and the table read only once
    it stops changing, so that the baseline is the serving broker's.
    """
    # (The file exists from bind on; until listen, a connect is refused: retry.)
    with afunix.connect(b.tree.sock, retries=8, backoff=0.01) as s:
        s.settimeout(10)
        s.sendall(framed(encode_request(OpenRequest(1, b"no-such-file", int(Wire.READ)))))
        assert s.recv(4096)  # a reply: the broker is in its loop
    deadline = time.monotonic() + 3
    table = b.fd_table()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = b.fd_table()
        if again == table:
            break
        table = again
    return table


def _settles(b: BrokerProcess, base: dict[int, str]) -> dict[int, str]:
    """What differs from *base* in the broker's descriptor table once it settles
    (it closes lazily); empty when it is back to *base* within 3 s."""
    deadline = time.monotonic() + 3
    while True:
        now = b.fd_table()
        if now == base:
            return {}
        if time.monotonic() > deadline:
            extra = {fd: t for fd, t in now.items() if base.get(fd) != t}
            return extra or {fd: f"{t} (closed)" for fd, t in base.items() if fd not in now}
        time.sleep(0.01)


# ------------------------------------------------------------------ races
def _swapper(links: list[Path], target: Path, stop: threading.Event, swaps: list[int]) -> None:
    n = 0
    while not stop.is_set():
        os.replace(links[n % 2], target)
        # Recreate the one we just moved, for the next swap.
        src = os.readlink(target)
        os.symlink(src, links[n % 2])
        n += 1
    swaps.append(n)


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
@pytest.mark.parametrize("shape", ["intermediate", "last"])
def test_symlink_swapped_during_thousands_of_requests(
    sockdir: Path, resolver: confine.Resolver, shape: str
) -> None:
    """A thread swaps a symlink between a directory inside the root and one outside, while
    the client makes thousands of requests: no descriptor received points outside."""
    root, outside = sockdir / "root", sockdir / "outside"
    (root / "inside").mkdir(parents=True)
    outside.mkdir()
    (root / "inside" / "f.txt").write_text("in")
    (outside / "f.txt").write_text("OUT")
    inside_st = os.stat(root / "inside" / "f.txt")
    if shape == "intermediate":
        good, bad, request = "inside", str(outside), root / "link" / "f.txt"
    else:
        good, bad, request = "inside/f.txt", str(outside / "f.txt"), root / "link"
    a, c = sockdir / "a.lnk", sockdir / "c.lnk"
    os.symlink(good, a)
    os.symlink(bad, c)
    os.symlink(good, root / "link")
    policy = parse_policy(
        f"[limits]\nrequests_per_second = 1000000\nburst = 1000000\n"
        f'[[rule]]\nroot = "{root}"\nanyone = true\nallow = ["read"]\n'
    )
    stop = threading.Event()
    swaps: list[int] = []
    granted = refused = 0
    with Broker(sockdir / "b.sock", policy, resolver=resolver) as broker:
        broker.start()
        swapper = threading.Thread(target=_swapper, args=([a, c], root / "link", stop, swaps))
        swapper.start()
        try:
            with Client(broker.address) as client:
                deadline = time.monotonic() + 4.0
                for _ in range(3000):
                    if time.monotonic() > deadline:
                        break
                    try:
                        fd = client.open_fd(request)
                    except OSError as exc:
                        assert exc.errno in (errno.EACCES, errno.ENOENT, errno.ELOOP), exc
                        refused += 1
                        continue
                    try:
                        st = os.fstat(fd)
                        assert (st.st_dev, st.st_ino) == (inside_st.st_dev, inside_st.st_ino)
                        assert os.pread(fd, 10, 0) == b"in"
                    finally:
                        os.close(fd)
                    granted += 1
        finally:
            stop.set()
            swapper.join()
    assert swaps[0] > 100, "the swapper barely ran: the race was not exercised"
    assert granted > 50 and refused > 50, (granted, refused)
