"""Open flags of the broker protocol: checked, never passed through (sans-IO).

A client does not send its ``O_*`` bits to the broker. It sends *wire flags*,
the protocol's own bits, listed below; the broker refuses any bit it does not
know and any combination that contradicts itself, and builds the kernel's
``open`` flags from a whitelist. A flag the broker has never heard of can
therefore never reach ``open(2)``.

======== ======= =========================================================
bit      name    meaning (the ``open(2)`` flag it becomes)
======== ======= =========================================================
0x0001   READ    open for reading (``O_RDONLY``, or ``O_RDWR`` with WRITE)
0x0002   WRITE   open for writing (``O_WRONLY``, or ``O_RDWR`` with READ)
0x0004   APPEND  writes go to the end (``O_APPEND``); needs WRITE
0x0008   CREATE  create the file if missing (``O_CREAT``)
0x0010   EXCL    fail if it exists (``O_EXCL``); needs CREATE
0x0020   TRUNC   truncate to 0 bytes (``O_TRUNC``); needs WRITE
0x0040   DIR     a directory descriptor, for listing (``O_DIRECTORY``); READ only
0x0080   NOFOLLOW the last component must not be a symlink (``O_NOFOLLOW``)
0x0100   NONBLOCK ``O_NONBLOCK``
0x0200   SYNC    ``O_SYNC``; needs WRITE
0x0400   DSYNC   ``O_DSYNC``; needs WRITE
======== ======= =========================================================

Contradictions refused with ``EINVAL``: neither READ nor WRITE; TRUNC, APPEND,
SYNC or DSYNC without WRITE (read-only with truncate is the classic: POSIX
leaves it undefined and Linux truncates); EXCL without CREATE; DIR with
anything that writes or creates; a creation mode without CREATE (``openat2``
itself refuses that); mode bits beyond ``0o777`` (set-id and sticky bits are
never granted through the broker).

What each request needs from the policy (:func:`operations`): ``read``;
``list`` (DIR); ``write`` (WRITE, or TRUNC); ``append`` (WRITE with APPEND
and no TRUNC, also satisfied by ``write``); ``create`` (CREATE).
"""

from __future__ import annotations

import enum
import errno
import os
from typing import Final

from .. import AfunixError

__all__ = [
    "KNOWN",
    "MAX_MODE",
    "FlagError",
    "Wire",
    "check",
    "describe",
    "from_os_flags",
    "kernel_flags",
    "operations",
    "to_os_flags",
]


class Wire(enum.IntFlag):
    """The protocol's open flags (version 1). Values are part of the wire format."""

    READ = 0x0001
    WRITE = 0x0002
    APPEND = 0x0004
    CREATE = 0x0008
    EXCL = 0x0010
    TRUNC = 0x0020
    DIR = 0x0040
    NOFOLLOW = 0x0080
    NONBLOCK = 0x0100
    SYNC = 0x0200
    DSYNC = 0x0400


KNOWN: Final = int(
    Wire.READ
    | Wire.WRITE
    | Wire.APPEND
    | Wire.CREATE
    | Wire.EXCL
    | Wire.TRUNC
    | Wire.DIR
    | Wire.NOFOLLOW
    | Wire.NONBLOCK
    | Wire.SYNC
    | Wire.DSYNC
)

#: Largest creation mode a request may carry: permission bits only.
MAX_MODE: Final = 0o777


class FlagError(AfunixError, ValueError):
    """Flags (or a mode) that the broker refuses; ``errno`` says how open() would fail."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(err, reason)
        self.reason = reason


def describe(flags: int) -> list[str]:
    """Names of the wire flags set in *flags* (unknown bits as hex), for logs."""
    names = [f.name or "?" for f in Wire if flags & f]
    unknown = flags & ~KNOWN
    if unknown:
        names.append(f"{unknown:#x}")
    return names


def check(flags: int, mode: int) -> None:
    """Refuse unknown bits and contradictions; return quietly if the request makes sense."""
    if not 0 <= flags <= 0xFFFFFFFF:
        raise FlagError(errno.EINVAL, f"flags {flags} do not fit the 32-bit field")
    unknown = flags & ~KNOWN
    if unknown:
        raise FlagError(
            errno.EINVAL, f"unknown flag bits {unknown:#x} (this broker speaks protocol version 1)"
        )
    w = Wire(flags)
    if not w & (Wire.READ | Wire.WRITE):
        raise FlagError(errno.EINVAL, "neither READ nor WRITE requested")
    if not w & Wire.WRITE:
        for needs_write in (Wire.TRUNC, Wire.APPEND, Wire.SYNC, Wire.DSYNC):
            if w & needs_write:
                raise FlagError(
                    errno.EINVAL,
                    f"{needs_write.name} without WRITE is a contradiction "
                    "(read-only with truncate, append or sync)",
                )
    if w & Wire.EXCL and not w & Wire.CREATE:
        raise FlagError(errno.EINVAL, "EXCL without CREATE has no meaning")
    if w & Wire.DIR and w & (Wire.WRITE | Wire.CREATE | Wire.TRUNC | Wire.APPEND):
        raise FlagError(
            errno.EINVAL, "DIR (a directory descriptor) cannot be combined with writing or creating"
        )
    if not 0 <= mode <= 0xFFFFFFFF:
        raise FlagError(errno.EINVAL, f"mode {mode} does not fit the 32-bit field")
    if mode and not w & Wire.CREATE:
        raise FlagError(errno.EINVAL, f"a creation mode ({mode:04o}) without CREATE")
    if mode & ~MAX_MODE:
        raise FlagError(
            errno.EINVAL,
            f"mode {mode:o} has bits beyond 0777: set-id and sticky bits are never granted",
        )


def operations(flags: int) -> frozenset[str]:
    """The policy operations a (checked) request needs: read, list, write, append, create."""
    w = Wire(flags)
    ops: set[str] = set()
    if w & Wire.DIR:
        ops.add("list")
    elif w & Wire.READ:
        ops.add("read")
    if w & Wire.WRITE:
        ops.add("append" if w & Wire.APPEND and not w & Wire.TRUNC else "write")
    if w & Wire.CREATE:
        ops.add("create")
    return frozenset(ops)


_PLAIN: Final = (
    (Wire.APPEND, os.O_APPEND),
    (Wire.TRUNC, os.O_TRUNC),
    (Wire.DIR, os.O_DIRECTORY),
    (Wire.NOFOLLOW, os.O_NOFOLLOW),
    (Wire.NONBLOCK, os.O_NONBLOCK),
    (Wire.SYNC, os.O_SYNC),
    (Wire.DSYNC, os.O_DSYNC),
)


def kernel_flags(flags: int) -> int:
    """The ``open(2)`` flags for a checked request, without ``O_CREAT``/``O_EXCL``.

    Creation is done by :mod:`afunix.broker.confine`, which decides when to
    add ``O_CREAT | O_EXCL``. Always close-on-exec and ``O_NOCTTY``.
    """
    w = Wire(flags)
    if w & Wire.READ and w & Wire.WRITE:
        out = os.O_RDWR
    elif w & Wire.WRITE:
        out = os.O_WRONLY
    else:
        out = os.O_RDONLY
    for bit, osflag in _PLAIN:
        if w & bit:
            out |= osflag
    return out | os.O_CLOEXEC | os.O_NOCTTY


# ------------------------------------------------------------ client side
#: ``os`` flags a client may use that mean nothing across the socket:
#: received descriptors are always close-on-exec, and the broker never
#: acquires a controlling terminal.
_IGNORED: Final = os.O_CLOEXEC | os.O_NOCTTY | getattr(os, "O_LARGEFILE", 0)

_OS_TO_WIRE: Final = (
    (os.O_APPEND, Wire.APPEND),
    (os.O_CREAT, Wire.CREATE),
    (os.O_EXCL, Wire.EXCL),
    (os.O_TRUNC, Wire.TRUNC),
    (os.O_DIRECTORY, Wire.DIR),
    (os.O_NOFOLLOW, Wire.NOFOLLOW),
    (os.O_NONBLOCK, Wire.NONBLOCK),
    (os.O_SYNC, Wire.SYNC),
    (os.O_DSYNC, Wire.DSYNC),
)


def _os_flag_names(osflags: int, bits: int) -> str:
    """Names of the ``os.O_*`` flags in *osflags* that account for the leftover *bits*."""
    names = []
    for name in dir(os):
        if name.startswith("O_"):
            value = getattr(os, name)
            if isinstance(value, int) and value & bits and value & osflags == value:
                names.append(name)
    return "|".join(sorted(names)) or f"{bits:#x}"


def from_os_flags(osflags: int) -> int:
    """``os.O_*`` flags -> wire flags. Raises :class:`FlagError` for flags the broker lacks.

    ``O_SYNC`` contains ``O_DSYNC``'s bit on Linux, so it is matched first.
    """
    acc = osflags & os.O_ACCMODE
    if acc == os.O_RDONLY:
        wire = int(Wire.READ)
    elif acc == os.O_WRONLY:
        wire = int(Wire.WRITE)
    elif acc == os.O_RDWR:
        wire = int(Wire.READ | Wire.WRITE)
    else:
        raise FlagError(errno.EINVAL, f"access mode {acc} is not O_RDONLY, O_WRONLY or O_RDWR")
    rest = osflags & ~os.O_ACCMODE & ~_IGNORED
    for osflag, bit in _OS_TO_WIRE:
        if rest & osflag == osflag:
            wire |= bit
            rest &= ~osflag
    if rest:
        raise FlagError(
            errno.EINVAL,
            f"open flag(s) {_os_flag_names(osflags, rest)} cannot be asked of the broker "
            "(it supports read/write/append/create/excl/trunc/directory/nofollow/"
            "nonblock/sync/dsync)",
        )
    if wire & Wire.SYNC:
        wire &= ~int(Wire.DSYNC)  # O_SYNC includes O_DSYNC's bit on Linux
    return wire


def to_os_flags(flags: int) -> int:
    """Wire flags -> the equivalent ``os.O_*`` flags (for display and file modes)."""
    return (
        kernel_flags(flags) & ~(os.O_CLOEXEC | os.O_NOCTTY)
        | (os.O_CREAT if flags & Wire.CREATE else 0)
        | (os.O_EXCL if flags & Wire.EXCL else 0)
    )
