"""Shared set-up for the broker tests: a file tree, a policy, a broker, clients as nobody.

The tree (everything owned by root)::

    D/                     0755
      root/                0755   the rule's root
        pub.txt            0644   "public"
        secret.txt         0600   "secret"   (nobody cannot open it itself)
        sub/deep.txt       0600   "deep"
        denied/x.txt       0600   not covered by the policy's paths
        out -> D/outside          a symlink inside pointing out
        abs -> /etc               an absolute symlink
        up -> ..                  a relative symlink that leaves the root
      outside/
        outside.txt        0600   "outside"
      rw/                  0755   a second root where nobody may create/append
      policy.toml, audit.jsonl, b.sock
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NOBODY, afunix_cmd, wait_for_path

POLICY = """\
version = 1

[limits]
requests_per_second = 100000
burst = 100000

[[rule]]
name = "data"
root = "{root}"
paths = ["*.txt", "sub/**", "", "out/**", "abs/**", "up/**"]
anyone = true
allow = ["read", "list"]

[[rule]]
name = "drop box"
root = "{rw}"
uids = [65534]
allow = ["create", "append", "read"]
create_mode = 0o640
create_excl = true
create_owner = "peer"
"""


@dataclass
class Tree:
    base: Path
    root: Path
    outside: Path
    rw: Path
    policy: Path
    audit: Path
    sock: Path

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]

    def opens(self) -> list[dict[str, Any]]:
        return [r for r in self.audit_lines() if r["event"] == "open"]


def _write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def make_tree(base: Path, policy: str = POLICY) -> Tree:
    os.chmod(base, 0o755)
    root, outside, rw = base / "root", base / "outside", base / "rw"
    for d in (root, outside, rw, root / "sub", root / "denied"):
        d.mkdir()
        os.chmod(d, 0o755)
    _write(root / "pub.txt", "public\n", 0o644)
    _write(root / "secret.txt", "secret\n", 0o600)
    _write(root / "sub" / "deep.txt", "deep\n", 0o600)
    _write(root / "denied" / "x.txt", "denied\n", 0o600)
    _write(outside / "outside.txt", "outside\n", 0o600)
    os.symlink(outside, root / "out")
    os.symlink("/etc", root / "abs")
    os.symlink("..", root / "up")
    pol = base / "policy.toml"
    pol.write_text(policy.format(root=root, rw=rw, base=base))
    return Tree(base, root, outside, rw, pol, base / "audit.jsonl", base / "b.sock")


@pytest.fixture
def tree(sockdir: Path) -> Tree:
    return make_tree(sockdir)


class BrokerProcess:
    """``afunix broker`` run as a child process (as root, like a real deployment)."""

    def __init__(self, tree: Tree, *extra: str, env: dict[str, str] | None = None) -> None:
        self.tree = tree
        argv = afunix_cmd(
            "broker",
            str(tree.sock),
            "--policy",
            str(tree.policy),
            "--audit",
            str(tree.audit),
            "--mode",
            "666",
            *extra,
        )
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            deadline = time.monotonic() + 10
            while not tree.sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"broker did not start: {err}")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_table(self) -> dict[int, str]:
        """The broker's descriptors and what each refers to."""
        table = {}
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                table[int(name)] = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:  # closed meanwhile
                pass
        return table

    def stop(self) -> str:
        """SIGTERM (SIGKILL if needed); return what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        return err


@pytest.fixture
def broker(tree: Tree) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tree)
    try:
        yield b
    finally:
        b.stop()


# A client program run as nobody: it performs a list of requests and prints
# one JSON result per request. Flags are os.O_* names joined with "|".
_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from afunix.broker import Client
    from afunix.broker.client import BrokerError
    addr, reqs = sys.argv[1], json.loads(sys.argv[2])
    out = []
    with Client(addr, timeout=10) as c:
        for r in reqs:
            flags = 0
            for name in r.get("flags", "O_RDONLY").split("|"):
                flags |= getattr(os, name)
            path = os.fsencode(r["path"]) if not r.get("raw") else bytes.fromhex(r["path"])
            res = {"path": r["path"]}
            try:
                if r.get("raw"):
                    reply, fd = c.request(path, r["wire"], r.get("mode", 0))
                    if fd is None:
                        raise OSError(reply.errno, reply.message)
                else:
                    fd = c.open_fd(path, flags, r.get("mode", 0o666))
            except BrokerError as e:
                res["broker_error"] = e.errno
            except OSError as e:
                res["errno"] = e.errno
            else:
                st = os.fstat(fd)
                res.update(ok=True, dev=st.st_dev, ino=st.st_ino, uid=st.st_uid,
                           mode=st.st_mode & 0o7777)
                if r.get("write") is not None:
                    os.write(fd, r["write"].encode())
                elif not os.path.isdir(f"/proc/self/fd/{fd}"):
                    res["data"] = os.read(fd, 100).decode(errors="replace")
                if r.get("dotdot"):
                    # Use the directory descriptor to try to climb out of the root.
                    try:
                        g = os.open(r["dotdot"], os.O_RDONLY, dir_fd=fd)
                    except OSError as e:
                        res["dotdot_errno"] = e.errno
                    else:
                        res["dotdot_data"] = os.read(g, 100).decode(errors="replace")
                        os.close(g)
                os.close(fd)
            out.append(res)
    print(json.dumps(out))
    """
)


def as_nobody(addr: str | Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the probe client as uid/gid 65534; one result dict per request."""
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-c", _PROBE, str(addr), json.dumps(requests)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    return [Result(r) for r in json.loads(proc.stdout)]


class Result(dict[str, Any]):
    """One probe result; a missing key (``["ok"]`` of a refused request) names the
    whole result, so a failing test says what the broker answered instead."""

    def __missing__(self, key: str) -> Any:
        raise KeyError(f"{key!r} not in the broker's answer {dict(self)}")


def nobody_can_open(path: Path) -> bool:
    """Whether uid 65534 can open *path* for reading by itself."""
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-c", f"open({str(path)!r}, 'rb').close()"],
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    return proc.returncode == 0


__all__ = [
    "POLICY",
    "BrokerProcess",
    "Tree",
    "as_nobody",
    "broker",
    "make_tree",
    "nobody_can_open",
    "tree",
    "wait_for_path",
]
