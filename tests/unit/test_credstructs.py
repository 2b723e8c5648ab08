"""Byte tables for every credential structure afunix decodes (UNP 15.8).

The BSD and macOS structures cannot be produced on this Linux machine, so
their layouts are checked against bytes written out by hand from the
systems' headers (offsets in ``afunix._credstructs``'s docstring). Each table
row is: the bytes, little-endian unless it says otherwise, and what must come
out. The Linux ``ucred`` row is also checked against the real kernel.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from afunix._credstructs import (
    CMSGCRED_SIZE,
    MACOS_XUCRED_SIZE,
    CredentialsStructError,
    DecodedCredentials,
    build_ucred,
    parse_cmsgcred,
    parse_freebsd_sockcred,
    parse_freebsd_sockcred2,
    parse_freebsd_xucred,
    parse_macos_xucred,
    parse_netbsd_sockcred,
    parse_openbsd_sockpeercred,
    parse_pid,
    parse_ucred,
    parse_unpcbid,
)


def hx(text: str) -> bytes:
    """Hex with spaces and ``|`` as readability separators."""
    return bytes.fromhex(text.replace("|", " "))


Z4 = "00000000"  # one zero 32-bit word


# ------------------------------------------------------------------ Linux
UCRED_LE = hx("d2040000 | feff0000 | 64000000")  # pid 1234, uid 65534, gid 100
UCRED_BE = hx("000004d2 | 0000fffe | 00000064")


def test_ucred_table() -> None:
    want = DecodedCredentials("ucred", 1234, 65534, 100)
    assert parse_ucred(UCRED_LE, "little") == want
    assert parse_ucred(UCRED_BE, "big") == want
    assert build_ucred(1234, 65534, 100, "little") == UCRED_LE
    assert build_ucred(1234, 65534, 100, "big") == UCRED_BE


def test_ucred_pid_zero_means_unknown() -> None:
    assert parse_ucred(hx("00000000 e8030000 e8030000"), "little").pid is None


def test_ucred_matches_the_kernel() -> None:
    a, b = socket.socketpair()
    with a, b:
        raw = a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    got = parse_ucred(raw)
    assert (got.pid, got.uid, got.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_ucred_too_short() -> None:
    with pytest.raises(CredentialsStructError) as info:
        parse_ucred(UCRED_LE[:11])
    assert info.value.errno == errno.EPROTO
    assert isinstance(info.value, ValueError)
    assert "struct ucred is 11 bytes" in str(info.value)


@pytest.mark.parametrize("ids", [(-1, 0, 0), (1, -1, 0), (1, 0, 2**32), (2**31, 0, 0)])
def test_build_ucred_out_of_range(ids: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_ucred(*ids)


# --------------------------------------------- FreeBSD cmsgcred (the seed)
# pid 4321, uid 1001 (real), euid 0, gid 20 (real), ngroups 3 (+2 bytes padding),
# groups 5, 20, 1001 (groups[0] is the effective gid), 13 unused slots.
CMSGCRED_LE = hx(
    "e1100000 | e9030000 | 00000000 | 14000000 | 0300 0000 | 05000000 14000000 e9030000 |" + Z4 * 13
)
CMSGCRED_BE = hx(
    "000010e1 | 000003e9 | 00000000 | 00000014 | 0003 0000 | 00000005 00000014 000003e9 |" + Z4 * 13
)


def test_cmsgcred_size_is_the_seeds_struct() -> None:
    # 4 ids + short + padding + CMGROUP_MAX (16) gids
    assert CMSGCRED_SIZE == len(CMSGCRED_LE) == 84


@pytest.mark.parametrize(("data", "order"), [(CMSGCRED_LE, "little"), (CMSGCRED_BE, "big")])
def test_cmsgcred_table(data: bytes, order: str) -> None:
    got = parse_cmsgcred(data, order)  # type: ignore[arg-type]
    assert got == DecodedCredentials(
        "cmsgcred", 4321, 0, 5, (5, 20, 1001), real_uid=1001, real_gid=20
    )


@pytest.mark.parametrize(
    ("ngroups", "message"), [("1100", "claims 17 groups"), ("ffff", "claims -1 groups")]
)
def test_cmsgcred_bad_group_count(ngroups: str, message: str) -> None:
    data = bytearray(CMSGCRED_LE)
    data[16:18] = bytes.fromhex(ngroups)
    with pytest.raises(CredentialsStructError, match=message):
        parse_cmsgcred(bytes(data), "little")


def test_cmsgcred_short() -> None:
    with pytest.raises(CredentialsStructError, match="83 bytes, expected at least 84"):
        parse_cmsgcred(CMSGCRED_LE[:83], "little")


# ------------------------------------------------- FreeBSD/DragonFly xucred
# version 0, uid 1001, ngroups 2 (+pad), groups 1001, 0, 14 unused,
# then the union { void *; pid_t cr_pid; }: at 80 on LP64 (after 4 pad bytes),
# at 76 on 32-bit systems.
XUCRED_HEAD_LE = "00000000 | e9030000 | 0200 0000 | e9030000 00000000 |" + Z4 * 14
XUCRED_LP64_LE = hx(XUCRED_HEAD_LE + "| 00000000 | 09030000 00000000")  # pid 777
XUCRED_ILP32_LE = hx(XUCRED_HEAD_LE + "| 09030000")
XUCRED_DRAGONFLY = hx(XUCRED_HEAD_LE + "| 00000000 | 00000000 00000000")  # no pid
XUCRED_LP64_BE = hx(
    "00000000 | 000003e9 | 0002 0000 | 000003e9 00000000 |"
    + Z4 * 14
    + "| 00000000 | 00000309 00000000"
)


@pytest.mark.parametrize(
    ("data", "order", "ptr", "pid"),
    [
        (XUCRED_LP64_LE, "little", 8, 777),
        (XUCRED_ILP32_LE, "little", 4, 777),
        (XUCRED_LP64_BE, "big", 8, 777),
        (XUCRED_DRAGONFLY, "little", 8, None),
    ],
)
def test_freebsd_xucred_table(data: bytes, order: str, ptr: int, pid: int | None) -> None:
    assert len(data) == (88 if ptr == 8 else 80)
    got = parse_freebsd_xucred(data, order, pointer_size=ptr)  # type: ignore[arg-type]
    assert got == DecodedCredentials("xucred", pid, 1001, 1001, (1001, 0))


def test_xucred_version_checked() -> None:
    data = bytearray(XUCRED_LP64_LE)
    data[0] = 1
    with pytest.raises(CredentialsStructError, match="cr_version 1"):
        parse_freebsd_xucred(bytes(data), "little")


def test_xucred_needs_a_group() -> None:
    data = bytearray(XUCRED_LP64_LE)
    data[8:10] = b"\0\0"
    with pytest.raises(CredentialsStructError, match="no groups"):
        parse_freebsd_xucred(bytes(data), "little")


def test_xucred_lp64_is_longer_than_ilp32() -> None:
    with pytest.raises(CredentialsStructError, match="80 bytes, expected at least 88"):
        parse_freebsd_xucred(XUCRED_ILP32_LE, "little", pointer_size=8)
    with pytest.raises(ValueError, match="pointer_size"):
        parse_freebsd_xucred(XUCRED_LP64_LE, "little", pointer_size=2)


# ------------------------------------------------------------ macOS xucred
# version 0, uid 501, ngroups 3 (+pad), groups 20, 12, 61, 13 unused; 76 bytes, no pid.
MACOS_XUCRED = hx("00000000 | f5010000 | 0300 0000 | 14000000 0c000000 3d000000 |" + Z4 * 13)


def test_macos_xucred_table() -> None:
    assert len(MACOS_XUCRED) == MACOS_XUCRED_SIZE == 76
    assert parse_macos_xucred(MACOS_XUCRED, "little") == DecodedCredentials(
        "xucred", None, 501, 20, (20, 12, 61)
    )


def test_macos_xucred_too_many_groups() -> None:
    data = bytearray(MACOS_XUCRED)
    data[8:10] = b"\x11\x00"
    with pytest.raises(CredentialsStructError, match="claims 17 groups"):
        parse_macos_xucred(bytes(data), "little")


def test_macos_local_peerpid() -> None:
    assert parse_pid(hx("39300000"), "little") == 12345
    assert parse_pid(hx("00003039"), "big") == 12345
    assert parse_pid(hx("00000000"), "little") is None


# ------------------------------------------------------ NetBSD and OpenBSD
def test_netbsd_unpcbid_table() -> None:
    # pid 100, euid 1000, egid 100
    data = hx("64000000 | e8030000 | 64000000")
    assert parse_unpcbid(data, "little") == DecodedCredentials("unpcbid", 100, 1000, 100)


def test_openbsd_sockpeercred_order_is_uid_gid_pid() -> None:
    data = hx("e8030000 | 0a000000 | 92100000")  # uid 1000, gid 10, pid 4242
    assert parse_openbsd_sockpeercred(data, "little") == DecodedCredentials(
        "sockpeercred", 4242, 1000, 10
    )


# --------------------------------------------------------- sockcred family
def test_freebsd_sockcred_table() -> None:
    # uid 1001, euid 1001, gid 20, egid 20, ngroups 2, groups 20, 0
    data = hx("e9030000 e9030000 14000000 14000000 | 02000000 | 14000000 00000000")
    assert parse_freebsd_sockcred(data, "little") == DecodedCredentials(
        "sockcred", None, 1001, 20, (20, 0), real_uid=1001, real_gid=20
    )


def test_sockcred_groups_past_the_end() -> None:
    data = hx("e9030000 e9030000 14000000 14000000 | 03000000 | 14000000 00000000")
    with pytest.raises(CredentialsStructError, match="with 3 groups is 28 bytes"):
        parse_freebsd_sockcred(data, "little")


def test_freebsd_sockcred2_table() -> None:
    # version 0, pid 555, uid 1001, euid 0, gid 20, egid 0, ngroups 1, groups 0
    data = hx("00000000 2b020000 | e9030000 00000000 14000000 00000000 | 01000000 | 00000000")
    assert parse_freebsd_sockcred2(data, "little") == DecodedCredentials(
        "sockcred2", 555, 0, 0, (0,), real_uid=1001, real_gid=20
    )
    bad = b"\x01" + data[1:]
    with pytest.raises(CredentialsStructError, match="sc_version 1"):
        parse_freebsd_sockcred2(bad, "little")


def test_netbsd_sockcred_has_the_pid_first() -> None:
    # pid 77, uid 1000, euid 1000, gid 100, egid 100, ngroups 1, groups 100
    data = hx("4d000000 | e8030000 e8030000 64000000 64000000 | 01000000 | 64000000")
    assert parse_netbsd_sockcred(data, "little") == DecodedCredentials(
        "sockcred", 77, 1000, 100, (100,), real_uid=1000, real_gid=100
    )


def test_bad_byteorder() -> None:
    with pytest.raises(ValueError, match="byteorder"):
        parse_ucred(UCRED_LE, "middle")  # type: ignore[arg-type]
