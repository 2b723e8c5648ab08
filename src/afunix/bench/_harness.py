"""Plan, calibrate and run the measurements; summarise each cell.

For every case and size the harness first calibrates each row (a short run,
grown until it lasts long enough; it doubles as a warm-up) to find how many
iterations fill ``seconds``, then runs ``rounds`` rounds in which every row
is measured once, the order rotating each round (A B C, B C A, ...). Each
measurement also starts with untimed warm-up iterations. A cell's figure is
the median over its rounds; the range is the lowest and highest round.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import afunix
from afunix.lowlevel import CORE

from . import _cbuild
from ._link import Job
from ._spec import CASES, IMPLS, MiB
from .worker import Worker


@dataclass(frozen=True)
class Options:
    """What to run; :meth:`quick` and :meth:`full` give the two standard sets."""

    rounds: int = 5
    seconds: float = 0.25  # aim for measurements this long
    quick_sizes: bool = False
    cases: tuple[str, ...] = tuple(CASES)
    impls: tuple[str, ...] = tuple(IMPLS)
    max_size: int | None = None  # cap every size at this many bytes
    pin: str = "auto"  # auto | none | same | split (see placement())
    mode: str = "custom"

    @classmethod
    def quick(cls, **kw: Any) -> Options:
        return cls(**{"rounds": 3, "seconds": 0.03, "quick_sizes": True, "mode": "quick", **kw})

    @classmethod
    def full(cls, **kw: Any) -> Options:
        return cls(**{"rounds": 5, "seconds": 0.25, "mode": "full", **kw})


@dataclass
class Cell:
    """One row (implementation x transport) measured for one case and size."""

    case: str
    size: int
    impl: str
    transport: str
    count: int = 0
    warmup: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    placement: str = "none"  # none | same | split: where its two processes ran
    error: str = ""

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.case, self.size, self.impl, self.transport)

    def value(self, run: dict[str, Any]) -> float:
        """The figure of one run, in the case's unit."""
        unit = CASES[self.case].unit
        seconds = float(run["elapsed_ns"]) / 1e9
        if unit == "us":
            return float(run["p50_ns"]) / 1000.0
        if unit == "B/s":
            return float(run["bytes"]) / seconds
        return float(run["count"]) / seconds

    @property
    def values(self) -> list[float]:
        return [self.value(r) for r in self.runs]

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.runs else None

    @property
    def low(self) -> float | None:
        return min(self.values) if self.runs else None

    @property
    def high(self) -> float | None:
        return max(self.values) if self.runs else None

    @property
    def p99(self) -> float | None:
        """Median over rounds of each round's 99th percentile (latency only), in us."""
        p99s = [r["p99_ns"] / 1000.0 for r in self.runs if "p99_ns" in r]
        return statistics.median(p99s) if p99s else None

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "size": self.size,
            "impl": self.impl,
            "transport": self.transport,
            "unit": CASES[self.case].unit,
            "lower_is_better": CASES[self.case].lower_is_better,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "p99": self.p99,
            "count": self.count,
            "warmup": self.warmup,
            "placement": self.placement,
            "rounds": self.values,
            "runs": self.runs,
            "error": self.error or None,
        }


@dataclass
class Run:
    """Everything one invocation produced."""

    options: Options
    cells: list[Cell]
    notes: list[str]
    machine: dict[str, Any]
    started: float = 0.0
    finished: float = 0.0

    def groups(self) -> Iterator[tuple[str, int, list[Cell]]]:
        """Cells by (case, size), in plan order."""
        seen: dict[tuple[str, int], list[Cell]] = {}
        for cell in self.cells:
            seen.setdefault((cell.case, cell.size), []).append(cell)
        for (case, size), cells in seen.items():
            yield case, size, cells

    def find(self, case: str, size: int, impl: str, transport: str) -> Cell | None:
        for cell in self.cells:
            if cell.key == (case, size, impl, transport):
                return cell
        return None


Progress = Callable[[str, int, int], None]


def sizes_for(case: str, options: Options) -> list[int]:
    spec = CASES[case]
    sizes = spec.quick_sizes if options.quick_sizes else spec.sizes
    if options.max_size is not None and case not in ("fdpass", "fdpingpong", "connect"):
        sizes = tuple(min(s, options.max_size) for s in sizes)
    return sorted(set(sizes))


def available_impls(options: Options) -> tuple[list[str], list[str]]:
    """The implementations that can run here, and a note for each one that cannot."""
    names, notes = [], []
    for name in options.impls:
        impl = IMPLS[name]
        if impl.needs:
            try:
                importlib.import_module(impl.needs)
            except ImportError as exc:
                if impl.needs == "zmq":
                    why = "pyzmq is not installed (pip install 'afunix[zmq]')"
                else:
                    why = f"{impl.needs} is not available ({exc})"
                notes.append(f"{impl.label}: skipped, {why}")
                continue
        names.append(name)
    return names, notes


#: Where the two processes of a measurement run: (cpu, peer_cpu), -1 for "anywhere".
PLACEMENTS = {"none": (-1, -1), "same": (0, -1), "split": (0, 1)}
#: Cases whose figure is a round trip: one process always waits for the other
#: (a connection setup waits for the server's accept and close).
LATENCY_CASES = frozenset({"rtt", "fdpingpong", "connect"})


def placement(case: str, pin: str) -> str:
    """``--pin auto`` (the default): round trips on one CPU, throughput on two.

    A ping-pong keeps one side idle while the other works, so its figure
    depends on how fast an idle CPU is woken; on the 2-vCPU VM this was
    measured on, that wake-up costs ~20 us each way and swamps the IPC path
    (a 64 B round trip: 3-8 us on one CPU, ~45 us across two). Throughput
    cases gain from two CPUs working at once: one process per CPU
    (``split``). Left to the scheduler (``none``), the two sometimes share
    a CPU and sometimes not, and the figures jump between the two (C's
    64 KiB bulk rate between 3 and 10 GB/s from one round to the next).
    """
    if pin == "auto":
        if case in LATENCY_CASES:
            return "same"
        return "split" if len(os.sched_getaffinity(0)) >= 2 else "none"
    return pin


def plan(options: Options, impls: list[str]) -> list[Cell]:
    cells = []
    for case in options.cases:
        where = placement(case, options.pin)
        for size in sizes_for(case, options):
            for name in impls:
                for transport in IMPLS[name].cases.get(case, ()):
                    cells.append(Cell(case, size, name, transport, placement=where))
    return cells


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "afunix_core": CORE,
        "afunix_core_detail": afunix.__core__,
    }
    with contextlib.suppress(ImportError):
        import zmq

        info["pyzmq"] = zmq.pyzmq_version()
        info["libzmq"] = zmq.zmq_version()
    return info


def warmup_for(case: str, count: int) -> int:
    return 1 if case == "large" else min(count // 10 + 1, 2000)


def run_bench(options: Options, progress: Progress | None = None) -> Run:
    """Run the whole plan; ``progress(label, done, total)`` is told as it goes."""
    impls, notes = available_impls(options)
    build = None
    if "c" in impls:
        build = _cbuild.build()
        if build.exe is None:
            notes.append(f"C baseline: {build.problem}")
            impls.remove("c")
    if options.pin == "split" and len(os.sched_getaffinity(0)) < 2:
        raise ValueError("--pin split needs two CPUs; this process may use only one")
    info = machine_info()
    info["compiler"] = build.compiler if build else ""
    info["load_before"] = os.getloadavg()
    cells = plan(options, impls)
    run = Run(options, cells, notes, info, started=time.time())
    sockdir = tempfile.mkdtemp(prefix="afxb", dir="/tmp")
    total = len(cells) * (options.rounds + 1)
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(label, done, total)

    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    worker = Worker(str(build.exe) if build and build.exe else None, log)
    try:
        for case, size, group in run.groups():
            for cell in group:
                if progress:
                    progress(f"calibrating {_label(cell)}", done, total)
                _calibrate(worker, cell, options, sockdir=sockdir, log=log)
                tick(f"calibrated {_label(cell)}")
            for rnd in range(options.rounds):
                order = group[rnd % len(group) :] + group[: rnd % len(group)]
                for cell in order:
                    if not cell.error:
                        job = _job(cell, cell.count, cell.warmup, sockdir)
                        _measure(worker, cell, job, log, keep=True)
                    tick(f"{CASES[case].title} {size}: round {rnd + 1}/{options.rounds}")
    finally:
        worker.close()
        log.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    run.finished = time.time()
    info["date"] = datetime.datetime.fromtimestamp(run.started, datetime.UTC).isoformat(
        timespec="seconds"
    )
    return run


def _label(cell: Cell) -> str:
    return f"{cell.case} {cell.size} {cell.impl}/{cell.transport}"


def _job(cell: Cell, count: int, warmup: int, sockdir: str) -> Job:
    cpu, peer_cpu = PLACEMENTS[cell.placement]
    return Job(
        cell.impl, cell.case, cell.transport, cell.size, count, warmup, sockdir, cpu, peer_cpu
    )


def _measure(worker: Worker, cell: Cell, job: Job, log: Any, *, keep: bool) -> dict[str, Any]:
    data = worker.run(job)
    core = data.pop("core", CORE)
    if core != CORE and "error" not in data:
        data["error"] = f"the worker ran the {core} core, not this process's {CORE}"
    if "error" in data:
        cell.error = str(data["error"]).strip().splitlines()[-1] if data["error"] else "failed"
        tail = _log_tail(log)
        if tail:
            cell.error += f" ({tail})"
        return data
    if keep:
        cell.runs.append(data)
    return data


def _log_tail(log: Any) -> str:
    with contextlib.suppress(OSError, ValueError):
        log.flush()
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.strip()]
        log.seek(0)
        log.truncate()
        return lines[-1].strip() if lines else ""
    return ""


def _calibrate(worker: Worker, cell: Cell, options: Options, *, sockdir: str, log: Any) -> None:
    """Find the count that makes one measurement last about ``options.seconds``."""
    spec = CASES[cell.case]
    target_ns = options.seconds * 1e9
    count = spec.first_count
    if cell.case == "bulk":
        count = max(4, (64 * MiB) // max(cell.size, 1) // 16)
    for _ in range(8):
        data = _measure(
            worker,
            cell,
            _job(cell, count, warmup_for(cell.case, count), sockdir),
            log,
            keep=False,
        )
        if "error" in data:
            return
        elapsed = max(int(data["elapsed_ns"]), 1)
        if elapsed >= target_ns / 5 or count >= spec.max_count:
            break
        count = min(spec.max_count, count * max(2, min(10, int(target_ns / 2 / elapsed))))
    cell.count = max(1, min(spec.max_count, round(count * target_ns / elapsed)))
    cell.warmup = warmup_for(cell.case, cell.count)
