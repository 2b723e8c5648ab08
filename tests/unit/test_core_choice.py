"""Which core runs: the compiled ``afunix._ccore`` or the pure-Python reference (issue 16).

CI runs the whole suite once per core (``make pytest-compiled``, ``make
pytest-pure``) and tells each run which core it must be on through
``AFUNIX_EXPECT_CORE``: a missing or unloadable extension then fails the
compiled run instead of passing on the pure core twice. ``make asan`` also sets
``AFUNIX_EXPECT_CCORE``, the directory the extension must be loaded from.
Without ``AFUNIX_EXPECT_CORE`` (``make pytest``) the choice must still be
consistent: a built extension is used unless ``AFUNIX_PURE_PYTHON=1``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import afunix
from afunix import _core
from afunix.lowlevel import CORE

from ..conftest import afunix_cmd

#: Whether an ``afunix._ccore`` is there to import (built by ``pip install``).
BUILT = importlib.util.find_spec("afunix._ccore") is not None

SHOW = "import afunix, afunix._core as c; print(c.CORE); print(c.WHY); print(afunix.__core__)"


def core_of_a_new_process(pure: str | None) -> list[str]:
    """``CORE``, ``WHY``, ``afunix.__core__`` in a fresh interpreter, with
    ``AFUNIX_PURE_PYTHON`` set to *pure* (``None``: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "AFUNIX_PURE_PYTHON"}
    if pure is not None:
        env["AFUNIX_PURE_PYTHON"] = pure
    out = subprocess.run(
        [sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


def test_this_run_is_on_the_expected_core() -> None:
    expected = os.environ.get("AFUNIX_EXPECT_CORE")
    assert expected in (None, "compiled", "pure-python"), expected
    forced = os.environ.get("AFUNIX_PURE_PYTHON") == "1"
    if expected is None:  # no expectation: the consistent choice
        expected = "compiled" if BUILT and not forced else "pure-python"
    assert expected == CORE, _core.WHY
    assert expected == _core.CORE
    assert (_core.ccore is not None) == (CORE == "compiled")
    assert afunix.__core__.startswith(CORE)
    assert bool(_core.WHY) == (CORE == "pure-python")
    where = os.environ.get("AFUNIX_EXPECT_CCORE")
    if where is not None:
        assert _core.ccore is not None
        assert Path(str(_core.ccore.__file__)).resolve().parent == Path(where).resolve()


def test_the_variable_forces_the_pure_core() -> None:
    assert core_of_a_new_process("1") == [
        "pure-python",
        "AFUNIX_PURE_PYTHON=1",
        "pure-python (AFUNIX_PURE_PYTHON=1)",
    ]


@pytest.mark.parametrize("value", [None, "0", ""])
def test_only_1_forces_it(value: str | None) -> None:
    got = core_of_a_new_process(value)
    if BUILT:
        assert got == ["compiled", "", "compiled"]
    else:
        assert got[0] == "pure-python"
        assert got[1].startswith("not built: No module named 'afunix._ccore'")
        assert got[2] == f"pure-python ({got[1]})"


def test_version_names_the_core() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AFUNIX_PURE_PYTHON"}
    forced = subprocess.run(
        afunix_cmd("--version"),
        env={**env, "AFUNIX_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert forced.stdout.splitlines()[1] == "core: pure-python (AFUNIX_PURE_PYTHON=1)"
    chosen = subprocess.run(
        afunix_cmd("--version"), env=env, capture_output=True, text=True, check=True
    )
    line = chosen.stdout.splitlines()[1]
    if BUILT:
        assert line == "core: compiled"
    else:
        assert line.startswith("core: pure-python (not built: ")
