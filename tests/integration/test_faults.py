"""Faults: misbehaving clients, a killed server, descriptor exhaustion (issue 5, section 2)."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import afunix

from ..conftest import afunix_cmd, serving, wait_for_path

MODELS = ["async", "thread", "fork"]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _settle(fn, expected, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@contextmanager
def cli_server(path: Path, *args: str, limit_nofile: int | None = None) -> Iterator[int]:
    """``afunix serve`` in the background (log: serve.log beside *path*); yields its pid."""
    with serving(path.parent, str(path), *args) as proc:
        if limit_nofile is not None:
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit_nofile, limit_nofile))
        yield proc.pid


def _echo(path: Path, data: bytes = b"ping") -> bytes:
    with afunix.connect(path, timeout=5) as c:
        c.settimeout(10)
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: c.recv(65536), b""))


@pytest.mark.parametrize("model", MODELS)
def test_client_killed_mid_message(sockdir: Path, model: str) -> None:
    path = sockdir / "k.sock"
    with cli_server(path, "--model", model) as pid:
        assert _echo(path) == b"ping"
        baseline = _fd_count(pid)
        code = (
            "import socket,sys,os,signal\n"
            "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(b'half of a req'); os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        for _ in range(5):
            victim = subprocess.run([sys.executable, "-c", code, str(path)], timeout=30)
            assert victim.returncode == -signal.SIGKILL
        assert _echo(path, b"still serving") == b"still serving"
        assert _settle(lambda: _fd_count(pid), baseline) == baseline
        assert _settle(lambda: _children(pid), []) == []  # no zombies, no stuck children


@pytest.mark.parametrize("model", MODELS)
def test_client_that_never_reads_does_not_block_others(sockdir: Path, model: str) -> None:
    path = sockdir / "r.sock"
    with cli_server(path, "--model", model):
        hog = afunix.connect(path)
        try:
            hog.setblocking(False)
            sent = 0
            chunk = b"x" * 65536
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # fill both directions' buffers
                try:
                    sent += hog.send(chunk)
                except BlockingIOError:
                    break
            assert sent > 0
            t0 = time.monotonic()
            for i in range(5):
                assert _echo(path, f"other {i}".encode()) == f"other {i}".encode()
            assert time.monotonic() - t0 < 5
        finally:
            hog.close()


def test_server_killed_with_sigkill_restarts_over_its_stale_file(sockdir: Path) -> None:
    path = sockdir / "crash.sock"
    proc = subprocess.Popen(afunix_cmd("serve", str(path)), stderr=subprocess.DEVNULL)
    wait_for_path(path)
    assert _echo(path) == b"ping"
    proc.kill()
    proc.wait()
    assert path.exists()  # the crash left the file behind
    with pytest.raises(afunix.NothingListening):
        afunix.connect(path)
    # A client retrying while the server comes back gets through.
    second = subprocess.Popen(afunix_cmd("serve", str(path)), stderr=subprocess.DEVNULL)
    try:
        with afunix.connect(path, retries=40, backoff=0.05) as c:
            c.sendall(b"back")
            assert c.recv(10) == b"back"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
    assert not path.exists()


@pytest.mark.parametrize("model", ["async", "thread"])
def test_descriptor_exhaustion_recovers(sockdir: Path, model: str) -> None:
    """With RLIMIT_NOFILE just above its needs, a flood of clients does not kill the server."""
    path = sockdir / "x.sock"
    with cli_server(path, "--model", model, limit_nofile=48) as pid:
        assert _echo(path) == b"ping"
        baseline = _fd_count(pid)
        flood = []
        try:
            for _ in range(80):  # more connections than the server has descriptors
                try:
                    flood.append(afunix.connect(path, timeout=0.2))
                except afunix.ListenQueueFull:
                    break
            time.sleep(0.3)
        finally:
            for s in flood:
                s.close()
        assert _echo(path, b"served after the flood") == b"served after the flood"
        assert _settle(lambda: _fd_count(pid), baseline) == baseline
    assert "Too many open files" in (sockdir / "serve.log").read_text()  # it did run out
