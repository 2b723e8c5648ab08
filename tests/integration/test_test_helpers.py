"""The suite's own waiting helpers (tests/conftest.py), against real sockets."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from ..conftest import wait_for_path


@pytest.mark.timeout(20)
def test_wait_for_path_waits_for_a_bound_stream_socket_to_listen(sockdir: Path) -> None:
    """A server's file appears at bind(), before listen(): a connect in between is
    refused. wait_for_path() returns only once it listens (the race a loaded run hit)."""
    path = sockdir / "late.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    listened = threading.Event()

    def listen_later() -> None:
        threading.Event().wait(0.3)  # (the window the race is about, made wide)
        server.listen()
        listened.set()

    t = threading.Thread(target=listen_later)
    t.start()
    try:
        wait_for_path(path)
        assert listened.is_set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
    finally:
        t.join()
        server.close()


def test_wait_for_path_does_not_wait_for_a_datagram_socket_or_a_file(sockdir: Path) -> None:
    dgram = sockdir / "d.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(dgram))
        wait_for_path(dgram, timeout=0.5)
    plain = sockdir / "file"
    plain.write_bytes(b"")
    wait_for_path(plain, timeout=0.5)
    with pytest.raises(TimeoutError):
        wait_for_path(sockdir / "never", timeout=0.1)
