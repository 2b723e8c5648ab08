"""docs/broker.md's C client, compiled from the page and run as nobody against the broker.

If this passes, the protocol section is enough to write a client in another language.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NOBODY
from tests.security.broker_support import BrokerProcess, Tree, broker, tree

__all__ = ["broker", "tree"]

DOCS = Path(__file__).parents[2] / "docs" / "broker.md"


@pytest.fixture(scope="module")
def broker_cat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    [source] = re.findall(r"```c\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    out = tmp_path_factory.mktemp("cdoc")
    out.chmod(0o755)
    (out / "broker_cat.c").write_text(source)
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (apt-get install gcc)")
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out / "broker_cat"),
            str(out / "broker_cat.c"),
        ],
        check=True,
        timeout=60,
    )
    return out / "broker_cat"


def test_c_client_from_the_docs(broker_cat: Path, tree: Tree, broker: BrokerProcess) -> None:
    ok = subprocess.run(
        [*NOBODY, str(broker_cat), str(tree.sock), str(tree.root / "secret.txt")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (ok.returncode, ok.stdout) == (0, "secret\n"), ok.stderr
    denied = subprocess.run(
        [*NOBODY, str(broker_cat), str(tree.sock), str(tree.root / "out" / "outside.txt")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert denied.returncode == errno.EACCES
    assert "Permission denied (broker: confinement:" in denied.stderr
    missing = subprocess.run(
        [*NOBODY, str(broker_cat), str(tree.sock), str(tree.root / "nope.txt")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == errno.ENOENT
    assert [r["decision"] for r in tree.opens()] == ["granted", "denied", "failed"]
