"""The timed loops, shared by every synchronous Python row.

Each row supplies ``send``/``recv`` callables written the way that library is
normally used; the loops around them are the same for all, so differences in
the figures come from the rows. Timing uses :func:`time.perf_counter_ns`
(``CLOCK_MONOTONIC``, the clock the C baseline reads).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from ._link import Job

Send = Callable[[bytes], Any]
Recv = Callable[[], Any]
Result = dict[str, int]

ACK = b"k"


def payload(size: int) -> bytes:
    return b"x" * size


def result(elapsed_ns: int, count: int, nbytes: int = 0) -> Result:
    return {"elapsed_ns": elapsed_ns, "count": count, "bytes": nbytes}


def latency_result(stamps: list[int], size: int) -> Result:
    """``stamps[i]`` is the clock after round trip ``i`` (``stamps[0]``: the start)."""
    count = len(stamps) - 1
    samples = sorted(b - a for a, b in itertools.pairwise(stamps))
    out = result(stamps[-1] - stamps[0], count, size * count)
    out["p50_ns"] = samples[(count - 1) // 2]
    out["p99_ns"] = samples[(count - 1) * 99 // 100]
    return out


# ---- round trip -----------------------------------------------------------


def rtt_client(send: Send, recv: Recv, job: Job) -> Result:
    msg = payload(job.size)
    for _ in range(job.warmup):
        send(msg)
        recv()
    clock = time.perf_counter_ns
    stamps = [0] * (job.count + 1)
    stamps[0] = clock()
    for i in range(1, job.count + 1):
        send(msg)
        recv()
        stamps[i] = clock()
    return latency_result(stamps, job.size)


def rtt_server(send: Send, recv: Recv, job: Job) -> None:
    for _ in range(job.warmup + job.count):
        send(recv())


# ---- one way: a burst of messages, then one acknowledgement -----------------


def one_way_client(send: Send, recv: Recv, job: Job) -> Result:
    msg = payload(job.size)
    if job.warmup:
        _burst(send, recv, msg, job.warmup)
    start = time.perf_counter_ns()
    _burst(send, recv, msg, job.count)
    return result(time.perf_counter_ns() - start, job.count, job.size * job.count)


def _burst(send: Send, recv: Recv, msg: bytes, n: int) -> None:
    for _ in range(n):
        send(msg)
    recv()


def one_way_server(send: Send, recv: Recv, job: Job) -> None:
    for n in (job.warmup, job.count):
        if n:
            for _ in range(n):
                recv()
            send(ACK)


# ---- descriptor passing ------------------------------------------------------

SendFd = Callable[[int], Any]
RecvFd = Callable[[], int]


def fd_client(send_fd: SendFd, recv: Recv, job: Job, *, pingpong: bool) -> Result:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if job.warmup:
            _fd_burst(send_fd, recv, fd, job.warmup, pingpong)
        start = time.perf_counter_ns()
        _fd_burst(send_fd, recv, fd, job.count, pingpong)
        return result(time.perf_counter_ns() - start, job.count)
    finally:
        os.close(fd)


def _fd_burst(send_fd: SendFd, recv: Recv, fd: int, n: int, pingpong: bool) -> None:
    if pingpong:
        for _ in range(n):
            send_fd(fd)
            recv()
    else:
        for _ in range(n):
            send_fd(fd)
        recv()


def fd_server(recv_fd: RecvFd, send: Send, job: Job, *, pingpong: bool) -> None:
    close = os.close
    for n in (job.warmup, job.count):
        if not n:
            continue
        if pingpong:
            for _ in range(n):
                close(recv_fd())
                send(ACK)
        else:
            for _ in range(n):
                close(recv_fd())
            send(ACK)


# ---- connection setup ----------------------------------------------------------


def connect_client(connect_once: Callable[[], Any], job: Job) -> Result:
    for _ in range(job.warmup):
        connect_once()
    start = time.perf_counter_ns()
    for _ in range(job.count):
        connect_once()
    return result(time.perf_counter_ns() - start, job.count)


def connect_server(accept_once: Callable[[], Any], job: Job) -> None:
    for _ in range(job.warmup + job.count):
        accept_once()
