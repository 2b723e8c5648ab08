"""``afunix load ADDR``: drive an echo server with many clients; report latency and errors.

Two modes:

* ``--clients N --duration S``: N busy clients, each on its own connection, send a
  request of ``--size`` bytes and read its echo, over and over, for S seconds.
  Each client reads the echo while it is still writing the request, so requests
  larger than the socket buffers work. The run ends after S seconds whatever the
  server does: a request still in flight then is counted as ``unfinished``, not
  as an error. Reports requests per second, latency percentiles, and every error
  by errno; the exit status is 1 when there were errors or no request completed.
* ``--hold N``: open N connections at once, echo one message over each, keep them
  all open for ``--duration`` seconds, then close them. With ``--server-pid`` it
  reports the server's memory per connection (``VmRSS`` from ``/proc``). Opening
  the connections, and checking them at the end, each take at most ``--timeout``
  seconds; whatever is not done by then counts as an ``ETIMEDOUT`` error.

The client raises its own descriptor limit (``RLIMIT_NOFILE``) to the hard limit
when N needs it; the server needs the same (``afunix serve --nofile N``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .. import Address
from ._common import (
    add_json_option,
    address_arg,
    count_arg,
    emit_json,
    progress_console,
    seconds_arg,
)

MAX_SIZE = 64 << 20
"""The largest ``--size``: 64 MiB (the client holds the request and a buffer for its echo)."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "load",
        help="load-test an echo server: latency percentiles, errors, connections held",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="an echo server")
    p.add_argument("--clients", type=count_arg(), default=100, help="busy clients (default 100)")
    p.add_argument(
        "--duration",
        type=seconds_arg(),
        default=5.0,
        help="seconds (default 5); the busy run ends then, whatever the server does",
    )
    p.add_argument(
        "--size",
        type=count_arg(1, MAX_SIZE),
        default=64,
        help=f"request size in bytes (default 64, at most {MAX_SIZE})",
    )
    p.add_argument("--hold", type=count_arg(), metavar="N", help="hold N connections open instead")
    p.add_argument(
        "--timeout",
        type=seconds_arg(),
        default=30.0,
        help="with --hold: seconds for opening all connections, and again for checking "
        "them at the end (default 30)",
    )
    p.add_argument(
        "--server-pid",
        type=count_arg(what="a process id"),
        help="report this server's memory (with --hold)",
    )
    add_json_option(p, "the report")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress display (shown on standard error only when it is a terminal)",
    )
    p.set_defaults(func=cmd_load)


@dataclass
class Report:
    mode: str
    clients: int
    duration_s: float
    requests: int = 0
    #: Requests still in flight when the run's deadline came (busy mode).
    unfinished: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    held: int = 0
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None

    def percentile(self, q: float) -> float:
        """Latency percentile in microseconds (nearest rank)."""
        if not self.latencies_ns:
            return float("nan")
        data = sorted(self.latencies_ns)
        k = min(len(data) - 1, max(0, round(q / 100 * len(data) + 0.5) - 1))
        return data[k] / 1000

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "clients": self.clients,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "errors": dict(self.errors),
        }
        if self.mode == "busy":
            out["unfinished"] = self.unfinished
            rate = self.requests / self.duration_s if self.duration_s > 0 else None
            out["requests_per_s"] = None if rate is None else round(rate, 1)
            # null, not NaN (which is not JSON), when no request completed
            out["latency_us"] = {
                f"p{q:g}": round(self.percentile(q), 1) if self.latencies_ns else None
                for q in (50, 90, 99, 99.9)
            }
            out["latency_us"]["max"] = round(max(self.latencies_ns, default=0) / 1000, 1)
        else:
            out["held"] = self.held
            if self.rss_before_kib is not None and self.rss_after_kib is not None:
                delta = self.rss_after_kib - self.rss_before_kib
                out["server_rss_kib"] = {"before": self.rss_before_kib, "after": self.rss_after_kib}
                out["server_kib_per_connection"] = round(delta / max(self.held, 1), 2)
        return out


def raise_nofile(needed: int) -> int:
    """Raise the soft descriptor limit to at least *needed* (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _errname(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def _open(addr: Address) -> socket.socket:
    """A non-blocking connection to *addr*; the caller bounds the wait (a timeout scope)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        if addr.is_unix:
            # A full listen queue makes a non-blocking AF_UNIX connect fail with
            # EAGAIN: nothing is in progress (unlike TCP's EINPROGRESS), so
            # asyncio's sock_connect would wrongly report success. Retry instead.
            delay = 0.0005
            while True:
                try:
                    sock.connect(addr.sockaddr)
                    break
                except BlockingIOError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.02)
        else:
            await loop.sock_connect(sock, addr.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _echo_once(sock: socket.socket, payload: bytes, buf: memoryview | None = None) -> None:
    """Send *payload* and read its echo, reading while still writing.

    An echo server writes back as it reads. A client that wrote the whole
    request before reading would, once the request outgrows the two socket
    buffers, wait forever for a server that waits for it (both blocked in
    ``send``). So the part of the request that does not go out at once is
    sent by a task of its own while this coroutine reads. The caller bounds
    the whole exchange with a deadline (a timeout scope); on cancellation the
    sending task is cancelled too.
    """
    loop = asyncio.get_running_loop()
    size = len(payload)
    if buf is None or len(buf) < size:
        buf = memoryview(bytearray(size))
    try:
        sent = sock.send(payload)
    except BlockingIOError:
        sent = 0
    sender = (
        loop.create_task(loop.sock_sendall(sock, memoryview(payload)[sent:]))
        if sent < size
        else None
    )
    try:
        got = 0
        while got < size:
            n = await loop.sock_recv_into(sock, buf[got:size])
            if not n:
                raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
            got += n
        if sender is not None:
            await sender
    finally:
        if sender is not None:
            # Let the task drop its writer callback before the socket is closed,
            # and take its exception (a broken pipe) when reading failed first.
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def _busy_client(addr: Address, payload: bytes, deadline: float, report: Report) -> None:
    """Echo *payload* over one connection until *deadline* (event loop time)."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    buf = memoryview(bytearray(len(payload)))
    in_flight = False
    try:
        async with asyncio.timeout_at(deadline):
            sock = await _open(addr)
            while loop.time() < deadline:
                t0 = time.perf_counter_ns()
                in_flight = True
                await _echo_once(sock, payload, buf)
                in_flight = False
                report.latencies_ns.append(time.perf_counter_ns() - t0)
                report.requests += 1
    except OSError as exc:
        if isinstance(exc, TimeoutError) and exc.errno is None:  # the run's deadline
            report.unfinished += in_flight
        else:
            report.errors[_errname(exc)] += 1
    finally:
        if sock is not None:
            sock.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(errno.ESRCH, f"no VmRSS for pid {pid}")


async def _progress(label: str, seconds: float, enabled: bool) -> None:
    """Wait *seconds*, with a progress bar on standard error when it is a terminal."""
    console = progress_console() if enabled else None
    if console is None:
        await asyncio.sleep(seconds)
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=seconds)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            progress.update(task, completed=elapsed)
            await asyncio.sleep(0.1)


async def run_busy(
    addr: Address, clients: int, duration: float, size: int, progress: bool
) -> Report:
    report = Report("busy", clients, duration)
    payload = b"x" * size
    start = time.monotonic()
    deadline = asyncio.get_running_loop().time() + duration
    ticker = asyncio.ensure_future(_progress(f"{clients} clients", duration, progress))
    await asyncio.gather(*(_busy_client(addr, payload, deadline, report) for _ in range(clients)))
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    report.duration_s = time.monotonic() - start
    return report


async def run_hold(
    addr: Address,
    count: int,
    duration: float,
    server_pid: int | None,
    progress: bool,
    *,
    timeout: float = 30.0,
) -> Report:
    report = Report("hold", count, duration)
    if server_pid is not None:
        report.rss_before_kib = _rss_kib(server_pid)
    socks: list[socket.socket] = []
    sem = asyncio.Semaphore(256)  # do not overrun the listen queue all at once

    async def one() -> None:
        async with sem:
            try:
                sock = await _open(addr)
            except OSError as exc:
                report.errors[_errname(exc)] += 1
                return
            try:
                await _echo_once(sock, b"held\n")
            except OSError as exc:
                sock.close()
                report.errors[_errname(exc)] += 1
                return
            except BaseException:  # cut off by --timeout
                sock.close()
                raise
            socks.append(sock)  # held: connected and answering
            report.requests += 1

    start = time.monotonic()
    try:
        await _bounded(report, timeout, [one() for _ in range(count)])
        report.held = len(socks)
        await _progress(f"holding {report.held} connections", duration, progress)
        if server_pid is not None:
            report.rss_after_kib = _rss_kib(server_pid)
        # Every held connection still works at the end.
        await _bounded(report, timeout, [_checked(report, s) for s in socks])
    finally:
        for s in socks:
            s.close()
    report.duration_s = time.monotonic() - start
    return report


async def _checked(report: Report, sock: socket.socket) -> None:
    try:
        await _echo_once(sock, b"ok\n")
    except OSError as exc:
        report.errors[_errname(exc)] += 1


async def _bounded(report: Report, timeout: float, jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run *jobs* at once for at most *timeout* seconds; each one cut off is an ETIMEDOUT error."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if pending:
        report.errors["ETIMEDOUT"] += len(pending)


def cmd_load(args: argparse.Namespace) -> int:
    addr: Address = args.address
    progress = not args.no_progress
    if args.hold is not None:
        raise_nofile(args.hold + 64)
        report = asyncio.run(
            run_hold(
                addr, args.hold, args.duration, args.server_pid, progress, timeout=args.timeout
            )
        )
    else:
        raise_nofile(args.clients + 64)
        report = asyncio.run(run_busy(addr, args.clients, args.duration, args.size, progress))
    data = report.as_dict()
    if args.hold is None and not report.requests and not report.errors:
        print(
            f"afunix: error: no echo came back from {addr.describe()} within "
            f"{args.duration:g}s ({report.unfinished} request(s) in flight at the end): "
            "is it an echo server, and is it accepting?",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        emit_json("load", data)
    else:
        _print_table(data)
    return 1 if report.errors or (args.hold is None and not report.requests) else 0


def _print_table(data: dict[str, Any]) -> None:
    rows = []
    for key, value in data.items():
        shown = (
            ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
            if isinstance(value, dict)
            else str(value)
        )
        rows.append((key.replace("_", " "), shown))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for k, v in rows:
            print(f"{k:>28}: {v}")
        return
    table = Table(title=f"afunix load ({data['mode']})", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
