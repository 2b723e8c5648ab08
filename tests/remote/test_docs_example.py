"""The example of ``docs/remote.md`` (``upper.py``) runs unchanged over four transports.

The ```python block after the ``<!-- example: upper.py`` marker is written to a
file and run as it is: ``serve ADDRESS`` in the background, ``ask ADDRESS hello
world`` in the foreground, over a path, ``tcp://``, ``tls://`` (mutual TLS with
the test CA: ``$UPPER_CA``, ``$UPPER_CERT``) and ``ssh://`` (through the
fixture's real ``sshd`` to the same program serving a path). Only the address
(and for TLS the environment naming the certificates) changes; every run prints
what the page says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import background
from ..remote_support import Sshd, TlsCa, free_port

DOCS = Path(__file__).parents[2] / "docs" / "remote.md"
EXPECTED = "HELLO\nWORLD\n"


def example() -> str:
    text = DOCS.read_text()
    found = re.search(r"<!-- example: upper\.py[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/remote.md: the upper.py example block is missing"
    return found.group(1)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "upper.py"
    path.write_text(example())
    return path


@pytest.fixture
def tls_env(tls_ca: TlsCa, tmp_path: Path) -> dict[str, dict[str, str]]:
    """``$UPPER_CA``/``$UPPER_CERT`` for the server and the client."""
    ca = tmp_path / "ca.pem"
    tls_ca.ca.cert_pem.write_to_path(str(ca))
    env = {}
    for side, cert in (("server", tls_ca.server_cert), ("client", tls_ca.client_cert)):
        pem = tmp_path / f"{side}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        env[side] = {**os.environ, "UPPER_CA": str(ca), "UPPER_CERT": str(pem)}
    return env


def run(program: Path, serve_at: str, ask_at: str, tmp_path: Path, **env: dict[str, str]) -> str:
    """``upper.py serve SERVE_AT`` in the background, ``upper.py ask ASK_AT hello world``."""
    log = tmp_path / "upper-serve.log"
    argv = [sys.executable, str(program), "serve", serve_at]
    server_env = env.get("server")
    if server_env is not None:
        argv = ["env", *[f"{k}={v}" for k, v in server_env.items() if k.startswith("UPPER_")]]
        argv += [sys.executable, str(program), "serve", serve_at]
    with background(argv, log, lambda: b"serving on" in log.read_bytes()):
        done = subprocess.run(
            [sys.executable, str(program), "ask", ask_at, "hello", "world"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env.get("client"),
        )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_over_a_path(program: Path, sockdir: Path, tmp_path: Path) -> None:
    path = str(sockdir / "upper.sock")
    assert run(program, path, path, tmp_path) == EXPECTED


def test_over_tcp(program: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    assert run(program, address, address, tmp_path) == EXPECTED


def test_over_tls(program: Path, tmp_path: Path, tls_env: dict[str, dict[str, str]]) -> None:
    port = free_port()
    served = run(
        program,
        f"tls://127.0.0.1:{port}",
        f"tls://localhost:{port}",
        tmp_path,
        server=tls_env["server"],
        client=tls_env["client"],
    )
    assert served == EXPECTED


def test_over_ssh(program: Path, sockdir: Path, tmp_path: Path, ssh_env: Sshd) -> None:
    os.chmod(sockdir, 0o755)  # (root's sshd reaches it anyway; as a far host would)
    path = sockdir / "upper.sock"
    assert run(program, str(path), ssh_env.url(path), tmp_path) == EXPECTED
