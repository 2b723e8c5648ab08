"""One platform, chosen once: every backend importable and complete, one choice for all.

Only Linux runs here, so the other backends are checked for what can be
checked off their system: they import (their constants have fallbacks),
they provide every member of :class:`~afunix._platform.Backend`, and the
structures they decode are tested on byte tables in ``test_credstructs.py``.
mypy checks their signatures against ``Backend`` (``_platform/__init__.py``).
"""

from __future__ import annotations

import importlib
import socket

import pytest

from afunix import _address, _bind, _creds
from afunix._platform import NOSIGNAL, PLATFORM, Backend, detect

BACKENDS = ["linux", "bsd", "macos", "unsupported"]
MEMBERS = [name for name in (*Backend.__annotations__, *vars(Backend)) if not name.startswith("_")]


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_has_every_member(name: str) -> None:
    module = importlib.import_module(f"afunix._platform.{name}")
    missing = [m for m in MEMBERS if not hasattr(module, m)]
    assert not missing, f"_platform/{name}.py lacks {missing}"


def test_members_cover_the_protocol() -> None:
    assert {"peer", "credentials_item", "decode_cmsg", "find_socket_holder", "NAME"} <= set(MEMBERS)


def test_detect_is_linux_here_and_chosen_once() -> None:
    assert detect() == PLATFORM
    assert PLATFORM.name == "linux"
    assert PLATFORM.backend.NAME == "linux"
    # Credentials, addresses and bind ask the same object: they cannot disagree.
    assert _creds._backend is PLATFORM.backend
    assert _address.PLATFORM is PLATFORM
    assert _bind.PLATFORM is PLATFORM


def test_nosignal_is_msg_nosignal() -> None:
    assert NOSIGNAL == socket.MSG_NOSIGNAL != 0


def test_unsupported_backend_says_so() -> None:
    from afunix import UnsupportedFeature
    from afunix._platform import unsupported

    a, b = socket.socketpair()
    with a, b, pytest.raises(UnsupportedFeature, match="not supported on this system"):
        unsupported.peer(a, False)
    assert unsupported.find_socket_holder(b"/nowhere") is None


def _i32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little", signed=False) for v in values)


# pid 4321, uid 1001, euid 0, gid 20, ngroups 3 (+2 bytes padding), groups 5, 20, 1001.
CMSGCRED = _i32(4321, 1001, 0, 20) + b"\x03\x00\x00\x00" + _i32(5, 20, 1001) + bytes(4 * 13)


def test_each_backend_decodes_its_own_credentials_item() -> None:
    """Byte tables through each backend's decode_cmsg (little-endian, as this host)."""
    from afunix._platform import bsd, linux, macos, unsupported

    got = linux.decode_cmsg(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _i32(42, 1000, 100))
    assert got is not None and (got.pid, got.uid, got.gid) == (42, 1000, 100)
    assert linux.decode_cmsg(socket.SOL_SOCKET, socket.SCM_RIGHTS, _i32(3)) is None
    assert linux.credentials_item(1, 2, 3) == (
        socket.SOL_SOCKET,
        socket.SCM_CREDENTIALS,
        _i32(1, 2, 3),
    )
    got = bsd.decode_cmsg(socket.SOL_SOCKET, bsd.SCM_CREDS, CMSGCRED)
    assert got is not None and (got.pid, got.uid, got.gid) == (4321, 0, 5)
    assert bsd.decode_cmsg(socket.SOL_SOCKET + 1, bsd.SCM_CREDS, CMSGCRED) is None
    for other in (macos, unsupported):
        assert other.decode_cmsg(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, CMSGCRED) is None
        assert not other.is_pidfd_cmsg(socket.SOL_SOCKET, 4)
