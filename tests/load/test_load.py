"""Load, bounded in time, loopback only: 10,000 connections held; busy clients measured.

These assert behaviour (every echo correct, nothing refused); the figures they print
come from `afunix load` and go to docs/benchmarks.md through benchmarks/server_load.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from ..conftest import afunix_cmd, wait_for_path


def _run_load(*args: str) -> dict[str, object]:
    out = subprocess.run(
        afunix_cmd("load", *args, "--json"), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr + out.stdout
    data: dict[str, object] = json.loads(out.stdout)
    return data


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_async_model_holds_10000_connections(sockdir: Path, loop: str) -> None:
    path = sockdir / "l.sock"
    extra = ["--uvloop"] if loop == "uvloop" else []
    server = subprocess.Popen(
        afunix_cmd("serve", str(path), "--nofile", "12000", "--backlog", "4096", *extra),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(path)
        report = _run_load(
            str(path), "--hold", "10000", "--duration", "0.5", "--server-pid", str(server.pid)
        )
        assert report["held"] == 10000
        assert report["requests"] == 10000
        assert report["errors"] == {}
        per_conn = report["server_kib_per_connection"]
        assert isinstance(per_conn, float) and per_conn > 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


@pytest.mark.parametrize("model", ["async", "thread", "fork"])
def test_busy_clients_report_latency_percentiles(sockdir: Path, model: str) -> None:
    path = sockdir / "b.sock"
    server = subprocess.Popen(
        afunix_cmd("serve", str(path), "--model", model), stderr=subprocess.DEVNULL
    )
    try:
        wait_for_path(path)
        report = _run_load(str(path), "--clients", "20", "--duration", "0.5", "--size", "100")
        assert report["errors"] == {}
        assert isinstance(report["requests"], int) and report["requests"] > 20
        lat = report["latency_us"]
        assert isinstance(lat, dict)
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_load_reports_errors_with_nonzero_exit(sockdir: Path) -> None:
    out = subprocess.run(
        afunix_cmd(
            "load", str(sockdir / "none.sock"), "--clients", "3", "--duration", "0.2", "--json"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["errors"] == {"ENOENT": 3}
