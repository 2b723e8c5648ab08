"""Packaging (issue 16): the sdist and wheel carry the compiled core, and an install
without a C compiler succeeds with the pure-Python core and says so.

Real builds: a copy of this source tree, a fresh venv (``python -m venv``, no system
site-packages) and the dev venv's own pip installing into it (``pip --python``). The
build backend comes through pip's normal build isolation, so PyPI (or pip's cache)
must be reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Not part of the source: environments, builds, caches, the in-place compiled core.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*.so",
)
pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what selects or loads a core here (the pure run's
    ``AFUNIX_PURE_PYTHON``, ``make asan``'s ``PYTHONPATH`` and ``LD_PRELOAD``)."""
    drop = {"AFUNIX_PURE_PYTHON", "PYTHONPATH", "LD_PRELOAD", "PYTHONMALLOC"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def fresh_venv(where: Path) -> Path:
    """A new venv without pip (the dev venv's pip installs into it); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    return where / "bin" / "python"


def pip_into(python: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
        check=False,
    )


def version_of(python: Path) -> list[str]:
    out = subprocess.run(
        [python.parent / "afunix", "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    )
    return out.stdout.splitlines()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A copy of this source tree, so that builds write nothing into the checkout."""
    dest = tmp_path / "afunix-src"
    shutil.copytree(ROOT, dest, ignore=NOT_SOURCE)
    assert (dest / "src" / "afunix" / "_ccore.c").is_file()
    return dest


@pytest.mark.timeout(240)
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_without_a_compiler_gives_the_pure_core(
    source: Path, tmp_path: Path, editable: bool
) -> None:
    """``pip install`` and ``pip install -e`` (what the Makefile runs) with a compiler
    that fails: one warning line, the pure core, and no extension anywhere."""
    python = fresh_venv(tmp_path / "venv")
    what = ["-e", str(source)] if editable else [str(source)]
    done = pip_into(python, "--no-deps", *what, env=clean_env(CC="/bin/false"))
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    said = [line for line in output.splitlines() if "compiled core" in line]
    assert len(said) == 1, output
    assert (
        "afunix: compiled core not built (/bin/false failed on src/afunix/_ccore.c; "
        "pip install -v shows why); installed the pure-Python core." in said[0]
    )
    assert not list(tmp_path.rglob("_ccore*.so"))  # the venv and the source tree
    assert version_of(python)[1] == "core: pure-python (not built: No module named 'afunix._ccore')"


@pytest.mark.timeout(240)
def test_sdist_and_wheel_carry_the_compiled_core(source: Path, tmp_path: Path) -> None:
    """``python -m build``: the sdist has the C source, the wheel built from that
    sdist has the extension (abi3), and installed it is the core that runs."""
    python = fresh_venv(tmp_path / "venv")
    env = clean_env()
    got = pip_into(python, "build", env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    dist = tmp_path / "dist"
    built = subprocess.run(
        [python, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        env={**env, "AFUNIX_REQUIRE_CCORE": "1"},  # a failed compile fails the build
        timeout=200,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "compiled core not built" not in built.stdout + built.stderr
    [sdist] = dist.glob("afunix-*.tar.gz")
    [wheel] = dist.glob("afunix-*.whl")
    assert wheel.name.endswith("-cp311-abi3-linux_x86_64.whl"), wheel.name
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"setup.py", "pyproject.toml", "src/afunix/_ccore.c", "src/afunix/py.typed"} <= in_sdist
    assert not [name for name in in_sdist if name.endswith(".so")]
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
        [points] = [name for name in in_wheel if name.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(points).decode()
    assert {"afunix/_ccore.abi3.so", "afunix/py.typed", "afunix/bench/baseline.c"} <= in_wheel
    assert "afunix/_ccore.c" not in in_wheel
    assert "afunix = afunix.cli:main" in entry_points
    installed = pip_into(python, "--no-deps", str(wheel), env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert version_of(python)[1] == "core: compiled"
