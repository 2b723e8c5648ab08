"""Shared fixtures: short socket directories, descriptor-leak checks, C peers.

Every test runs under :func:`no_fd_leak` (autouse): the set of open
descriptors of the test process must be the same after the test as before.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
C_DIR = HERE / "c"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def is_open(fd: int) -> bool:
    """Whether descriptor number *fd* is open in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def newfd() -> Iterator[Callable[[], int]]:
    """Make descriptors (``/dev/null``) for byte-table tests; those still open are closed."""
    made: list[int] = []

    def make() -> int:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        if is_open(fd):
            os.close(fd)


@pytest.fixture
def afunix_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has an ``afunix`` running this checkout."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "afunix"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m afunix "$@"\n')
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("_ARC")}
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listdir itself
    return fds


@contextlib.contextmanager
def fd_baseline() -> Iterator[None]:
    """The descriptor table must be the same after the block as before it (for checks
    inside a test, per round or per hypothesis example)."""
    before = open_fds()
    yield
    after = open_fds()
    assert after == before, {fd: t for fd, t in after.items() if before.get(fd) != t}


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves descriptors open."""
    gc.collect()
    before = open_fds()
    yield
    if request.node.get_closest_marker("allow_fd_leak"):
        return
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        after = open_fds()
        leaked = {fd: t for fd, t in after.items() if fd not in before or before[fd] != t}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # give server threads a moment to close their sockets
    assert not leaked, f"descriptors leaked: {leaked}"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for socket files (``sun_path`` holds 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="afx", dir="/tmp"))
    os.chmod(d, 0o755)  # so that peers run as nobody can reach sockets inside
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cbuild(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Compile ``tests/c/NAME.c`` with gcc once per session; returns the binary path."""
    out = tmp_path_factory.mktemp("cbin")
    os.chmod(out, 0o755)
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            if shutil.which("gcc") is None:
                pytest.fail("gcc is required for the C peer tests (apt-get install gcc)")
            exe = out / name
            subprocess.run(
                ["gcc", "-O1", "-Wall", "-Werror", "-o", str(exe), str(C_DIR / f"{name}.c")],
                check=True,
                timeout=60,
            )
            built[name] = exe
        return built[name]

    return build


def afunix_cmd(*args: str) -> list[str]:
    """The ``afunix`` command of this environment, as an argv."""
    return [sys.executable, "-m", "afunix", *args]


def wait_until(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll *pred* every 20 ms until it is true (then True) or *timeout* passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def wait_for_path(path: Path | str, timeout: float = 10.0) -> None:
    """Wait until *path* exists; when a stream or seqpacket socket is bound there, also
    until it listens (its file appears at ``bind``, before ``listen``, and a ``connect``
    in between is refused: this race failed a loaded run). Datagram sockets and other
    files count once they exist."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or _bound_not_listening(path):
        if time.monotonic() > deadline:
            if os.path.exists(path):
                return  # (bound and never listening: the caller's connect says so)
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def _bound_not_listening(path: Path | str) -> bool:
    """A stream/seqpacket socket is bound at *path* and none there listens yet
    (``/proc/net/unix``: type ``0001``/``0005``, flag ``__SO_ACCEPTCON``)."""
    waiting = False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) < 8 or fields[7] != str(path):
                continue
            if int(fields[3], 16) & 0x10000 or fields[4] == "0002":
                return False  # listening, or a datagram socket
            waiting = True
    return waiting


def listening_at(path: Path | str) -> bool:
    """Whether a socket listens at *path* (``/proc/net/unix``: ``__SO_ACCEPTCON``), found
    without connecting, so a server's connection counts stay untouched."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_for_listener(path: Path | str, timeout: float = 10.0) -> None:
    """Wait until a stream socket at *path* listens: its file appears at ``bind``,
    before ``listen``, and a ``connect`` in between is refused."""
    if not wait_until(lambda: listening_at(path), timeout):
        raise TimeoutError(f"nothing listened at {path} within {timeout}s")


@contextlib.contextmanager
def background(
    argv: list[str], log: Path, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run *argv* (stderr to *log*) until the block ends; wait until *ready()*.

    At the end the process gets SIGTERM (if still running) and is reaped.
    """
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 10
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[:4]} did not start: {log.read_text(errors='replace')}")
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            proc.kill()
            proc.wait()


def serving(
    sockdir: Path, address: str, *opts: str
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``afunix serve ADDRESS OPTS`` in the background, logging to ``sockdir/serve.log``;
    ready once it says it is serving."""
    log = sockdir / "serve.log"
    return background(
        afunix_cmd("serve", address, *opts), log, lambda: b"serving" in log.read_bytes()
    )


#: A stream client (``python -c``, argv[1] the socket path) that says whether it was
#: served or refused; run it as nobody (:data:`NOBODY`) to test a peer policy.
NOBODY_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"let me in")
    got = s.recv(100)
except (ConnectionResetError, BrokenPipeError):  # closed before or after it wrote
    got = b""
print("refused" if got == b"" else f"served {got!r}")
"""


def simple_payload(item: object) -> bytes:
    """The payload of a plain frame that ``StreamDecoder.next_fast`` gave: a
    ``Message`` (made by the core's ``scan_plain``) or its ``bytes``."""
    if isinstance(item, bytes):
        return item
    data = item.data  # type: ignore[attr-defined]
    assert isinstance(data, bytes) and not item.fds  # type: ignore[attr-defined]
    return data


@pytest.fixture(params=["asyncio", "trio"])
def runtime(request: pytest.FixtureRequest) -> str:
    """The event loop a test runs its ``async`` part under (with :func:`run_under`)."""
    return request.param  # type: ignore[no-any-return]


def run_under(runtime: str, main: Callable[[], Awaitable[None]], limit: float = 30.0) -> None:
    """Run ``main()`` under *runtime* (``"asyncio"`` or ``"trio"``, through anyio), failing
    it after *limit* seconds."""
    import anyio

    async def bounded() -> None:
        with anyio.fail_after(limit):
            await main()

    anyio.run(bounded, backend=runtime)
