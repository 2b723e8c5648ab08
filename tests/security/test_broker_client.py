"""The client library: open() semantics, the asyncio variant, threads, timeouts."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afunix.broker import AsyncClient, Broker, Client, load_policy
from afunix.broker.client import BrokerError, mode_to_flags
from tests.security.broker_support import Tree, make_tree

POLICY = """\
version = 1
[limits]
requests_per_second = 100000
burst = 100000
[[rule]]
name = "all"
root = "{root}"
anyone = true
allow = ["read", "write", "create", "list"]
create_mode = 0o644
"""


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[Tree, Broker]]:
    t = make_tree(sockdir, POLICY)
    b = Broker(t.sock, load_policy(t.policy), audit=t.audit).start()
    try:
        yield t, b
    finally:
        b.stop()


def test_open_modes_like_the_builtin(served: tuple[Tree, Broker]) -> None:
    t, _ = served
    with Client(t.sock) as c:
        with c.open(t.root / "pub.txt") as f:
            assert f.read() == b"public\n"
        with c.open(t.root / "pub.txt", "r") as f:
            assert f.read() == "public\n"
        with c.open(t.root / "new.txt", "w") as f:
            f.write("one\n")
        with c.open(t.root / "new.txt", "a") as f:
            f.write("two\n")
        with c.open(t.root / "new.txt", "r+b") as f:
            assert f.read() == b"one\ntwo\n"
        with pytest.raises(FileExistsError):
            c.open(t.root / "new.txt", "x")
        with c.open(t.root / "made.txt", "x") as f:
            f.write("x")
        with c.open(t.root / "new.txt", os.O_WRONLY | os.O_TRUNC) as f:
            f.write(b"3")
        assert (t.root / "new.txt").read_text() == "3"
        assert c.listdir(t.root / "sub") == ["deep.txt"]


def test_errors_are_the_ones_open_raises(served: tuple[Tree, Broker]) -> None:
    t, _ = served
    with Client(t.sock) as c:
        with pytest.raises(FileNotFoundError) as nf:
            c.open(t.root / "missing.txt")
        assert nf.value.filename == str(t.root / "missing.txt")
        with pytest.raises(PermissionError) as pe:
            c.open("/etc/hostname")
        assert pe.value.errno == errno.EACCES and pe.value.filename == "/etc/hostname"
        with pytest.raises(IsADirectoryError):
            c.open(t.root / "sub")
        with pytest.raises(NotADirectoryError):
            c.open_fd(t.root / "pub.txt", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(IsADirectoryError, match="open_fd"):
            c.open(t.root / "sub", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(ValueError, match="embedded null byte"):
            c.open(str(t.root / "pub.txt") + "\0")
        with pytest.raises(OSError) as bad:
            c.open(t.root / "pub.txt", os.O_RDONLY | os.O_PATH)
        assert bad.value.errno == errno.EINVAL and "O_PATH" in str(bad.value)
        with pytest.raises(ValueError, match="invalid mode"):
            c.open(t.root / "pub.txt", "rw")
        # Contradictions are refused by the broker, not just the client.
        with pytest.raises(OSError) as contra:
            c.open_fd(t.root / "pub.txt", os.O_RDONLY | os.O_TRUNC)
        assert contra.value.errno == errno.EINVAL
        assert "read-only with truncate" in contra.value.broker_reason  # type: ignore[attr-defined]
    assert (t.root / "pub.txt").read_text() == "public\n"


def test_relative_paths_are_made_absolute(
    served: tuple[Tree, Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, _ = served
    monkeypatch.chdir(t.root / "sub")
    with Client(t.sock) as c, c.open("../pub.txt") as f:
        assert f.read() == b"public\n"


def test_umask_applies_to_created_files(served: tuple[Tree, Broker]) -> None:
    t, _ = served
    old = os.umask(0o027)
    try:
        with Client(t.sock) as c:
            os.close(c.open_fd(t.root / "u.txt", os.O_WRONLY | os.O_CREAT, 0o666))
    finally:
        os.umask(old)
    assert os.stat(t.root / "u.txt").st_mode & 0o777 == 0o640  # 666 & ~027 & create_mode 644


def test_one_client_shared_by_threads(served: tuple[Tree, Broker]) -> None:
    t, b = served
    errors: list[BaseException] = []
    with Client(t.sock) as c:

        def work() -> None:
            try:
                for _ in range(30):
                    with c.open(t.root / "pub.txt") as f:
                        assert f.read() == b"public\n"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
    assert not errors and b.counts["granted"] == 120


def test_async_client(served: tuple[Tree, Broker]) -> None:
    t, _ = served

    async def main() -> None:
        async with AsyncClient(t.sock) as c:
            with await c.open(t.root / "secret.txt") as f:
                assert f.read() == b"secret\n"
            with await c.open(t.root / "a.txt", "w") as f:
                f.write("async\n")
            assert "a.txt" in await c.listdir(t.root)
            fd = await c.open_fd(t.root / "pub.txt")
            os.close(fd)
            with pytest.raises(FileNotFoundError):
                await c.open(t.root / "nope")
            with pytest.raises(PermissionError):
                await c.open("/etc/hostname")
            # Concurrent requests on one client are serialised, not interleaved.
            files = await asyncio.gather(*(c.open(t.root / "pub.txt") for _ in range(10)))
            for f in files:
                assert f.read() == b"public\n"
                f.close()

    asyncio.run(main())
    assert (t.root / "a.txt").read_text() == "async\n"


def test_async_client_timeout_and_unreachable(sockdir: Path) -> None:
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(sockdir / "mute.sock"))
    mute.listen(1)  # accepts into its queue, never answers

    async def main() -> None:
        async with AsyncClient(sockdir / "mute.sock", timeout=0.3) as c:
            started = time.monotonic()
            with pytest.raises(BrokerError) as info:
                await c.open("/etc/hostname")
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - started < 1
        async with AsyncClient(sockdir / "none.sock") as c:
            with pytest.raises(BrokerError) as gone:
                await c.open("/etc/hostname")
            assert gone.value.errno == errno.ENOENT

    try:
        asyncio.run(main())
    finally:
        mute.close()


def test_sync_client_timeout_and_unreachable(sockdir: Path) -> None:
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(sockdir / "mute.sock"))
    mute.listen(1)
    try:
        with Client(sockdir / "mute.sock", timeout=0.3) as c:
            started = time.monotonic()
            with pytest.raises(BrokerError) as info:
                c.open("/etc/hostname")
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - started < 1
        with pytest.raises(BrokerError) as gone, Client(sockdir / "none.sock") as c:
            c.open("/etc/hostname")
        assert gone.value.errno == errno.ENOENT
    finally:
        mute.close()


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        ("r", os.O_RDONLY),
        ("rb", os.O_RDONLY),
        ("r+", os.O_RDWR),
        ("w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ("w+b", os.O_RDWR | os.O_CREAT | os.O_TRUNC),
        ("a", os.O_WRONLY | os.O_CREAT | os.O_APPEND),
        ("x", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        ("xt", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    ],
)
def test_mode_to_flags(mode: str, flags: int) -> None:
    assert mode_to_flags(mode) == flags


@pytest.mark.parametrize("mode", ["", "rw", "rr", "q", "r+w", "bt"])
def test_mode_to_flags_refuses(mode: str) -> None:
    with pytest.raises(ValueError):
        mode_to_flags(mode)
