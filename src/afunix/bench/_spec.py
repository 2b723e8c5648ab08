"""What ``afunix bench`` measures: cases, sizes, transports and implementations.

A *row* is one implementation on one transport; a *cell* is a row measured
for one case and size. The tables here are the whole plan: the harness runs
every cell whose implementation is available, interleaving the rows of one
case and size round by round.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Case:
    """One kind of measurement."""

    name: str
    title: str
    unit: str  # what the figure is: "us", "msg/s", "B/s", "fd/s", "conn/s"
    lower_is_better: bool
    sizes: tuple[int, ...]  # full mode
    quick_sizes: tuple[int, ...]
    first_count: int  # iterations of the first calibration run
    max_count: int


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "rtt", "round-trip latency", "us", True, (1, 64, 4 * KiB), (1, 64, 4 * KiB), 200, 10**6
        ),
        Case("rate", "one-way message rate", "msg/s", False, (64, KiB), (64, KiB), 2000, 10**8),
        Case("bulk", "bulk throughput", "B/s", False, (64 * KiB, MiB), (64 * KiB, MiB), 64, 10**6),
        Case("fdpass", "descriptor passing, streaming", "fd/s", False, (1,), (1,), 1000, 10**7),
        Case("fdpingpong", "descriptor passing, ping-pong", "fd/s", False, (1,), (1,), 200, 10**6),
        Case(
            "large",
            "large payloads",
            "B/s",
            False,
            (16 * MiB, 256 * MiB),
            (4 * MiB, 32 * MiB),
            1,
            10**4,
        ),
        Case("connect", "connection setup", "conn/s", False, (0,), (0,), 200, 10**6),
    )
}

#: Transports, in table order, with the words the report uses for them.
TRANSPORTS: dict[str, str] = {
    "unix": "unix stream, socketpair",
    "unix-path": "unix stream, pathname",
    "abstract": "unix stream, abstract name",
    "seqpacket": "unix seqpacket, socketpair",
    "dgram": "unix datagram, socketpair",
    "tcp": "TCP loopback, TCP_NODELAY",
    "tls": "TLS over TCP loopback, mutual certificates",
    "pipe": "pipe(2) pair",
    "ipc": "ipc:// (unix stream)",
    "memfd": "sealed memfd over unix stream",
}

#: The same, in a word, for tables and charts.
TRANSPORT_SHORT: dict[str, str] = {
    "unix": "unix-pair",
    "unix-path": "unix-path",
    "abstract": "abstract",
    "seqpacket": "seqpacket",
    "dgram": "dgram",
    "tcp": "tcp",
    "tls": "tls",
    "pipe": "pipe",
    "ipc": "ipc",
    "memfd": "memfd",
}

_ALL_SOCKETS = ("unix", "unix-path", "seqpacket", "dgram", "tcp", "pipe")
_ONE_WAY = ("unix", "seqpacket", "dgram", "tcp", "pipe")
_BULK = ("unix", "tcp", "pipe")
_CONNECT = ("unix-path", "abstract", "tcp")


@dataclass(frozen=True)
class Impl:
    """One implementation: who wrote the code on both ends of the transport."""

    name: str
    label: str
    cases: dict[str, tuple[str, ...]]  # case -> transports
    needs: str = ""  # module that must import, else the rows are skipped with a note
    is_afunix: bool = False


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in (
        Impl(
            "c",
            "C, 1 syscall/msg",
            {
                "rtt": _ALL_SOCKETS,
                "rate": _ONE_WAY,
                "bulk": _BULK,
                "fdpass": ("unix", "seqpacket"),
                "fdpingpong": ("unix",),
                "large": ("unix", "memfd"),
                "connect": _CONNECT,
            },
        ),
        Impl(
            "stdlib",
            "plain stdlib",
            {
                "rtt": (*_ALL_SOCKETS, "tls"),
                "rate": _ONE_WAY,
                "bulk": _BULK,
                "fdpass": ("unix",),
                "fdpingpong": ("unix",),
                "large": ("unix",),
                "connect": _CONNECT,
            },
        ),
        Impl(
            "mp",
            "multiprocessing",
            {
                "rtt": ("unix",),
                "rate": ("unix",),
                "bulk": ("unix",),
                "fdpass": ("unix",),
                "fdpingpong": ("unix",),
                "large": ("unix",),
                "connect": ("unix-path", "tcp"),
            },
        ),
        Impl(
            "zmq",
            "pyzmq",
            {"rtt": ("ipc",), "rate": ("ipc",), "bulk": ("ipc",), "large": ("ipc",)},
            needs="zmq",
        ),
        Impl(
            "asyncio",
            "asyncio streams",
            {
                "rtt": ("unix", "tcp"),
                "rate": ("unix", "tcp"),
                "bulk": ("unix", "tcp"),
                "connect": ("unix-path", "tcp"),
            },
        ),
        Impl(
            "afunix",
            "afunix Channel",
            {
                "rtt": ("unix", "tcp", "tls"),
                "rate": ("unix",),
                "bulk": ("unix",),
                "fdpass": ("unix",),
                "fdpingpong": ("unix",),
                "large": ("unix", "memfd"),
                "connect": ("unix-path",),
            },
            needs="afunix.channel",
            is_afunix=True,
        ),
        Impl(
            "afunix-aio",
            "afunix AsyncChannel",
            {
                "rtt": ("unix",),
                "rate": ("unix",),
                "bulk": ("unix",),
                "fdpass": ("unix",),
                "fdpingpong": ("unix",),
                "large": ("memfd",),
            },
            needs="afunix.aio",
            is_afunix=True,
        ),
    )
}

#: The reference row of each case: the C baseline on a Unix stream socketpair
#: (for connection setup, on a pathname socket).
REFERENCE_TRANSPORT = {"connect": "unix-path"}


def reference_transport(case: str) -> str:
    return REFERENCE_TRANSPORT.get(case, "unix")


def size_label(case: str, size: int) -> str:
    """``64 B``, ``4 KiB``, ``16 MiB``; ``1 fd/msg``; empty for connection setup."""
    if case == "connect":
        return ""
    if case in ("fdpass", "fdpingpong"):
        return f"{size} fd/msg"
    for unit, factor in (("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"
