"""Server load figures for docs/benchmarks.md: connections held, memory, requests per second.

Runs `afunix serve` in each configuration and drives it with `afunix load`:

* hold: 10,000 connections opened, one echo each, held, all checked again; the server's
  RSS before and after gives the memory per connection;
* busy: 100 clients, each sending 64-byte requests and waiting for the echo, for
  --duration seconds: requests per second and latency percentiles.

Usage: python benchmarks/server_load.py [--duration 5] [--runs 3] [--json FILE]
Prints a Markdown table (medians over the runs). Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CONFIGS = [
    ("async (asyncio)", ["--model", "async"]),
    ("async (uvloop)", ["--model", "async", "--uvloop"]),
    ("thread", ["--model", "thread"]),
    ("fork", ["--model", "fork"]),
]


def afunix(*args: str) -> list[str]:
    return [sys.executable, "-m", "afunix", *args]


def run_load(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        afunix("load", *args, "--json"), capture_output=True, text=True, timeout=600, check=False
    )
    if not out.stdout:
        raise RuntimeError(out.stderr)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def measure(flags: list[str], duration: float, hold: bool) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="afxb", dir="/tmp")
    path = os.path.join(d, "s.sock")
    server = subprocess.Popen(
        afunix("serve", path, "--nofile", "12000", "--backlog", "4096", *flags),
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        busy = run_load(path, "--clients", "100", "--duration", str(duration), "--size", "64")
        held = (
            run_load(path, "--hold", "10000", "--duration", "1", "--server-pid", str(server.pid))
            if hold
            else None
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        os.rmdir(d)
    return {"busy": busy, "hold": held}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in CONFIGS}
    for run in range(args.runs):  # interleaved: A B C D, A B C D, ...
        for name, flags in CONFIGS:
            hold = name.startswith("async")
            print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
            raw[name].append(measure(flags, args.duration, hold))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    print("| server | requests/s (100 clients) | p50 µs | p99 µs | 10k held | KiB/connection |")
    print("|---|---|---|---|---|---|")
    for name, runs in raw.items():
        rps = statistics.median(r["busy"]["requests_per_s"] for r in runs)
        p50 = statistics.median(r["busy"]["latency_us"]["p50"] for r in runs)
        p99 = statistics.median(r["busy"]["latency_us"]["p99"] for r in runs)
        errors = sum(sum(r["busy"]["errors"].values()) for r in runs)
        holds = [r["hold"] for r in runs if r["hold"]]
        hold_errors = sum(sum(h["errors"].values()) for h in holds)
        held = f"{min(h['held'] for h in holds)} ({hold_errors} errors)" if holds else "-"
        kib = (
            f"{statistics.median(h['server_kib_per_connection'] for h in holds):.2f}"
            if holds
            else "-"
        )
        err = f" ({errors} errors)" if errors else ""
        print(f"| {name} | {rps:,.0f}{err} | {p50:,.0f} | {p99:,.0f} | {held} | {kib} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
