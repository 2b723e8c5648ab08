"""``afunix tour``: every section of the seed, run live and narrated (``make demo``).

Each section is a function taking a :class:`Tour` (a private temporary
directory and a narrator) and is registered with :func:`section`. Later
chapters add their sections in their own modules, listed in
:data:`SECTION_MODULES`; they are imported (and so registered) in order.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import (
    Address,
    AddressError,
    AddressInUse,
    ListenQueueFull,
    NoReplyAddress,
    NothingListening,
    connect,
    listen,
)
from ..server import Server, async_echo, datagram_echo, echo

#: Modules that add sections after the foundation's (imported for their ``@section``s).
SECTION_MODULES: list[str] = [
    "afunix.cli.tour_fds",
    "afunix.cli.tour_creds",
    "afunix.cli.tour_broker",
]


@dataclass
class Tour:
    """What a section gets: a private directory and a way to narrate."""

    dir: str
    out: Callable[[str], None] = print
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.out(text)

    def show(self, label: str, value: object) -> None:
        self.out(f"    {label}: {value}")

    def check(self, what: str, ok: bool) -> None:
        """Record and print a claim the section verified live."""
        self.checks.append((what, ok))
        self.out(f"    [{'ok' if ok else 'FAILED'}] {what}")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @contextlib.contextmanager
    def cli_server(
        self, *args: str, wait_for: str | None = None
    ) -> Iterator[subprocess.Popen[bytes]]:
        """Run ``afunix serve ...`` as a child process for the section's duration."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "afunix", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if wait_for is not None:
                deadline = time.monotonic() + 10
                while not os.path.exists(wait_for):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise RuntimeError(f"afunix serve did not start: {err.strip()}")
                    time.sleep(0.01)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


@dataclass(frozen=True)
class Section:
    number: str
    title: str
    run: Callable[[Tour], None]


SECTIONS: list[Section] = []


def section(number: str, title: str) -> Callable[[Callable[[Tour], None]], Callable[[Tour], None]]:
    """Register a tour section (decorator)."""

    def deco(fn: Callable[[Tour], None]) -> Callable[[Tour], None]:
        SECTIONS.append(Section(number, title, fn))
        return fn

    return deco


# --------------------------------------------------------------------- 15.2
@section("15.2", "Unix domain socket addresses: bind and getsockname")
def _addresses(t: Tour) -> None:
    path = t.path("ux.sock")
    t.say("The book's unixbind binds a stream socket to a path and prints getsockname():")
    with listen(path) as sock:
        addr = sock.address
        t.say(f"    bound name = {addr}, returned len = {addr.sockaddr_len}")
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        umask = os.umask(0)
        os.umask(umask)
        t.show("socket file mode", f"{mode:04o} (0777 & ~umask {umask:04o}, UNP 15.4 point 1)")
        t.check("mode is 0777 masked by the umask", mode == 0o777 & ~umask)
        t.check(
            "returned len = offsetof(sun_path) + strlen(path) + 1",
            addr.sockaddr_len == 2 + len(os.fsencode(path)) + 1,
        )
    t.check("the socket file is removed on close", not os.path.exists(path))
    long_path = "/tmp/" + "x" * 120
    try:
        Address.parse(long_path)
    except AddressError as exc:
        t.say("A path longer than sun_path is an error, never silently truncated:")
        t.show("error", exc)
        t.check("too-long path refused with ENAMETOOLONG", exc.errno == errno.ENAMETOOLONG)
    name = f"@afunix-tour-{os.getpid()}"
    with listen(name) as sock:
        t.say("Linux abstract names (@name) have no file in the filesystem:")
        t.show("bound name", sock.address)
        t.check("no file appears for an abstract name", not os.path.exists(name))
    with listen("") as sock:
        t.say("Binding the empty (unnamed) address asks Linux to autobind a unique name:")
        t.show("autobound name", sock.address)


# --------------------------------------------------------------------- 15.3
@section("15.3", "socketpair: a channel between a parent and its child")
def _socketpair(t: Tour) -> None:
    from .pair import run_pair

    t.say("socketpair() gives two connected unnamed sockets; after fork each process")
    t.say("keeps one end. Messages go both ways (the seed's example, 2 rounds):")
    sys.stdout.flush()
    code = run_pair(2, "stream", write=lambda line: t.say("    " + line))
    t.check("child exited cleanly after the parent closed its end", code == 0)


# --------------------------------------------------------------------- 15.4
@section("15.4", "The rules of Unix domain sockets")
def _rules(t: Tour) -> None:
    old = os.getcwd()
    os.chdir(t.dir)
    try:
        rel = Address.parse("rel.sock")
    finally:
        os.chdir(old)
    t.say("Point 2: a relative path depends on the working directory, so afunix")
    t.say("resolves it once, at parse time:")
    t.show("'rel.sock' in the tour directory becomes", rel)
    t.check("relative path made absolute", str(rel) == t.path("rel.sock"))

    path = t.path("stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays: a "crashed" server
    t.say("A server that dies leaves its socket file behind. Connecting to it:")
    try:
        connect(path).close()
    except NothingListening as exc:
        t.show("error", exc)
        t.check("a stale file is reported as 'nothing listening'", True)
    with listen(path) as live:
        t.check("listen() replaced the stale socket file", live.address == Address.parse(path))
        try:
            listen(path)
        except AddressInUse as exc:
            t.say("A second server on a live path is refused, naming the holder:")
            t.show("error", exc)
            t.check("a live socket is never unlinked", os.path.exists(path))

    t.say("Point 6: a full listen queue. The book (BSD) says ECONNREFUSED at once;")
    t.say("Linux makes a blocking connect wait. afunix turns the wait into an error:")
    qpath = t.path("queue.sock")
    with listen(qpath, backlog=1):
        held = []
        try:
            for _ in range(4):
                held.append(connect(qpath, timeout=0.2))
        except ListenQueueFull as exc:
            t.show("error", exc)
            t.check(f"queue full after {len(held)} connections", exc.errno == errno.EAGAIN)
        finally:
            for s in held:
                s.close()

    t.say("Point 8: an unbound datagram socket cannot get replies. Waiting for one")
    t.say("would hang forever; afunix says why instead:")
    dpath = t.path("dg.sock")
    with listen(dpath, "dgram"), connect(dpath, "dgram", bind=None) as client:
        client.send(b"ping")
        try:
            client.recv(100)
        except NoReplyAddress as exc:
            t.show("error", exc)
            t.check("no hang: a clear error", True)


# --------------------------------------------------------------------- 15.5
@section("15.5", "A stream server, fork per connection, SIGCHLD reaped")
def _stream(t: Tour) -> None:
    path = t.path("echo.sock")
    t.say("`afunix serve PATH --model fork` forks a child per client (the book's server);")
    t.say("three clients connect at once and each gets its own echo:")
    with t.cli_server(path, "--model", "fork", wait_for=path):
        results: dict[int, bytes] = {}

        def client(i: int) -> None:
            with connect(path, timeout=5) as c:
                c.sendall(f"hello world {i}\n".encode())
                c.shutdown(socket.SHUT_WR)
                results[i] = b"".join(iter(lambda: c.recv(100), b""))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        for i in sorted(results):
            t.show(f"client {i} got", results[i])
        t.check(
            "every client got its own echo",
            all(results.get(i) == f"hello world {i}\n".encode() for i in range(3)),
        )
    t.check("the server removed its socket file on SIGTERM", not os.path.exists(path))
    t.say("The same server runs in a thread per client or in one asyncio loop:")
    for model, handler in (("thread", echo), ("asyncio", async_echo)):
        with Server(t.path(f"{model}.sock"), handler, model=model) as srv:  # type: ignore[arg-type]
            srv.start()
            with connect(srv.address) as c:
                c.sendall(b"ping")
                got = c.recv(10)
                t.show(f"model={model} echo", got)
                t.check(f"model={model} echoes", got == b"ping")


# --------------------------------------------------------------------- 15.6
@section("15.6", "A datagram server and a client that binds a path for replies")
def _datagram(t: Tour) -> None:
    path = t.path("dgram.sock")
    with Server(path, datagram_echo, type="dgram", model="thread") as srv:
        srv.start()
        with connect(path, "dgram") as c:
            t.say("The client binds a private, unique path so that the reply can reach it:")
            t.show("client address", c.address)
            c.send(b"datagram hello")
            t.show("reply", c.recv(100))
            client_path = c.address.filesystem_path
        t.check(
            "the client's path is removed when it closes",
            client_path is not None and not os.path.exists(client_path),
        )


# ------------------------------------------------------------------ runner
def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "tour",
        help="run every section of UNP chapter 15 live, narrated",
        description=(
            "Run each section of the chapter live in a private temporary directory and "
            "say what happened. Each claim is checked; the exit status is non-zero if "
            "any check failed."
        ),
    )
    p.add_argument("--section", action="append", help="run only these sections (e.g. 15.4)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.set_defaults(func=cmd_tour)


def load_sections() -> list[Section]:
    for name in SECTION_MODULES:
        importlib.import_module(name)
    return SECTIONS


def cmd_tour(args: argparse.Namespace) -> int:
    sections = load_sections()
    if args.list:
        for s in sections:
            print(f"{s.number}  {s.title}")
        return 0
    chosen = [s for s in sections if not args.section or s.number in args.section]
    if not chosen:
        raise ValueError(f"no such section: {', '.join(args.section)} (see afunix tour --list)")
    tmp = tempfile.mkdtemp(prefix="afx-tour-", dir="/tmp")
    os.chmod(tmp, 0o755)
    tour = Tour(tmp)
    try:
        for s in chosen:
            print(f"\n== {s.number} {s.title} ==", flush=True)
            try:
                s.run(tour)
            except Exception as exc:  # a section failing must not hide the others
                tour.check(f"section {s.number} ran without error ({exc!r})", False)
            sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [w for w, ok in tour.checks if not ok]
    print(f"\n{len(tour.checks) - len(failed)} checks passed, {len(failed)} failed.")
    return 1 if failed else 0
