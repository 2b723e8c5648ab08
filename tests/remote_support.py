"""Real remote peers for the tests: an ``sshd`` started by the test, and a TLS CA.

:func:`start_sshd` runs the system's OpenSSH server on 127.0.0.1 on a free
port, with a host key and a client key generated for it (``ssh-keygen``), its
own ``sshd_config`` (``-f``, ``-D``, ``-e``; ``StrictModes no``, root by key
only, ``AllowStreamLocalForwarding yes``, ``UsePAM no``, the pid file in the
temporary directory) and a client config (``-F``: the identity, a known-hosts
file holding the generated host key, ``BatchMode yes``,
``StrictHostKeyChecking yes``). It waits for the server by condition (its
``SSH-2.0`` banner on a TCP connect), never by a sleep, and :meth:`Sshd.stop`
ends and reaps it. Nothing is skipped: ``.ci/run`` installs openssh-server and
openssh-client, and a missing one fails the test with the package to install.

:class:`TlsCa` is a CA with a server certificate for ``localhost`` and
``127.0.0.1`` and a client certificate, made by ``trustme`` (a dev extra),
with the ``ssl.SSLContext`` of each side.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it (Debian's path)


def sshd_binary() -> str:
    found = shutil.which("sshd") or next(
        (path for path in SSHD_CANDIDATES if os.access(path, os.X_OK)), None
    )
    if found is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.fail("the ssh tests need OpenSSH: apt-get install openssh-server openssh-client")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
    )


@dataclass
class Sshd:
    """A running ``sshd`` and what a client needs to reach it."""

    directory: Path
    port: int
    client_config: Path
    client_key: Path
    log: Path
    process: subprocess.Popen[bytes]

    def url(self, path: str | Path, user: str = "root") -> str:
        """``ssh://user@127.0.0.1:PORT/path``."""
        return f"ssh://{user}@127.0.0.1:{self.port}{path}"

    @property
    def ssh_command(self) -> str:
        """The ``ssh`` command with this server's client config (for ``$AFUNIX_SSH``)."""
        return f"ssh -F {self.client_config}"

    def ssh_processes(self) -> list[int]:
        """Pids of ``ssh`` clients using this server's client config (ours, still running)."""
        found = []
        needle = str(self.client_config).encode()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"ssh" and needle in argv:
                found.append(int(name))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung sshd
            self.process.kill()
            self.process.wait()


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            return conn.recv(8).startswith(b"SSH-2.0")
    except OSError:
        return False


def start_sshd(directory: Path, attempts: int = 3) -> Sshd:
    """Start ``sshd`` in *directory* (keys and configs are written there); wait for it."""
    sshd = sshd_binary()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    keygen(directory / "host_key", "afunix-test-host")
    keygen(directory / "client_key", "afunix-test-client")
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    host_pub = (directory / "host_key.pub").read_text().strip()
    for _ in range(attempts):  # a free port can be taken by someone else meanwhile
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\n"
            "AllowStreamLocalForwarding yes\nAllowTcpForwarding yes\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PrintMotd no\n"
        )
        (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        client = directory / "ssh_config"
        client.write_text(
            "Host *\n"
            f"  IdentityFile {directory / 'client_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {directory / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n"
            "  StrictHostKeyChecking yes\n  ConnectTimeout 30\n"
        )
        log = directory / "sshd.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        server = Sshd(directory, port, client, directory / "client_key", log, proc)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if _banner(port):
                return server
            time.sleep(0.02)
        server.stop()
        if b"Address already in use" not in log.read_bytes():
            break
    pytest.fail(f"sshd did not start: {log.read_text(errors='replace')}")


class TlsCa:
    """A test CA (``trustme``) with a server and a client certificate."""

    def __init__(self) -> None:
        import trustme

        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client_cert = self.ca.issue_cert("client.afunix.test")

    def server_context(self, require_client: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
        return ctx

    def client_context(self, with_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if with_cert:
            self.client_cert.configure_cert(ctx)
        return ctx
