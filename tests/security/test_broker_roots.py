"""A rule's root is opened once, without following symlinks, and held (issue 15, item 1).

The attack: a user who can write in one rule's root replaces *another* rule's
root, nested in it, by a symlink to a directory of root-only files, then asks
for a file "beneath" that root. Looked up by path on every request, the root
followed the symlink and the broker served the file. Held as a descriptor,
opened at start or reload with ``O_NOFOLLOW`` on every component, the root
stays the directory the administrator named.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from afunix.broker import Broker, Client, PolicyFileError, confine, load_policy, parse_policy
from tests.conftest import NOBODY, afunix_cmd, wait_until
from tests.security.broker_support import BrokerProcess, Tree, as_nobody, nobody_can_open

SECRET = "TOP SECRET\n"

NESTED_POLICY = """\
version = 1

[limits]
requests_per_second = 100000
burst = 100000

[[rule]]
name = "inbox"
root = "{base}/shared"
uids = [65534]
paths = ["*.txt"]
allow = ["create", "append"]
create_excl = true

[[rule]]
name = "reports"
root = "{base}/shared/reports"
anyone = true
allow = ["read"]
"""


def _nested_tree(base: Path, policy: str = NESTED_POLICY) -> Tree:
    """``shared/`` (0777: uid 65534 may write in it) holds the root-owned root ``reports/``;
    ``secret/`` (0700) holds a root-only 0600 file."""
    os.chmod(base, 0o755)
    shared, reports, secret = base / "shared", base / "shared" / "reports", base / "secret"
    for d, mode in ((shared, 0o777), (reports, 0o755), (secret, 0o700)):
        d.mkdir()
        os.chmod(d, mode)
    (reports / "q3.txt").write_text("report\n")
    os.chmod(reports / "q3.txt", 0o644)
    (secret / "shadow.txt").write_text(SECRET)
    os.chmod(secret / "shadow.txt", 0o600)
    pol = base / "policy.toml"
    pol.write_text(policy.format(base=base))
    return Tree(base, reports, secret, shared, pol, base / "audit.jsonl", base / "b.sock")


def _as_nobody_run(code: str, *args: str) -> None:
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr


_SWAP_IN_SYMLINK = """
import os, sys
root, target = sys.argv[1], sys.argv[2]
os.rename(root, root + ".moved")
os.symlink(target, root)
"""


def _wait(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    return wait_until(pred, timeout)


def test_a_nested_root_swapped_for_a_symlink_serves_nothing_outside(sockdir: Path) -> None:
    """uid 65534 renames the nested root away and puts a symlink to the secret directory in
    its place: asking for the root-only 0600 file beneath it is refused; the root's own files
    are still served (from the directory the broker holds); a reload refuses the symlink and
    keeps the previous policy."""
    t = _nested_tree(sockdir)
    secret_file = t.outside / "shadow.txt"
    assert not nobody_can_open(secret_file)  # the premise: nobody cannot read it itself
    b = BrokerProcess(t)
    try:
        [before] = as_nobody(t.sock, [{"path": str(t.root / "q3.txt")}])
        assert before["ok"] and before["data"] == "report\n"
        _as_nobody_run(_SWAP_IN_SYMLINK, str(t.root), str(t.outside))
        assert os.path.islink(t.root) and (t.root / "shadow.txt").exists()
        results = as_nobody(
            t.sock,
            [
                {"path": str(t.root / "shadow.txt")},
                {"path": str(t.root / "q3.txt")},
                {"path": str(t.root)},
            ],
        )
        assert all("TOP SECRET" not in str(r) for r in results), results
        assert results[0].get("errno") == errno.ENOENT, results[0]  # not in the held root
        assert results[1]["ok"] and results[1]["data"] == "report\n"
        assert results[2].get("errno") == errno.EISDIR
        # A reload opens the roots again: the symlink is refused, the old policy stays.
        os.kill(b.pid, signal.SIGHUP)
        assert _wait(lambda: any(r["event"] == "reload-failed" for r in t.audit_lines()))
        [again] = as_nobody(t.sock, [{"path": str(t.root / "q3.txt")}])
        assert again["ok"] and again["data"] == "report\n"
    finally:
        err = b.stop()
    failed = next(r for r in t.audit_lines() if r["event"] == "reload-failed")
    assert failed["line"] == 17  # the [[rule]] of "reports"
    assert "is a symlink" in failed["reason"], failed
    assert "reload refused, keeping the previous policy" in err
    granted = [r for r in t.opens() if r["decision"] == "granted"]
    assert all("secret" not in r["file"]["path"] for r in granted)


def test_a_root_that_is_a_symlink_is_a_policy_error_at_start(sockdir: Path) -> None:
    t = _nested_tree(sockdir)
    os.rename(t.root, sockdir / "real-reports")
    os.symlink(sockdir / "real-reports", t.root)
    with pytest.raises(PolicyFileError) as info:
        load_policy(t.policy)
    assert info.value.line == 17
    assert "is a symlink" in info.value.reason and "name the real directory" in info.value.reason
    proc = subprocess.run(
        afunix_cmd("broker", str(t.sock), "--policy", str(t.policy)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78, proc.stderr  # bad config (docs/operations.md)
    assert f"invalid policy {t.policy}, line 17: root " in proc.stderr
    assert "is a symlink" in proc.stderr
    assert not t.sock.exists()


def test_a_symlink_above_a_root_is_refused_too(sockdir: Path) -> None:
    """Every component is opened with O_NOFOLLOW, not only the last."""
    real = sockdir / "real" / "data"
    real.mkdir(parents=True)
    os.symlink(sockdir / "real", sockdir / "via")
    with pytest.raises(PolicyFileError, match=r"via' is a symlink"):
        parse_policy(f'[[rule]]\nroot = "{sockdir}/via/data"\nanyone = true\nallow = ["read"]\n')


def test_roots_swapped_between_check_and_hold_are_refused(sockdir: Path) -> None:
    """The Broker opens the roots itself (not trusting the parse-time check): a policy whose
    root became a symlink after it was parsed is refused, and nothing is left open."""
    t = _nested_tree(sockdir)
    policy = load_policy(t.policy)
    os.rename(t.root, sockdir / "elsewhere")
    os.symlink(t.outside, t.root)
    with pytest.raises(PolicyFileError) as info:
        Broker(sockdir / "b.sock", policy)
    assert info.value.line == 17 and "is a symlink" in info.value.reason
    assert not (sockdir / "b.sock").exists()


def test_held_roots_are_closed_on_reload_and_close(sockdir: Path) -> None:
    """One descriptor per distinct root while serving; 20 reloads leave the same set."""
    t = _nested_tree(sockdir)
    b = BrokerProcess(t)

    def held() -> list[str]:
        return sorted(v for v in b.fd_table().values() if v.startswith(str(sockdir / "shared")))

    try:
        as_nobody(t.sock, [{"path": str(t.root / "q3.txt")}])
        assert held() == [str(sockdir / "shared"), str(t.root)]
        for n in range(1, 21):
            os.kill(b.pid, signal.SIGHUP)
            assert _wait(lambda n=n: sum(r["event"] == "reload" for r in t.audit_lines()) == n)
        [res] = as_nobody(t.sock, [{"path": str(t.root / "q3.txt")}])
        assert res["ok"]
        assert _wait(lambda: held() == [str(sockdir / "shared"), str(t.root)]), held()
    finally:
        b.stop()


def test_in_process_broker_closes_its_roots(sockdir: Path) -> None:
    """The autouse leak check covers this one: start, a request, a reload, stop."""
    t = _nested_tree(sockdir)
    with Broker(sockdir / "b.sock", t.policy) as broker:
        broker.start()
        with Client(broker.address) as c:
            os.close(c.open_fd(t.root / "q3.txt"))
            assert broker.reload()
            os.close(c.open_fd(t.root / "q3.txt"))


# ------------------------------------------------------------------ the race
_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2
SWAPS = 10_000


def _exchange(a: bytes, b: bytes) -> None:
    """``renameat2(RENAME_EXCHANGE)``: *a* and *b* trade places atomically."""
    if _libc.renameat2(-100, a, -100, b, _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "resolver", [confine.Openat2Resolver(), confine.WalkResolver()], ids=lambda r: r.name
)
def test_ten_thousand_root_swaps_during_requests_give_no_escape(
    sockdir: Path, resolver: confine.Resolver
) -> None:
    """A thread exchanges the rule's root with a symlink to a directory outside it, 10,000
    times (atomically: renameat2 RENAME_EXCHANGE), while two clients keep asking for a file
    beneath the root. Every descriptor received is the file inside: 0 escapes."""
    root, outside = sockdir / "root", sockdir / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "f.txt").write_text("in")
    (outside / "f.txt").write_text("OUT")
    inside = os.stat(root / "f.txt")
    link = sockdir / "link"
    os.symlink(outside, link)
    policy = parse_policy(
        "[limits]\nrequests_per_second = 1000000\nburst = 1000000\n"
        f'[[rule]]\nroot = "{root}"\nanyone = true\nallow = ["read"]\n'
    )
    stop = threading.Event()
    swaps = [0]
    counts = {"granted": 0, "refused": 0, "escapes": 0, "during": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def swapper() -> None:
        a, b = os.fsencode(root), os.fsencode(link)
        try:
            for _ in range(SWAPS):
                _exchange(a, b)
                swaps[0] += 1
                if swaps[0] % 8 == 0:
                    time.sleep(0)  # let the clients in
        finally:
            stop.set()

    def client(address: object) -> None:
        try:
            with Client(address, timeout=30) as c:  # type: ignore[arg-type]
                while not stop.is_set():
                    try:
                        fd = c.open_fd(root / "f.txt")
                    except OSError as exc:
                        assert exc.errno in (errno.ENOENT, errno.EACCES, errno.ELOOP), exc
                        with lock:
                            counts["refused"] += 1
                        continue
                    try:
                        st = os.fstat(fd)
                        escaped = (st.st_dev, st.st_ino) != (inside.st_dev, inside.st_ino)
                        escaped = escaped or os.pread(fd, 10, 0) != b"in"
                    finally:
                        os.close(fd)
                    with lock:
                        counts["granted"] += 1
                        counts["escapes"] += escaped
                        counts["during"] += 0 < swaps[0] < SWAPS
        except BaseException as exc:
            errors.append(exc)

    with Broker(sockdir / "b.sock", policy, resolver=resolver) as broker:
        broker.start()
        clients = [threading.Thread(target=client, args=(broker.address,)) for _ in range(2)]
        for th in clients:
            th.start()
        # Start swapping once both clients are being served.
        assert _wait(lambda: counts["granted"] >= 2 or errors)
        sw = threading.Thread(target=swapper)
        sw.start()
        sw.join()
        for th in clients:
            th.join()
    if swaps[0] % 2:  # leave the tree as it was (for the clean-up)
        _exchange(os.fsencode(root), os.fsencode(link))
    assert not errors, errors
    print(f"\n{resolver.name}: {swaps[0]} root swaps, {counts}")
    assert swaps[0] == SWAPS
    assert counts["escapes"] == 0, counts
    assert counts["during"] >= 50, f"too few requests overlapped the swaps: {counts}"


def test_retired_roots_stay_open_until_their_last_request_is_done(sockdir: Path) -> None:
    """A reload retires the old roots while requests may still resolve beneath them: the
    descriptors are closed only after the last of those releases them (a number closed
    under a lookup could be reused by another open, and confine nothing)."""
    held = confine.HeldRoots.open([(str(sockdir), 1)])
    fd = held.fd(str(sockdir))
    held.acquire()
    held.acquire()
    held.retire()
    with pytest.raises(OSError, match="retired"):
        held.acquire()  # no new request gets a retired set
    assert os.path.samestat(os.fstat(fd), os.stat(sockdir))
    held.release()
    assert os.path.samestat(os.fstat(fd), os.stat(sockdir))
    held.release()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
