"""The command line: afunix broker --check, afunix open --broker, afunix cat --broker."""

from __future__ import annotations

import os
import stat
import subprocess
import time

from tests.conftest import NOBODY, afunix_cmd
from tests.security.broker_support import BrokerProcess, Tree, broker, tree

__all__ = ["broker", "tree"]


def nobody(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, *afunix_cmd(*args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


def test_check_valid(tree: Tree) -> None:
    proc = subprocess.run(
        afunix_cmd("broker", "--check", str(tree.policy)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{tree.policy}: valid, 2 rule(s), default deny"
    assert lines[1].startswith("  rule 'data' (line 7): anyone may list, read beneath ")
    assert "rule 'drop box' (line 14): uid 65534 may append, create, read" in lines[2]
    assert "create mode 0640; O_EXCL required; owned by the client" in lines[2]


def test_check_invalid_names_line_and_reason(tree: Tree) -> None:
    text = tree.policy.read_text().replace('allow = ["read", "list"]', 'allow = ["read", "lst"]')
    tree.policy.write_text(text)
    proc = subprocess.run(
        afunix_cmd("broker", "--check", str(tree.policy)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78  # EX_CONFIG
    assert proc.stderr.strip() == (
        f"afunix: error: invalid policy {tree.policy}, line 12: unknown operation 'lst' "
        "(known: read, write, append, create, list) [EINVAL]"
    )


def test_serve_needs_address_and_policy() -> None:
    proc = subprocess.run(afunix_cmd("broker"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--policy" in proc.stderr


def test_open_reads_what_nobody_could_not(tree: Tree, broker: BrokerProcess) -> None:
    proc = nobody("open", "--broker", str(tree.sock), str(tree.root / "secret.txt"))
    assert (proc.returncode, proc.stdout) == (0, "secret\n"), proc.stderr
    direct = subprocess.run(
        [*NOBODY, "cat", str(tree.root / "secret.txt")], capture_output=True, timeout=30
    )
    assert direct.returncode != 0


def test_open_refused_says_why_and_exits_77(tree: Tree, broker: BrokerProcess) -> None:
    proc = nobody("open", "--broker", str(tree.sock), str(tree.root / "out" / "outside.txt"))
    assert proc.returncode == 77  # EX_NOPERM
    assert proc.stderr.startswith("afunix: error: Permission denied (broker: confinement: ")
    assert proc.stderr.rstrip().endswith(f"{tree.root / 'out' / 'outside.txt'} [EACCES]")
    proc = nobody("open", "--broker", str(tree.sock), "/etc/shadow")
    assert proc.returncode == 77  # EX_NOPERM
    assert "(broker: not granted by the policy)" in proc.stderr


def test_open_write_create_append_list_stat(tree: Tree, broker: BrokerProcess) -> None:
    target = str(tree.rw / "drop.txt")
    sock = str(tree.sock)
    made = nobody(
        "open",
        "--broker",
        sock,
        target,
        "--append",
        "--create",
        "--excl",
        "--mode",
        "600",
        stdin="first\n",
    )
    assert made.returncode == 0, made.stderr
    again = nobody("open", "--broker", sock, target, "--append", stdin="second\n")
    assert again.returncode == 0, again.stderr
    # Appended through pipes the broker drains: the bytes arrive just after the writes.
    deadline = time.monotonic() + 10
    while (tree.rw / "drop.txt").read_text() != "first\nsecond\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tree.rw / "drop.txt").read_text() == "first\nsecond\n"
    st = os.stat(target)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 65534
    # --write without truncation is not granted by the append-only rule.
    refused = nobody("open", "--broker", sock, target, "--write", "--truncate", stdin="x")
    assert refused.returncode == 77  # EX_NOPERM
    listing = nobody("open", "--broker", sock, str(tree.root), "--list")
    assert listing.stdout.split() == sorted(os.listdir(tree.root))
    described = nobody("open", "--broker", sock, str(tree.root / "secret.txt"), "--stat")
    assert "regular file, read-only" in described.stdout
    assert f"inode {os.stat(tree.root / 'secret.txt').st_ino}" in described.stdout


def test_open_uses_the_environment_variable(tree: Tree, broker: BrokerProcess) -> None:
    proc = subprocess.run(
        [*NOBODY, *afunix_cmd("open", str(tree.root / "pub.txt"))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={**os.environ, "AFUNIX_BROKER": str(tree.sock)},
    )
    assert proc.stdout == "public\n", proc.stderr
    missing = subprocess.run(
        afunix_cmd("open", str(tree.root / "pub.txt")),
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "AFUNIX_BROKER"},
    )
    assert missing.returncode == 2 and "--broker" in missing.stderr  # a usage error


def test_cat_through_the_broker(tree: Tree, broker: BrokerProcess) -> None:
    proc = nobody(
        "cat",
        "--broker",
        str(tree.sock),
        str(tree.root / "pub.txt"),
        str(tree.root / "denied" / "x.txt"),
        str(tree.root / "sub" / "deep.txt"),
    )
    assert proc.stdout == "public\ndeep\n"
    assert proc.returncode == 1
    assert f"cannot open {tree.root / 'denied' / 'x.txt'}: Permission denied" in proc.stderr
    assert [r["decision"] for r in tree.opens()] == ["granted", "denied", "granted"]


def test_tour_section_broker() -> None:
    proc = subprocess.run(
        afunix_cmd("tour", "--section", "broker"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[FAILED]" not in proc.stdout
    assert "[ok] nobody cannot open it itself" in proc.stdout  # we are root: the real boundary
    assert "[ok] a symlink inside the root pointing out is refused" in proc.stdout
    assert "0 failed" in proc.stdout
