"""Fixtures of the remote-transport tests: a real ``sshd`` and a TLS CA (see remote_support)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..remote_support import Sshd, TlsCa, start_sshd


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    """An ``sshd`` on 127.0.0.1 (one per test module), with keys made for it."""
    directory = Path(tempfile.mkdtemp(prefix="afxssh", dir="/tmp"))
    os.chmod(directory, 0o755)
    try:
        server = start_sshd(directory)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ssh_env(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> Sshd:
    """``$AFUNIX_SSH`` set to ``ssh -F`` the fixture server's client config."""
    monkeypatch.setenv("AFUNIX_SSH", sshd.ssh_command)
    return sshd


@pytest.fixture(scope="session")
def tls_ca() -> TlsCa:
    """A CA with server (localhost, 127.0.0.1) and client certificates, made now."""
    return TlsCa()
