"""Two processes joined by one transport: the scaffolding every Python row shares.

A measurement runs in a process of its own (forked by the worker): it builds
the transport, forks the *peer*, plays the client side itself and times it,
then reaps the peer. Nothing here is timed; the loops that are live in
:mod:`._drivers`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

#: A measurement never runs longer than this (seconds); then SIGALRM ends it.
ALARM = 600

#: Environment variables that tell the C baseline which CPU it and its peer take.
CPU_ENV = "AFUNIX_BENCH_CPU"
PEER_CPU_ENV = "AFUNIX_BENCH_PEER_CPU"


@dataclass(frozen=True)
class Job:
    """One measurement: ``count`` timed iterations after ``warmup`` untimed ones."""

    impl: str
    case: str
    transport: str
    size: int
    count: int
    warmup: int
    sockdir: str
    cpu: int = -1  # pin the measurement (both ends, unless peer_cpu) to this CPU; -1: don't
    peer_cpu: int = -1  # pin the peer to this CPU (``--pin split``), -1: leave it

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**data)

    def path(self, tag: str) -> str:
        """A socket path in the run's directory, unique to this process."""
        return os.path.join(self.sockdir, f"{tag}{os.getpid()}.sock")


class PipeEnd:
    """One side of a pair of pipes, with the two socket methods the rows use."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def recv(self, n: int) -> bytes:
        return os.read(self.rfd, n)

    def close(self) -> None:
        """Close both descriptors; closing twice is harmless."""
        fds, self.rfd, self.wfd = (self.rfd, self.wfd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


End = socket.socket | PipeEnd

#: The transports that keep message boundaries (one recv, one message).
RECORD_TRANSPORTS = frozenset({"seqpacket", "dgram"})
_PAIR_TYPES = {
    "unix": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


#: A throwaway self-signed certificate (EC P-256, for ``127.0.0.1`` and ``localhost``,
#: valid until 2126) and its key, so that the ``tls`` rows need no CA tooling: both
#: ends show it and trust it (mutual TLS, verified as any certificate). Its key is
#: public: never use it for anything but this loopback benchmark.
BENCH_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg0XkvQz5imtnVZwcb
0DTQku0MDfzah3T/+zf78UgXMhehRANCAATdxkyS2fPpvGMBLjK1FYbaakAh7LsV
X3Dab+0xWZybxBW1QkfeGQtecUt+s5QRGm32yC+y8unGKQCd7HNCqM3q
-----END PRIVATE KEY-----
-----BEGIN CERTIFICATE-----
MIIB1TCCAXqgAwIBAgIUeagkNbhLxCUE0e7JCig/9Wg2ezYwCgYIKoZIzj0EAwIw
MjEwMC4GA1UEAwwnYWZ1bml4LWJlbmNoICh0aHJvd2F3YXksIGxvb3BiYWNrIG9u
bHkpMCAXDTI2MTIwNTEwMzY1NFoYDzIxMjYxMTExMTAzNjU0WjAyMTAwLgYDVQQD
DCdhZnVuaXgtYmVuY2ggKHRocm93YXdheSwgbG9vcGJhY2sgb25seSkwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAATdxkyS2fPpvGMBLjK1FYbaakAh7LsVX3Dab+0x
WZybxBW1QkfeGQtecUt+s5QRGm32yC+y8unGKQCd7HNCqM3qo2wwajAdBgNVHQ4E
FgQU01lMnqoOyAdcHWMXdsalK0nxo6EwHwYDVR0jBBgwFoAU01lMnqoOyAdcHWMX
dsalK0nxo6EwGgYDVR0RBBMwEYIJbG9jYWxob3N0hwR/AAABMAwGA1UdEwEB/wQC
MAAwCgYIKoZIzj0EAwIDSQAwRgIhAJrrgVSPT67QQuDE9BsRcRCEu8KmIil8+xF2
H8nJVch7AiEA0nWm6OD3nn/Zi/ikLkxTzxXYu56tEq8nwS/597yCEl0=
-----END CERTIFICATE-----
"""


def tls_context(job: Job, *, server: bool) -> Any:
    """The ``ssl.SSLContext`` of one end of a ``tls`` row: :data:`BENCH_PEM` as its
    certificate and its only trusted CA; a server requires the client's (mutual TLS)."""
    import ssl  # here: only the tls rows need it

    cert = BENCH_PEM[BENCH_PEM.index("-----BEGIN CERTIFICATE-----") :]
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cadata=cert)
    path = job.path("cert") + ".pem"  # load_cert_chain reads files only
    with open(path, "w") as f:
        f.write(BENCH_PEM)
    try:
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Listener:
    """A listening socket on a pathname, abstract name or TCP loopback port (also for
    ``tls``: the rows shake hands on the sockets it gives)."""

    def __init__(self, transport: str, job: Job) -> None:
        self.transport = transport
        self.path: str | None = None
        if transport in ("tcp", "tls"):
            self.family = socket.AF_INET
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.address: Any = self.sock.getsockname()
        elif transport in ("unix-path", "abstract"):
            self.family = socket.AF_UNIX
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if transport == "abstract":
                self.address = f"\0afunix-bench-{os.getpid()}"
            else:
                self.path = self.address = job.path("l")
            self.sock.bind(self.address)
        else:
            raise ValueError(f"no listener for transport {transport!r}")
        self.sock.listen(128)

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        return _nodelay(conn) if self.transport in ("tcp", "tls") else conn

    def connect(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        return _nodelay(sock) if self.transport in ("tcp", "tls") else sock

    def close(self) -> None:
        self.sock.close()

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def pin_peer(job: Job) -> None:
    if job.peer_cpu >= 0:
        os.sched_setaffinity(0, {job.peer_cpu})


def _peer_main(fn: Callable[[], None], job: Job) -> None:
    """Run the peer's side in the forked child and never return."""
    code = 1
    try:
        signal.alarm(ALARM)
        pin_peer(job)
        fn()
        code = 0
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


@contextlib.contextmanager
def peer(fn: Callable[[], None], job: Job) -> Iterator[int]:
    """Fork a peer that runs ``fn``; on leaving, reap it and check it succeeded.

    If the client side fails, the peer is killed rather than waited for (it
    may be blocked on a socket the client will never use again).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _peer_main(fn, job)
    ok = False
    try:
        yield pid
        ok = True
    finally:
        status = _reap(pid, kill=not ok)
        if ok and status != 0:
            raise RuntimeError(f"the peer process failed (wait status {status:#x})")


def _reap(pid: int, *, kill: bool) -> int:
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, 0 if kill else os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            kill = True
        time.sleep(0.001)


def run_pair(
    job: Job,
    server: Callable[[End], None],
    client: Callable[[End], dict[str, int]],
) -> dict[str, int]:
    """Join two processes by ``job.transport``; run ``server`` in the peer, time ``client``."""
    transport = job.transport
    if transport in _PAIR_TYPES:
        a, b = socket.socketpair(socket.AF_UNIX, _PAIR_TYPES[transport])

        def serve_pair() -> None:
            a.close()
            with b:
                server(b)

        with a, peer(serve_pair, job):
            b.close()
            return client(a)
    if transport == "pipe":
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        mine, theirs = PipeEnd(up_r, down_w), PipeEnd(down_r, up_w)

        def serve_pipe() -> None:
            mine.close()
            try:
                server(theirs)
            finally:
                theirs.close()

        try:
            with peer(serve_pipe, job):
                theirs.close()
                return client(mine)
        finally:
            mine.close()
            theirs.close()
    listener = Listener(transport, job)

    def serve_listener() -> None:
        conn = listener.accept()
        listener.close()
        with conn:
            server(conn)

    try:
        with peer(serve_listener, job):
            sock = listener.connect()
            listener.close()
            listener.unlink()
            with sock:
                return client(sock)
    finally:
        listener.close()
        listener.unlink()
