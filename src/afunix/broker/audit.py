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
``reload-failed``, ``start``, ``stop``, ``suppressed`` (refusals counted, not
written: see below) and ``audit-lost`` (lines that could not be written).

**Bounded lines.** Every string is written as readable text (bytes that are
not UTF-8, and lone surrogates, as ``\\xNN`` escapes) and cut past
:data:`MAX_SHOWN` characters, its length kept; lists past :data:`MAX_ITEMS`
items are cut too. Whatever the fields, no line is longer than
:data:`MAX_LINE` bytes (``PIPE_BUF``, so even a pipe gets it in one piece):
a longer one is written again with shorter strings, and failing that with its
scalar fields only, and says so (``"cut": <original size>``).

**Refusals are budgeted per uid.** :meth:`AuditLog.refusal` writes a line
only while the uid has written fewer than :data:`REFUSAL_BYTES` bytes of
refusals in its current :data:`REFUSAL_WINDOW`-second window; past that the
refusals are counted by kind, and one ``suppressed`` line per uid and window
gives the counts (when the window is over: with the next line written, or at
:meth:`AuditLog.close`). So one uid adds at most ``REFUSAL_BYTES + MAX_LINE``
bytes per window, however fast it asks. Grants (:meth:`AuditLog.record`)
are never budgeted: every descriptor that leaves the broker has its line.

**Fail-closed.** The file is opened ``O_APPEND`` with mode 0600 and each
line is one ``write``. If a line cannot be written (a full disk) the call
raises :class:`AuditError`: the broker then does not send the descriptor.
Lines that could not be written are counted and reported by an
``audit-lost`` line as soon as writing works again.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .. import AfunixError

__all__ = [
    "MAX_ITEMS",
    "MAX_LINE",
    "MAX_SHOWN",
    "REFUSAL_BYTES",
    "REFUSAL_WINDOW",
    "AuditError",
    "AuditLog",
    "errno_name",
    "text",
]

#: Longest string (in characters) written in full; longer ones are cut, their length kept.
MAX_SHOWN: Final = 512
#: Longest list written in full.
MAX_ITEMS: Final = 64
#: Longest line in bytes, newline included (``PIPE_BUF``: one atomic write even to a pipe).
MAX_LINE: Final = 4096
#: Bytes of refusal lines one uid may have written per window ...
REFUSAL_BYTES: Final = 16384
#: ... of this many seconds; past that its refusals are only counted.
REFUSAL_WINDOW: Final = 60.0
#: Strings are cut this short when a line is still too long.
_SHORT = 64
#: Most kinds of refusal counted apart in a ``suppressed`` line (the rest as ``other``).
_MAX_KINDS = 32


class AuditError(AfunixError):
    """The audit log could not be written (the request it was about is refused)."""


def errno_name(err: int | None) -> str | None:
    """``"EACCES"`` for 13; ``None`` for 0/None."""
    if not err:
        return None
    return errno.errorcode.get(err, str(err))


def text(raw: bytes | str, limit: int = MAX_SHOWN) -> str:
    """Bytes as readable, bounded text: UTF-8 with ``\\xNN`` escapes, cut past *limit*.

    A ``str`` may hold lone surrogates (``os.fsdecode`` of a name that is not
    UTF-8): they become the same ``\\xNN`` escapes, so the result always encodes.
    """
    shown = raw[: limit + 1] if isinstance(raw, str) else raw[: 4 * limit + 4]
    if isinstance(shown, str):
        try:
            shown.encode()
        except UnicodeEncodeError:
            try:  # surrogates from os.fsdecode() stand for the bytes that were not UTF-8
                raw_bytes = shown.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # other lone surrogates
                raw_bytes = shown.encode("utf-8", "surrogatepass")
            shown = raw_bytes.decode("utf-8", "backslashreplace")
    else:
        shown = shown.decode("utf-8", "backslashreplace")
    if len(shown) > limit:
        size = len(raw)
        return f"{shown[:limit]}...({size} {'bytes' if isinstance(raw, bytes) else 'chars'})"
    return shown


def _bounded(value: Any, limit: int, items: int) -> Any:
    """*value* with every string made safe and cut at *limit*, every list at *items*."""
    if isinstance(value, str | bytes):
        return text(value, limit)
    if isinstance(value, dict):
        return {str(k)[:limit]: _bounded(v, limit, items) for k, v in value.items()}
    if isinstance(value, list | tuple):
        out = [_bounded(v, limit, items) for v in value[:items]]
        if len(value) > items:
            out.append(f"...({len(value)} items)")
        return out
    if value is None or isinstance(value, bool | int | float):
        return value
    return text(repr(value), limit)


def _dump(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode()


def _line(rec: dict[str, Any]) -> bytes:
    """One JSON line of at most :data:`MAX_LINE` bytes, whatever *rec* holds."""
    line = _dump(_bounded(rec, MAX_SHOWN, MAX_ITEMS))
    if len(line) <= MAX_LINE:
        return line
    size = len(line)
    line = _dump({**_bounded(rec, _SHORT, 8), "cut": size})
    if len(line) <= MAX_LINE:
        return line
    # Scalars only, as many as fit (the caller chose the keys; there may be many).
    small: dict[str, Any] = {"cut": size}
    for key, value in rec.items():
        if isinstance(value, dict | list | tuple):
            continue
        small[str(key)[:_SHORT]] = _bounded(value, _SHORT, 0)
        if len(_dump(small)) > MAX_LINE:
            del small[str(key)[:_SHORT]]
            break
    return _dump(small)


def _now() -> str:
    return _stamp(time.time())


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class _Window:
    """One uid's refusal budget: since *start* (monotonic), *spent* bytes written."""

    start: float
    wall: float
    spent: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class AuditLog:
    """Where audit lines go: a file path, ``"-"`` for standard error, or nowhere (``None``).

    Thread-safe. :meth:`reopen` (on ``SIGHUP``) follows log rotation.

    Args:
        target: the file (created 0600, appended to), ``"-"`` or ``None``.
        refusal_bytes, refusal_window: the per-uid budget of :meth:`refusal`
            lines (see the module docs).
        clock: a monotonic clock (tests).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | None,
        *,
        refusal_bytes: int = REFUSAL_BYTES,
        refusal_window: float = REFUSAL_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = None if target is None else os.fspath(target)
        self.refusal_bytes = refusal_bytes
        self.refusal_window = refusal_window
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._owned = False
        self._windows: dict[int, _Window] = {}
        self._next_due = float("inf")
        self._torn = False  # a line was cut short by a failed write
        self._lost_since: float | None = None
        #: Lines written.
        self.lines = 0
        #: Lines that could not be written since the last one that could (0: none).
        self.lost = 0
        #: Refusal lines counted but not written (all uids, all windows).
        self.suppressed = 0
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
        line = _line(rec)
        with self._lock:
            self._flush_due_locked(self._clock())
            self._write_locked(line)
        return rec

    def refusal(self, uid: int, kind: str, event: str, **fields: Any) -> bool:
        """Write a line about a refusal to *uid*, within its budget; else count it as *kind*.

        Returns whether the line was written. Raises :class:`AuditError` if it
        should have been and could not (the refusal stands either way).
        """
        if self.target is None:
            return False
        line = _line({"time": _now(), "event": event, **fields})
        with self._lock:
            now = self._clock()
            self._flush_due_locked(now)
            window = self._windows.get(uid)
            if window is None:
                window = self._windows[uid] = _Window(now, time.time())
                self._next_due = min(self._next_due, now + self.refusal_window)
            if window.spent + len(line) > self.refusal_bytes:
                if kind not in window.counts and len(window.counts) >= _MAX_KINDS:
                    kind = "other"
                window.counts[kind] = window.counts.get(kind, 0) + 1
                self.suppressed += 1
                return False
            window.spent += len(line)
            self._write_locked(line)
            return True

    def flush(self) -> None:
        """Write the ``suppressed`` lines of windows that are over (:meth:`close` does too)."""
        with self._lock:
            self._flush_due_locked(self._clock())

    def _flush_due_locked(self, now: float, everything: bool = False) -> None:
        if now < self._next_due and not everything:
            return
        self._next_due = float("inf")
        for uid, window in list(self._windows.items()):
            end = window.start + self.refusal_window
            if now < end and not everything:
                self._next_due = min(self._next_due, end)
                continue
            del self._windows[uid]
            if not window.counts:
                continue
            rec = {
                "time": _now(),
                "event": "suppressed",
                "peer": {"uid": uid},
                "since": _stamp(window.wall),
                "seconds": round(min(now - window.start, self.refusal_window), 3),
                "lines": sum(window.counts.values()),
                "counts": window.counts,
                "reason": (
                    f"uid {uid} had {window.spent} bytes of refusal lines written in this "
                    f"window (budget {self.refusal_bytes} per {self.refusal_window:g}s); "
                    "the rest are counted here by kind"
                ),
            }
            # A lost summary is counted like any lost line; it never hides the caller's line.
            try:
                self._write_locked(_line(rec))
            except AuditError:
                continue

    def _write_locked(self, line: bytes) -> None:
        if self._fd is None:
            raise AuditError(errno.EBADF, "the audit log is closed")
        if self.lost:
            lost = _line(
                {
                    "time": _now(),
                    "event": "audit-lost",
                    "lines": self.lost,
                    "since": _stamp(self._lost_since or time.time()),
                    "reason": f"{self.lost} line(s) could not be written to the audit log",
                }
            )
            line = lost + line
        if self._torn:
            line = b"\n" + line  # the cut line stays on a line of its own
        view = memoryview(line)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._torn = self._torn or len(view) < len(line)
            if not self.lost:
                self._lost_since = time.time()
            self.lost += 1
            raise AuditError(
                exc.errno or errno.EIO,
                f"cannot write the audit log {self.target!r}: {exc.strerror}",
            ) from exc
        self._torn = False
        self.lines += 1
        self.lost = 0

    def _close_locked(self) -> None:
        if self._fd is not None and self._owned:
            os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._flush_due_locked(self._clock(), everything=True)
            self._close_locked()
