"""The audit log: one JSON object per line, one line per request (and per notable event).

Each request line has::

    {"time": "2025-01-31T12:00:00.123Z", "event": "open",
     "peer": {"pid": 4242, "uid": 65534, "gid": 65534, "groups": [65534],
              "exe": "/usr/bin/python3.11"},
     "request": {"id": 1, "path": "/srv/data/report.txt", "flags": ["READ"], "mode": "0000"},
     "decision": "granted", "errno": null, "reason": "granted by rule 'data'",
     "rule": "data", "file": {"dev": 2049, "ino": 131, "path": "/srv/data/report.txt",
     "created": false}, "resolver": "openat2"}

``decision`` is one of ``granted`` (a descriptor was sent), ``denied`` (the
policy, the flags, the path or the confinement said no), ``failed`` (allowed,
but the open itself failed, e.g. ``ENOENT``), ``invalid`` (a malformed
request), ``limited`` (a rate, connection or in-flight limit). ``errno`` is
the symbolic name sent to the client (``"EACCES"``), or ``null``.

Other events: ``connection-refused`` (too many connections from one uid),
``protocol-error`` (the connection was closed), ``timeout``, ``reload``,
``reload-failed``, ``start``, ``stop``.

Paths that are not UTF-8 are written with ``\\xNN`` escapes and very long ones
cut (their length is kept), so that every line stays valid, bounded JSON.
The file is opened ``O_APPEND`` with mode 0600 and each line is one
``write``. Writing is *fail-closed*: if a line cannot be written the broker
does not send the descriptor (:class:`AuditError`).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from typing import Any, Final

from .._errors import AfunixError

__all__ = ["AuditError", "AuditLog", "errno_name", "text"]

#: Longest path (in characters) written in full.
MAX_SHOWN: Final = 512


class AuditError(AfunixError):
    """The audit log could not be written (the request it was about is refused)."""


def errno_name(err: int | None) -> str | None:
    """``"EACCES"`` for 13; ``None`` for 0/None."""
    if not err:
        return None
    return errno.errorcode.get(err, str(err))


def text(raw: bytes | str, limit: int = MAX_SHOWN) -> str:
    """Bytes as readable, bounded text: UTF-8 with ``\\xNN`` escapes, cut past *limit*."""
    shown = raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")
    if len(shown) > limit:
        size = len(raw)
        return f"{shown[:limit]}...({size} {'bytes' if isinstance(raw, bytes) else 'chars'})"
    return shown


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class AuditLog:
    """Where audit lines go: a file path, ``"-"`` for standard error, or nowhere (``None``).

    Thread-safe. :meth:`reopen` (on ``SIGHUP``) follows log rotation.
    """

    def __init__(self, target: str | os.PathLike[str] | None) -> None:
        self.target = None if target is None else os.fspath(target)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._owned = False
        self.lines = 0
        self._open()

    def _open(self) -> None:
        if self.target is None:
            return
        if self.target == "-":
            self._fd = sys.stderr.fileno()
            self._owned = False
            return
        try:
            self._fd = os.open(
                self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise AuditError(
                exc.errno or errno.EIO,
                f"cannot open the audit log {self.target!r}: {exc.strerror}",
                self.target,
            ) from exc
        self._owned = True

    def reopen(self) -> None:
        """Close and open the file again (after ``logrotate`` moved it)."""
        with self._lock:
            self._close_locked()
            self._open()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one line; returns the record. Raises :class:`AuditError` if it cannot."""
        rec: dict[str, Any] = {"time": _now(), "event": event, **fields}
        if self.target is None:
            return rec
        line = (json.dumps(rec, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise AuditError(errno.EBADF, "the audit log is closed")
            view = memoryview(line)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:
                raise AuditError(
                    exc.errno or errno.EIO,
                    f"cannot write the audit log {self.target!r}: {exc.strerror}",
                ) from exc
            self.lines += 1
        return rec

    def _close_locked(self) -> None:
        if self._fd is not None and self._owned:
            os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()
