"""Start-up figures for docs/benchmarks.md: ``import afunix`` and ``afunix --help``.

Each round starts every case once per source tree, interleaved (old, new, old, new,
...), so that a loaded machine weighs on every tree alike; a fresh interpreter per
run, bytecode cached in a private ``PYTHONPYCACHEPREFIX`` after a warm-up run. Wall
time comes from ``time.perf_counter()`` around the child, CPU time (user + system)
from ``os.wait4``. Prints a Markdown table of medians and the new/old ratios.

Usage: python benchmarks/startup.py [--rounds 40] OLD_SRC [NEW_SRC]

OLD_SRC and NEW_SRC are ``src`` directories of two checkouts (NEW_SRC defaults to
this checkout's), e.g. ``git archive main src | tar -x -C /tmp/old`` then
``python benchmarks/startup.py /tmp/old/src``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "python -c pass": ["-c", "pass"],
    "import afunix": ["-c", "import afunix"],
    "afunix --help": ["-m", "afunix", "--help"],
}


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU milliseconds of one child ``python ARGS``."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"python {' '.join(args)} failed with status {child.returncode}")
    return wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("old", type=Path, help="the src directory of the old tree")
    parser.add_argument(
        "new", type=Path, nargs="?", default=Path(__file__).resolve().parents[1] / "src"
    )
    parser.add_argument("--rounds", type=int, default=40)
    opts = parser.parse_args()
    trees = {"old": str(opts.old.resolve()), "new": str(opts.new.resolve())}
    with tempfile.TemporaryDirectory(prefix="afx-pyc-") as cache:
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base["PYTHONPYCACHEPREFIX"] = cache
        envs = {name: dict(base, PYTHONPATH=src) for name, src in trees.items()}
        for env in envs.values():  # warm-up: bytecode of every module the cases import
            for args in CASES.values():
                run_once(args, env)
        got: dict[tuple[str, str], list[tuple[float, float]]] = {
            (tree, case): [] for tree in trees for case in CASES
        }
        for _ in range(opts.rounds):
            for case, args in CASES.items():
                for tree, env in envs.items():
                    got[(tree, case)].append(run_once(args, env))

    def median(tree: str, case: str, i: int) -> float:
        return statistics.median(sample[i] for sample in got[(tree, case)])

    print(
        f"| case (medians of {opts.rounds}) | old wall | new wall | new/old "
        "| old CPU | new CPU | new/old |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        cells = []
        for i in (0, 1):
            old, new = median("old", case, i), median("new", case, i)
            cells += [f"{old:.1f} ms", f"{new:.1f} ms", f"{new / old:.2f}"]
        print(f"| `{case}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
