"""The measuring process: ``python -m afunix.bench.worker``.

The harness (with its progress display) never measures in its own process.
It starts one worker, a small single-threaded interpreter, and sends it jobs
as JSON lines on stdin; the worker answers each with one JSON line on stdout.
For a Python row it forks a fresh child per measurement (which forks the
peer); for the C baseline it runs the compiled program. A job may pin its
measurement (both ends, or each end) to CPUs; the worker itself is never pinned.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from afunix.lowlevel import CORE

from ._link import ALARM, CPU_ENV, PEER_CPU_ENV, Job

#: The module that implements each Python row.
MODULES = {
    "stdlib": "afunix.bench.impl_stdlib",
    "mp": "afunix.bench.impl_mp",
    "zmq": "afunix.bench.impl_zmq",
    "asyncio": "afunix.bench.impl_asyncio",
    "afunix": "afunix.bench.impl_afunix",
    "afunix-aio": "afunix.bench.impl_afunix_aio",
}


def run_c(job: Job, exe: str) -> dict[str, Any]:
    """Run the C baseline for ``job``; its JSON line is the result."""
    case, transport = job.case, job.transport
    if case == "large" and transport == "memfd":
        case, transport = "large-memfd", "unix"
    env = dict(os.environ)
    if job.cpu >= 0:
        env[CPU_ENV] = str(job.cpu)
    if job.peer_cpu >= 0:
        env[PEER_CPU_ENV] = str(job.peer_cpu)
    argv = [exe, case, transport, str(job.size), str(job.count), str(job.warmup), job.sockdir]
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=ALARM + 30, env=env
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip() or f"exit status {proc.returncode}"}
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def run_python(job: Job) -> dict[str, Any]:
    """Fork a child that runs the row's module for ``job``; return what it reports."""
    module = importlib.import_module(MODULES[job.impl])
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the measuring child
        os.close(rfd)
        os.dup2(2, 1)  # stray prints must not reach the harness's pipe
        code = 1
        try:
            signal.alarm(ALARM)
            if job.cpu >= 0:
                os.sched_setaffinity(0, {job.cpu})  # the peer, forked later, inherits it
            out: dict[str, Any] = module.run(job)
            code = 0
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        with contextlib.suppress(BaseException):
            os.write(wfd, json.dumps(out).encode())
        os._exit(code)
    os.close(wfd)
    chunks = []
    try:
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        how = (
            f"signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exit status {os.waitstatus_to_exitcode(status)}"
        )
        return {"error": f"the measuring process died ({how})"}
    data: dict[str, Any] = json.loads(b"".join(chunks))
    data["core"] = CORE  # the harness checks that it is its own
    return data


def run_job(job: Job, exe: str | None) -> dict[str, Any]:
    if job.impl == "c":
        if exe is None:
            return {"error": "no C baseline binary"}
        return run_c(job, exe)
    return run_python(job)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afunix.bench.worker")
    parser.add_argument("--baseline", help="the compiled C baseline")
    args = parser.parse_args(argv)
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = Job.from_json(json.loads(line))
        try:
            data = run_job(job, args.baseline)
        except Exception as exc:
            data = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out.write(json.dumps(data) + "\n")
        out.flush()
    return 0


def core_env() -> dict[str, str]:
    """This environment, with ``AFUNIX_PURE_PYTHON`` saying to run this process's core.

    The core is chosen at import from the environment, which may have changed since
    (or the variable may say ``0``): the worker must measure the core the report names.
    """
    env = dict(os.environ)
    env.pop("AFUNIX_PURE_PYTHON", None)
    if CORE == "pure-python":
        env["AFUNIX_PURE_PYTHON"] = "1"
    return env


class Worker:
    """The harness's handle on a worker process."""

    def __init__(self, baseline: str | None, log: Any) -> None:
        self.baseline = baseline
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "afunix.bench.worker"]
        if self.baseline:
            argv += ["--baseline", self.baseline]
        return subprocess.Popen(
            argv,
            env=core_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )

    def run(self, job: Job) -> dict[str, Any]:
        """Run one job; restart the worker if it hangs or dies."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(job.to_json()) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return {"error": "the worker process died"}
        deadline = time.monotonic() + ALARM + 60
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                return {"error": "the worker process died or hung"}
        line = proc.stdout.readline()
        if not line:
            self.close()
            return {"error": "the worker process died"}
        data: dict[str, Any] = json.loads(line)
        return data

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
