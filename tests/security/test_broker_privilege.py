"""The broker as root, clients as uid 65534 (setpriv): real privilege boundaries."""

from __future__ import annotations

import errno
import os
import stat
import time

from tests.security.broker_support import (
    BrokerProcess,
    Tree,
    as_nobody,
    broker,
    nobody_can_open,
    tree,
)

__all__ = ["broker", "tree"]  # fixtures


def test_granted_read_works(tree: Tree, broker: BrokerProcess) -> None:
    [res] = as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])
    assert res["ok"] and res["data"] == "public\n"
    [rec] = tree.opens()
    assert rec["decision"] == "granted"
    assert rec["peer"]["uid"] == 65534 and rec["peer"]["gid"] == 65534
    assert rec["peer"]["pid"] > 0 and rec["peer"]["exe"]
    assert rec["file"]["ino"] == os.stat(tree.root / "pub.txt").st_ino


def test_file_the_client_cannot_open_itself_is_opened_when_allowed(
    tree: Tree, broker: BrokerProcess
) -> None:
    secret = tree.root / "secret.txt"
    assert not nobody_can_open(secret)  # the boundary is real
    [res] = as_nobody(tree.sock, [{"path": str(secret)}])
    assert res["ok"] and res["data"] == "secret\n"
    assert res["uid"] == 0 and res["mode"] == 0o600


def test_refused_when_the_policy_does_not_allow_it(tree: Tree, broker: BrokerProcess) -> None:
    denied = tree.root / "denied" / "x.txt"
    assert not nobody_can_open(denied)
    results = as_nobody(
        tree.sock,
        [
            {"path": str(denied)},  # not covered by the rule's paths
            {"path": str(tree.root / "pub.txt"), "flags": "O_WRONLY"},  # write not granted
            {"path": str(tree.outside / "outside.txt")},  # no rule for this root at all
        ],
    )
    assert [r.get("errno") for r in results] == [errno.EACCES] * 3
    recs = tree.opens()
    assert [r["decision"] for r in recs] == ["denied"] * 3
    assert "does not grant write" in recs[1]["reason"]
    assert "default deny" in recs[2]["reason"]


def test_a_second_uid_rule_applies_only_to_its_uid(tree: Tree, broker: BrokerProcess) -> None:
    """The 'drop box' rule names uid 65534: root connecting gets nothing from it."""
    from afunix.broker import Client

    target = tree.rw / "root-try.txt"
    with Client(tree.sock) as c:
        try:
            c.open(target, "x")
        except PermissionError:
            pass
        else:  # pragma: no cover - the assertion below reports it
            raise AssertionError("root was granted a rule meant for uid 65534")
    assert not target.exists()


def test_create_with_rule_mode_excl_and_owner(tree: Tree, broker: BrokerProcess) -> None:
    made = tree.rw / "new.txt"
    results = as_nobody(
        tree.sock,
        [
            # The rule requires O_EXCL: a plain O_CREAT is refused.
            {"path": str(made), "flags": "O_WRONLY|O_CREAT|O_APPEND", "mode": 0o666},
            {
                "path": str(made),
                "flags": "O_WRONLY|O_CREAT|O_EXCL|O_APPEND",
                "mode": 0o666,
                "write": "one\n",
            },
            {"path": str(made), "flags": "O_WRONLY|O_CREAT|O_EXCL|O_APPEND", "mode": 0o666},
            {"path": str(made), "flags": "O_WRONLY|O_APPEND", "write": "two\n"},
            {"path": str(made), "flags": "O_WRONLY|O_TRUNC"},  # append-only: no truncation
        ],
    )
    assert results[0].get("errno") == errno.EACCES
    assert results[1]["ok"]
    assert results[2].get("errno") == errno.EEXIST
    assert results[3]["ok"]
    assert results[4].get("errno") == errno.EACCES
    st = os.stat(made)
    # 0666 & ~umask(022) & create_mode(0640) = 0640, owned by the client (create_owner = "peer").
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    # Appended through pipes the broker drains: the bytes arrive just after the writes.
    deadline = time.monotonic() + 10
    while made.read_text() != "one\ntwo\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert made.read_text() == "one\ntwo\n"
    created = [r for r in tree.opens() if r.get("file", {}).get("created")]
    assert len(created) == 1


def test_directory_listing_and_dir_fd_gives_no_extra_rights(
    tree: Tree, broker: BrokerProcess
) -> None:
    """A directory descriptor lets its holder look up names with *its own* rights only."""
    [res] = as_nobody(
        tree.sock,
        [
            {
                "path": str(tree.root),
                "flags": "O_RDONLY|O_DIRECTORY",
                "dotdot": "../outside/outside.txt",
            }
        ],
    )
    assert res["ok"]
    assert res.get("dotdot_errno") == errno.EACCES  # 0600 root file: nobody's own rights
    assert "dotdot_data" not in res


def test_broker_runs_setuid_free_and_as_root(tree: Tree, broker: BrokerProcess) -> None:
    """The premise of the tests above: the broker is root, the client is not."""
    with open(f"/proc/{broker.pid}/status") as f:
        uid_line = next(line for line in f if line.startswith("Uid:"))
    assert uid_line.split()[1] == "0"
    [res] = as_nobody(tree.sock, [{"path": str(tree.root / "pub.txt")}])
    assert tree.opens()[-1]["peer"]["uid"] == 65534 and res["ok"]
