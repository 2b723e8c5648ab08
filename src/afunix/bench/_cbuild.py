"""Compile the C baseline (``baseline.c``, shipped in this package) once per machine.

The binary goes to ``$XDG_CACHE_HOME/afunix`` (default ``~/.cache/afunix``),
named after a hash of the source, the compiler and the flags, so that a new
version of either is rebuilt and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

FLAGS = ("-O2", "-Wall")


@dataclass(frozen=True)
class Build:
    """The outcome: ``exe`` is set on success, else ``problem`` says why not."""

    exe: Path | None
    compiler: str
    problem: str = ""


def source_text() -> str:
    return resources.files("afunix.bench").joinpath("baseline.c").read_text()


def find_compiler() -> str | None:
    """``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "afunix"


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run(
            [cc, "--version"], check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return cc
    return out.stdout.splitlines()[0] if out.stdout else cc


def build(cache: Path | None = None) -> Build:
    """Compile the baseline if needed; never raises for a missing or failing compiler."""
    cc = find_compiler()
    if cc is None:
        return Build(None, "", "no C compiler found (install gcc or set CC); C rows skipped")
    version = _compiler_version(cc)
    source = source_text()
    key = hashlib.sha256("\0".join([source, cc, version, *FLAGS]).encode()).hexdigest()[:16]
    where = cache or cache_dir()
    exe = where / f"bench-baseline-{key}"
    if exe.exists():
        return Build(exe, version)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            src = Path(tmp) / "baseline.c"
            src.write_text(source)
            out = Path(tmp) / "baseline"
            proc = subprocess.run(
                [cc, *FLAGS, "-o", str(out), str(src)],
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                return Build(None, version, f"{cc} failed on baseline.c: {detail}; C rows skipped")
            os.replace(out, exe)  # atomic: a concurrent run sees all or nothing
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Build(None, version, f"could not build the C baseline in {where}: {exc}")
    return Build(exe, version)
