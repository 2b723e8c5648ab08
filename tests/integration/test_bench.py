"""``afunix bench``: the harness runs, the C baseline builds and its figures are sane.

No test here asserts a speed: figures only have to be consistent (counts as
asked, positive times, p50 <= p99, byte totals = size x count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import afunix
from afunix.bench import (
    Options,
    _cbuild,
    render_markdown,
    run_bench,
    run_from_json,
    targets,
    to_json,
    uds_vs_tcp,
)
from afunix.bench._harness import Cell, Run, available_impls, plan
from afunix.bench._link import Job
from afunix.bench._report import fmt, fmt_range, render_plain
from afunix.bench._spec import CASES, IMPLS
from afunix.bench.worker import run_c, run_python
from afunix.cli.bench import size_arg
from afunix.lowlevel import CORE

from ..conftest import afunix_cmd

SRC = Path(__file__).parents[2] / "src" / "afunix" / "bench" / "baseline.c"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = _cbuild.build(tmp_path_factory.mktemp("cache"))
    assert build.exe is not None, build.problem
    return build.exe


def check_result(data: dict[str, int], job: Job) -> None:
    assert "error" not in data, data
    assert data["count"] == job.count
    assert data["elapsed_ns"] > 0
    if job.case in ("rtt", "rate", "bulk", "large"):
        assert data["bytes"] == job.size * job.count
    if job.case == "rtt":
        assert 0 < data["p50_ns"] <= data["p99_ns"] <= data["elapsed_ns"]


# ---- the C baseline ------------------------------------------------------------------


def test_baseline_source_is_warning_free(tmp_path: Path) -> None:
    cc = shutil.which("gcc")
    assert cc, "gcc is needed (apt-get install gcc)"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "b"), str(SRC)],
        check=True,
        timeout=60,
    )


def test_baseline_is_cached(tmp_path: Path) -> None:
    first = _cbuild.build(tmp_path)
    assert first.exe is not None and first.exe.parent == tmp_path
    mtime = first.exe.stat().st_mtime_ns
    again = _cbuild.build(tmp_path)
    assert again.exe == first.exe and again.exe.stat().st_mtime_ns == mtime


def test_no_compiler_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-afunix")
    build = _cbuild.build(tmp_path)
    assert build.exe is None
    assert "no C compiler" in build.problem


def test_broken_compiler_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # exists, always fails
    build = _cbuild.build(tmp_path)
    assert build.exe is None
    assert "failed on baseline.c" in build.problem


C_JOBS = [
    ("rtt", "unix", 64),
    ("rtt", "unix-path", 1),
    ("rtt", "seqpacket", 64),
    ("rtt", "dgram", 4096),
    ("rtt", "tcp", 64),
    ("rtt", "pipe", 64),
    ("rate", "unix", 64),
    ("rate", "dgram", 1024),
    ("bulk", "unix", 65536),
    ("bulk", "pipe", 1 << 20),
    ("bulk", "tcp", 65536),
    ("fdpass", "unix", 1),
    ("fdpass", "seqpacket", 1),
    ("fdpingpong", "unix", 1),
    ("large", "unix", 1 << 20),
    ("large", "memfd", 1 << 20),
    ("connect", "unix-path", 0),
    ("connect", "abstract", 0),
    ("connect", "tcp", 0),
]


@pytest.mark.parametrize(("case", "transport", "size"), C_JOBS)
def test_baseline_cases(
    baseline: Path, sockdir: Path, case: str, transport: str, size: int
) -> None:
    job = Job("c", case, transport, size, 20, 2, str(sockdir))
    check_result(run_c(job, str(baseline)), job)
    assert os.listdir(sockdir) == []  # socket files removed


def test_baseline_peer_can_be_pinned(baseline: Path, sockdir: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs two CPUs")
    job = Job("c", "rtt", "unix", 64, 20, 2, str(sockdir), peer_cpu=1)
    check_result(run_c(job, str(baseline)), job)


def test_baseline_reports_errors(baseline: Path, sockdir: Path) -> None:
    data = run_c(Job("c", "rtt", "carrier-pigeon", 64, 5, 0, str(sockdir)), str(baseline))
    assert "unknown transport" in data["error"]
    proc = subprocess.run([str(baseline)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ---- the Python rows ---------------------------------------------------------------

PY_JOBS = [
    (impl, case, transport)
    for impl in ("stdlib", "mp", "zmq", "asyncio", "afunix", "afunix-aio")
    for case, transports in IMPLS[impl].cases.items()
    for transport in transports
]


@pytest.mark.parametrize(("impl", "case", "transport"), PY_JOBS)
def test_python_rows(sockdir: Path, impl: str, case: str, transport: str) -> None:
    size = {"rtt": 64, "rate": 64, "bulk": 65536, "large": 1 << 20}.get(case, 1)
    if case == "connect":
        size = 0
    job = Job(impl, case, transport, size, 12, 2, str(sockdir))
    check_result(run_python(job), job)
    assert os.listdir(sockdir) == []


def test_tcp_and_tls_rows_exist_and_run(sockdir: Path) -> None:
    """Issue 18: a ``tcp://``/``tls://`` Channel round trip against plain stdlib code on TCP
    and on ``ssl.SSLSocket``; planned in quick and full runs, and they run (5 rounds)."""
    assert "tls" in IMPLS["stdlib"].cases["rtt"] and "tcp" in IMPLS["stdlib"].cases["rtt"]
    assert {"tcp", "tls"} <= set(IMPLS["afunix"].cases["rtt"])
    for options in (Options.quick(), Options.full()):
        rows = {(c.impl, c.transport) for c in plan(options, list(IMPLS)) if c.case == "rtt"}
        assert {("stdlib", "tcp"), ("stdlib", "tls"), ("afunix", "tcp"), ("afunix", "tls")} <= rows
    for impl, transport in (("afunix", "tcp"), ("afunix", "tls"), ("stdlib", "tls")):
        job = Job(impl, "rtt", transport, 64, 5, 1, str(sockdir))
        check_result(run_python(job), job)
    assert os.listdir(sockdir) == []  # (the certificate file is gone again)


def test_python_row_failure_is_reported(sockdir: Path) -> None:
    data = run_python(Job("stdlib", "rtt", "carrier-pigeon", 64, 5, 0, str(sockdir)))
    assert "carrier-pigeon" in data["error"]


# ---- the harness, the report, the CLI -------------------------------------------------


def test_missing_pyzmq_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zmq", None)  # import zmq now raises ImportError
    names, notes = available_impls(Options(impls=("stdlib", "zmq")))
    assert names == ["stdlib"]
    assert notes and "pyzmq is not installed" in notes[0]


def test_plan_covers_every_row_and_caps_sizes() -> None:
    cells = plan(Options.quick(max_size=4096), list(IMPLS))
    assert {c.impl for c in cells} == set(IMPLS)
    assert {c.case for c in cells} == set(CASES)
    assert max(c.size for c in cells) == 4096
    full = plan(Options.full(), list(IMPLS))
    assert {c.size for c in full if c.case == "large"} == {16 << 20, 256 << 20}


def test_run_bench_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen: list[int] = []
    opts = Options.quick(
        rounds=2,
        seconds=0.002,
        cases=("rtt", "fdpass"),
        impls=("c", "stdlib", "afunix"),
        max_size=64,
        pin="split",
    )
    run = run_bench(opts, lambda label, done, total: seen.append(done))
    assert seen and seen[-1] == len(run.cells) * 3
    assert not [c.error for c in run.cells if c.error]
    for cell in run.cells:
        assert len(cell.runs) == 2 and cell.count >= 1
        assert cell.low is not None and cell.median is not None and cell.high is not None
        assert cell.low <= cell.median <= cell.high
    text = render_plain(run)
    assert "round-trip latency, 64 B" in text and "afunix Channel" in text
    assert "Targets (issue 6)" in text


def test_workers_run_this_process_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The report names this process's core, so the workers must run it too, whatever
    ``AFUNIX_PURE_PYTHON`` says by now: here it says the opposite of the choice made at
    import (a worker that ran the other core would fail its rows)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if CORE == "compiled":
        monkeypatch.setenv("AFUNIX_PURE_PYTHON", "1")
    else:
        monkeypatch.delenv("AFUNIX_PURE_PYTHON", raising=False)
    opts = Options.quick(rounds=1, seconds=0.002, cases=("rtt",), impls=("afunix",), max_size=64)
    run = run_bench(opts)
    assert run.cells and not [c.error for c in run.cells if c.error]
    assert (run.machine["afunix_core"], run.machine["afunix_core_detail"]) == (
        CORE,
        afunix.__core__,
    )
    assert f"afunix core: {afunix.__core__}" in render_plain(run)
    assert f"afunix core: {afunix.__core__}" in to_json_and_back_markdown(run)


def to_json_and_back_markdown(run: Run) -> str:
    return render_markdown(run_from_json(json.loads(json.dumps(to_json(run)))))


def test_cli_quick_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        afunix_cmd(
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--seconds",
            "0.001",
            "--max-size",
            "4K",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-progress",
        ),
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "round-trip latency" in proc.stdout and "UDS" in proc.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "afunix-bench/1"
    assert {
        "kernel",
        "cpus",
        "python",
        "load_before",
        "load_after",
        "compiler",
        "afunix_core",
        "afunix_core_detail",
    } <= set(data["machine"])
    assert data["machine"]["afunix_core"] == CORE
    assert data["options"]["mode"] == "quick"
    results = data["results"]
    assert {r["impl"] for r in results} == set(IMPLS)
    assert {r["case"] for r in results} == set(CASES)
    keys = {"case", "size", "impl", "transport", "unit", "median", "min", "max", "p99", "rounds"}
    for r in results:
        two = len(os.sched_getaffinity(0)) >= 2
        latency = r["case"] in ("rtt", "fdpingpong", "connect")
        assert r["placement"] == ("same" if latency else "split" if two else "none")
        assert keys <= set(r)
        assert r["error"] is None, r
        assert r["min"] <= r["median"] <= r["max"]
        assert (r["p99"] is not None) == (r["case"] == "rtt")
    assert {u["impl"] for u in data["uds_vs_tcp"]} >= {"c", "stdlib"}
    assert len(data["targets"]) >= 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved run renders again without measuring anything.
    md = tmp_path / "bench.md"
    again = subprocess.run(
        afunix_cmd("bench", "--from-json", str(out), "--markdown", str(md), "--no-progress"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "| implementation | transport | median |" in md.read_text()
    assert "**afunix Channel**" in md.read_text()


def test_cli_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        afunix_cmd("bench", "--cases", "rtt,teleport"), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "unknown case teleport" in proc.stderr


@pytest.mark.parametrize(
    ("text", "value"), [("64", 64), ("4K", 4096), ("1M", 1 << 20), ("2MiB", 2 << 20)]
)
def test_size_arg(text: str, value: int) -> None:
    assert size_arg(text) == value


def test_formatting() -> None:
    assert fmt(12.34, "us") == "12.3 us"
    assert fmt(2_410_000, "msg/s") == "2.41 M/s"
    assert fmt(9.62e9, "B/s") == "9.62 GB/s"
    assert fmt_range(8.1, 9.7, "us") == "8.1-9.7 us"
    assert fmt(None, "us") == "-"


def _cell(case: str, size: int, impl: str, transport: str, value: float) -> Cell:
    cell = Cell(case, size, impl, transport, count=1)
    if case == "rtt":
        cell.runs = [
            {
                "elapsed_ns": 1,
                "count": 1,
                "bytes": size,
                "p50_ns": value * 1000,
                "p99_ns": value * 2000,
            }
        ]
    elif CASES[case].unit == "B/s":
        cell.runs = [{"elapsed_ns": 1_000_000_000, "count": 1, "bytes": value}]
    else:
        cell.runs = [{"elapsed_ns": 1_000_000_000, "count": value, "bytes": 0}]
    return cell


def test_targets_and_ratios_from_known_figures() -> None:
    cells = [
        _cell("rtt", 64, "c", "unix", 10.0),
        _cell("rtt", 64, "c", "tcp", 20.0),
        _cell("rtt", 64, "afunix", "unix", 10.5),
        _cell("rtt", 64, "stdlib", "unix", 12.0),
        _cell("rate", 64, "c", "unix", 1e6),
        _cell("rate", 64, "zmq", "ipc", 2e6),
        _cell("rate", 64, "afunix", "unix", 1.5e6),
        _cell("rate", 64, "stdlib", "unix", 2e6),
    ]
    run = Run(Options(rounds=1), cells, [], {})
    checks = {c.target: c for c in targets(run)}
    rtt = checks["round-trip latency 64 B: afunix <= 1.1x C"]
    assert rtt.measured == pytest.approx(1.05) and rtt.met is True
    assert checks["small-message rate 64 B: afunix >= 1.0x C"].met is True
    assert checks["small-message rate 64 B: afunix >= pyzmq ipc://"].met is False
    assert checks["bulk throughput 64 KiB: afunix >= 0.95x C"].met is None  # not measured
    ahead = checks["every afunix row ahead of plain stdlib and multiprocessing"]
    assert ahead.met is False and "rate 64 B behind plain stdlib" in ahead.detail
    uds = uds_vs_tcp(run)
    assert [(u["impl"], u["uds_speedup"]) for u in uds] == [("c", 2.0)]
    assert to_json(run)["targets"][0]["met"] is True


def test_bimodal_unpinned_latency_is_flagged() -> None:
    from afunix.bench._report import placement_warning

    fast, slow = _cell("rtt", 64, "c", "unix", 9.0), _cell("rtt", 64, "c", "unix", 45.0)
    fast.runs += slow.runs
    assert "bimodal" in (placement_warning(Run(Options(rounds=2), [fast], [], {})) or "")
    fast.placement = "same"
    assert placement_warning(Run(Options(rounds=2), [fast], [], {})) is None
    steady = _cell("rtt", 64, "c", "unix", 9.0)
    assert placement_warning(Run(Options(rounds=1), [steady], [], {})) is None
