"""``sd_notify``: tell the service manager how the server is doing.

The manager passes ``NOTIFY_SOCKET`` (a datagram socket: a path, or ``@name`` in the
abstract namespace). Each notification is one datagram of ``KEY=VALUE`` lines:
``READY=1`` once accepting, ``STOPPING=1`` on shutdown, ``STATUS=...`` free text,
``MAINPID=``, and ``FDSTORE=1`` with descriptors attached (``SCM_RIGHTS``) to park
listening sockets with the manager across restarts (``FDNAME=`` names them).

Without ``NOTIFY_SOCKET`` every call is a no-op that returns ``False``, so servers
can notify unconditionally.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping, Sequence

from ._address import Address, AddressKind
from ._cmsg import fd_numbers, rights
from ._errors import AfunixError
from ._platform import NOSIGNAL

__all__ = ["format_notification", "notify"]


def format_notification(fields: Mapping[str, str | int]) -> bytes:
    """``{"READY": 1, "STATUS": "ok"}`` -> ``b"READY=1\\nSTATUS=ok\\n"`` (no I/O)."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key or "=" in key or "\n" in key or "\n" in text:
            raise ValueError(
                f"bad notification field {key!r}={text!r}: no '=' in keys, no newlines"
            )
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode()


def notify(
    fields: Mapping[str, str | int] | str,
    *,
    fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> bool:
    """Send one notification to ``$NOTIFY_SOCKET``; return whether one was sent.

    ``fields`` is a mapping or an already formatted ``"READY=1\\nSTATUS=..."``.
    ``fds`` go along as ``SCM_RIGHTS`` (use with ``FDSTORE=1``).
    """
    environ = os.environ if env is None else env
    target = environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    payload = (
        (fields if fields.endswith("\n") else fields + "\n").encode()
        if isinstance(fields, str)
        else format_notification(fields)
    )
    addr = Address.parse(target)
    if addr.kind not in (AddressKind.PATH, AddressKind.ABSTRACT):
        raise AfunixError(errno.EINVAL, f"NOTIFY_SOCKET={target!r} is not a Unix socket address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        ancillary = [rights(fd_numbers(fds))] if fds else []
        try:
            sock.sendmsg([payload], ancillary, NOSIGNAL, addr.sockaddr)
        except OSError as exc:
            raise AfunixError(
                exc.errno or errno.EIO,
                f"cannot notify the service manager at NOTIFY_SOCKET={target}: {exc.strerror}",
            ) from exc
    return True
