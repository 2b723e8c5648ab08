"""Open flags: checked against a whitelist, contradictions refused (tables)."""

from __future__ import annotations

import errno
import os

import pytest

from afunix.broker import flags as F
from afunix.broker.flags import Wire

R, W = Wire.READ, Wire.WRITE

VALID = [
    (R, 0),
    (W, 0),
    (R | W, 0),
    (W | Wire.APPEND, 0),
    (W | Wire.TRUNC, 0),
    (W | Wire.APPEND | Wire.TRUNC, 0),
    (W | Wire.CREATE, 0o644),
    (W | Wire.CREATE | Wire.EXCL, 0o600),
    (R | Wire.CREATE, 0),
    (R | Wire.DIR, 0),
    (R | Wire.DIR | Wire.NOFOLLOW, 0),
    (R | Wire.NONBLOCK, 0),
    (W | Wire.SYNC | Wire.DSYNC, 0),
]

INVALID = [
    (0, 0, "neither READ nor WRITE"),
    (Wire.APPEND, 0, "neither READ nor WRITE"),
    (R | Wire.TRUNC, 0, "TRUNC without WRITE"),
    (R | Wire.APPEND, 0, "APPEND without WRITE"),
    (R | Wire.SYNC, 0, "SYNC without WRITE"),
    (R | Wire.DSYNC, 0, "DSYNC without WRITE"),
    (W | Wire.EXCL, 0, "EXCL without CREATE"),
    (R | Wire.DIR | W, 0, "cannot be combined"),
    (R | Wire.DIR | Wire.CREATE, 0, "cannot be combined"),
    (R | 0x800, 0, "unknown flag bits 0x800"),
    (R | 0x80000000, 0, "unknown flag bits 0x80000000"),
    (R, 0o644, "without CREATE"),
    (W | Wire.CREATE, 0o4755, "beyond 0777"),
    (W | Wire.CREATE, 0o1777, "beyond 0777"),
    (W | Wire.CREATE, 1 << 40, "does not fit"),
    (1 << 33, 0, "do not fit"),
]


@pytest.mark.parametrize(("flags", "mode"), VALID)
def test_valid(flags: int, mode: int) -> None:
    F.check(int(flags), mode)


@pytest.mark.parametrize(("flags", "mode", "why"), INVALID)
def test_invalid(flags: int, mode: int, why: str) -> None:
    with pytest.raises(F.FlagError, match=why) as info:
        F.check(int(flags), mode)
    assert info.value.errno == errno.EINVAL


OPS = [
    (R, {"read"}),
    (R | Wire.DIR, {"list"}),
    (W, {"write"}),
    (R | W, {"read", "write"}),
    (W | Wire.APPEND, {"append"}),
    (W | Wire.APPEND | Wire.TRUNC, {"write"}),
    (W | Wire.TRUNC, {"write"}),
    (W | Wire.APPEND | Wire.CREATE | Wire.EXCL, {"append", "create"}),
    (R | Wire.CREATE, {"read", "create"}),
]


@pytest.mark.parametrize(("flags", "ops"), OPS)
def test_operations(flags: int, ops: set[str]) -> None:
    assert F.operations(int(flags)) == ops


KERNEL = [
    (R, os.O_RDONLY),
    (W, os.O_WRONLY),
    (R | W, os.O_RDWR),
    (W | Wire.APPEND | Wire.TRUNC, os.O_WRONLY | os.O_APPEND | os.O_TRUNC),
    (R | Wire.DIR | Wire.NOFOLLOW, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW),
    (W | Wire.SYNC, os.O_WRONLY | os.O_SYNC),
    (W | Wire.DSYNC | Wire.NONBLOCK, os.O_WRONLY | os.O_DSYNC | os.O_NONBLOCK),
    # CREATE/EXCL are left to confine, which decides when to add O_CREAT|O_EXCL.
    (W | Wire.CREATE | Wire.EXCL, os.O_WRONLY),
]


@pytest.mark.parametrize(("flags", "osflags"), KERNEL)
def test_kernel_flags_are_built_from_the_whitelist(flags: int, osflags: int) -> None:
    assert F.kernel_flags(int(flags)) == osflags | os.O_CLOEXEC | os.O_NOCTTY


CLIENT = [
    (os.O_RDONLY, R),
    (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, W | Wire.CREATE | Wire.TRUNC),
    (os.O_RDWR | os.O_APPEND, R | W | Wire.APPEND),
    (os.O_WRONLY | os.O_CREAT | os.O_EXCL, W | Wire.CREATE | Wire.EXCL),
    (os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, R | Wire.DIR),
    (os.O_WRONLY | os.O_SYNC, W | Wire.SYNC),
    (os.O_WRONLY | os.O_DSYNC, W | Wire.DSYNC),
    (os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW, R | Wire.NONBLOCK | Wire.NOFOLLOW),
]


@pytest.mark.parametrize(("osflags", "wire"), CLIENT)
def test_from_os_flags(osflags: int, wire: int) -> None:
    assert F.from_os_flags(osflags) == wire
    assert F.to_os_flags(F.from_os_flags(osflags)) == osflags & ~(os.O_CLOEXEC | os.O_NOCTTY)


@pytest.mark.parametrize(
    ("osflags", "name"),
    [
        (os.O_RDONLY | os.O_PATH, "O_PATH"),
        (os.O_RDWR | os.O_TMPFILE, "O_TMPFILE"),
        (os.O_RDONLY | os.O_NOATIME, "O_NOATIME"),
        (os.O_RDONLY | os.O_ASYNC, "O_ASYNC"),
        (os.O_RDONLY | os.O_DIRECT, "O_DIRECT"),
        (os.O_ACCMODE, "access mode"),
    ],
)
def test_unknown_os_flags_are_refused_by_the_client(osflags: int, name: str) -> None:
    with pytest.raises(F.FlagError, match=name):
        F.from_os_flags(osflags)


def test_describe() -> None:
    assert F.describe(int(R | Wire.DIR)) == ["READ", "DIR"]
    assert F.describe(int(R) | 0x10000) == ["READ", "0x10000"]


def test_wire_values_are_the_documented_ones() -> None:
    """The numbers are part of the protocol: docs/broker.md lists them."""
    assert {f.name: f.value for f in Wire} == {
        "READ": 0x1,
        "WRITE": 0x2,
        "APPEND": 0x4,
        "CREATE": 0x8,
        "EXCL": 0x10,
        "TRUNC": 0x20,
        "DIR": 0x40,
        "NOFOLLOW": 0x80,
        "NONBLOCK": 0x100,
        "SYNC": 0x200,
        "DSYNC": 0x400,
    }
    assert F.KNOWN == 0x7FF
