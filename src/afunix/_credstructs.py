"""Sans-IO layouts of the kernel credential structures (UNP 15.8).

Every system hands out credentials in its own structure. This module turns
those structures' bytes into one :class:`DecodedCredentials` and never
touches a socket, so the layouts of systems this code does not run on
(FreeBSD, DragonFly, NetBSD, OpenBSD, macOS) are still tested, on tables of
bytes (``tests/unit/test_credstructs.py``).

The structures, with offsets for the usual LP64 ABI (``int`` and the
``*id_t`` types are 4 bytes, ``short`` is 2, pointers are 8):

``struct ucred`` (Linux ``SO_PEERCRED``, ``SCM_CREDENTIALS``), 12 bytes::

    pid_t pid @0; uid_t uid @4; gid_t gid @8

``struct cmsgcred`` (FreeBSD/DragonFly ``SCM_CREDS`` sent by the sender;
the structure of the seed, section 15.8), 84 bytes::

    pid_t cmcred_pid @0; uid_t cmcred_uid @4 (real); uid_t cmcred_euid @8;
    gid_t cmcred_gid @12 (real); short cmcred_ngroups @16; (2 bytes pad);
    gid_t cmcred_groups[CMGROUP_MAX=16] @20   -- groups[0] is the effective gid

``struct xucred`` (FreeBSD/DragonFly ``LOCAL_PEERCRED``), 88 bytes on LP64,
80 on 32-bit systems::

    u_int cr_version @0 (XUCRED_VERSION = 0); uid_t cr_uid @4 (effective);
    short cr_ngroups @8; (pad); gid_t cr_groups[XU_NGROUPS=16] @12;
    union { void *_cr_unused1; pid_t cr_pid; } @80 (LP64) / @76 (ILP32)

  ``cr_groups[0]`` is the effective gid. ``cr_pid`` exists since FreeBSD 13;
  older FreeBSD and DragonFly leave the union as an unused pointer (zero).

``struct xucred`` (macOS ``LOCAL_PEERCRED``), 76 bytes, no pid (macOS gives it
through ``LOCAL_PEERPID``, a plain ``pid_t``)::

    u_int cr_version @0; uid_t cr_uid @4; short cr_ngroups @8; (pad);
    gid_t cr_groups[NGROUPS=16] @12

``struct unpcbid`` (NetBSD ``LOCAL_PEEREID``), 12 bytes::

    pid_t unp_pid @0; uid_t unp_euid @4; gid_t unp_egid @8

``struct sockpeercred`` (OpenBSD ``SO_PEERCRED``), 12 bytes -- note the order::

    uid_t uid @0; gid_t gid @4; pid_t pid @8

``struct sockcred`` (per-message credentials after ``LOCAL_CREDS``), variable
size, ``sc_ngroups`` gids at the end::

    FreeBSD: uid_t sc_uid, sc_euid; gid_t sc_gid, sc_egid; int sc_ngroups; gid_t sc_groups[]
    NetBSD:  pid_t sc_pid; uid_t sc_uid, sc_euid; gid_t sc_gid, sc_egid; int sc_ngroups; ...

``struct sockcred2`` (FreeBSD 13+ ``SCM_CREDS2``)::

    int sc_version (0); pid_t sc_pid; uid_t sc_uid, sc_euid; gid_t sc_gid, sc_egid;
    int sc_ngroups; gid_t sc_groups[]

All fields are in the byte order of the machine that produced them
(``byteorder`` defaults to this machine's).
"""

from __future__ import annotations

import errno
import struct
import sys
from dataclasses import dataclass
from typing import Literal

from ._errors import AfunixError

__all__ = [
    "CMGROUP_MAX",
    "CMSGCRED_SIZE",
    "MACOS_XUCRED_SIZE",
    "UCRED_SIZE",
    "XUCRED_VERSION",
    "XU_NGROUPS",
    "CredentialsStructError",
    "DecodedCredentials",
    "build_ucred",
    "parse_cmsgcred",
    "parse_freebsd_sockcred",
    "parse_freebsd_sockcred2",
    "parse_freebsd_xucred",
    "parse_macos_xucred",
    "parse_netbsd_sockcred",
    "parse_openbsd_sockpeercred",
    "parse_pid",
    "parse_ucred",
    "parse_unpcbid",
]

ByteOrder = Literal["little", "big"]

#: ``sizeof(struct ucred)`` on Linux.
UCRED_SIZE = 12
#: ``CMGROUP_MAX``: the room for groups in FreeBSD's ``struct cmsgcred``.
CMGROUP_MAX = 16
#: ``sizeof(struct cmsgcred)``: 4 ids, a short, padding, 16 gids.
CMSGCRED_SIZE = 20 + 4 * CMGROUP_MAX
#: ``XU_NGROUPS`` (FreeBSD) and ``NGROUPS`` (macOS): groups in ``struct xucred``.
XU_NGROUPS = 16
#: The only ``cr_version`` defined so far.
XUCRED_VERSION = 0
#: ``sizeof(struct xucred)`` on macOS.
MACOS_XUCRED_SIZE = 12 + 4 * XU_NGROUPS
#: FreeBSD's ``SOCKCRED2VERSION``.
SOCKCRED2_VERSION = 0
#: Upper bound on a group count we accept in a variable-size structure.
_MAX_GROUPS = 65536


class CredentialsStructError(AfunixError, ValueError):
    """A credential structure has the wrong size, version or group count.

    The kernel built it, so this means the layout afunix expects does not
    match the running system: please report it with the system's name and
    version. ``errno`` is ``EPROTO``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


@dataclass(frozen=True)
class DecodedCredentials:
    """The identity one kernel structure reports.

    ``uid``/``gid`` are the *effective* ids where the structure has both
    real and effective ones (``cmsgcred``, ``sockcred``); the real ones are
    then in ``real_uid``/``real_gid``. ``pid`` is ``None`` where the
    structure has none (or reports 0: "unknown"). ``groups`` is ``None``
    when the structure carries no group list.
    """

    struct: str
    pid: int | None
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None
    real_uid: int | None = None
    real_gid: int | None = None


def _order(byteorder: ByteOrder | None) -> str:
    order = byteorder or sys.byteorder
    if order not in ("little", "big"):
        raise ValueError(f"byteorder must be 'little' or 'big', not {order!r}")
    return "<" if order == "little" else ">"


def _need(data: bytes, size: int, what: str, *, exact: bool = False) -> None:
    if len(data) < size or (exact and len(data) != size):
        want = f"exactly {size}" if exact else f"at least {size}"
        raise CredentialsStructError(
            f"{what} is {len(data)} bytes, expected {want}; the layout afunix knows does "
            "not match this system"
        )


def _groups(count: int, limit: int, what: str) -> int:
    if not 0 <= count <= limit:
        raise CredentialsStructError(f"{what} claims {count} groups; at most {limit} fit")
    return count


def _pid(value: int) -> int | None:
    return value if value > 0 else None


def parse_ucred(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """Linux ``struct ucred`` (``SO_PEERCRED``, ``SCM_CREDENTIALS``)."""
    _need(data, UCRED_SIZE, "struct ucred")
    pid, uid, gid = struct.unpack_from(_order(byteorder) + "iII", data)
    return DecodedCredentials("ucred", _pid(pid), uid, gid)


def build_ucred(pid: int, uid: int, gid: int, byteorder: ByteOrder | None = None) -> bytes:
    """The bytes of a Linux ``struct ucred``, to send as ``SCM_CREDENTIALS``."""
    try:
        if pid < 0:
            raise struct.error("negative pid")
        return struct.pack(_order(byteorder) + "iII", pid, uid, gid)
    except struct.error as exc:
        raise ValueError(
            f"credentials out of range (pid={pid}, uid={uid}, gid={gid}): pid must be "
            "0 to 2**31-1, uid and gid 0 to 2**32-1"
        ) from exc


def parse_pid(data: bytes, byteorder: ByteOrder | None = None) -> int | None:
    """A bare ``pid_t`` (macOS ``LOCAL_PEERPID``)."""
    _need(data, 4, "pid_t")
    (pid,) = struct.unpack_from(_order(byteorder) + "i", data)
    return _pid(pid)


def parse_cmsgcred(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """FreeBSD/DragonFly ``struct cmsgcred``: the seed's ``SCM_CREDS`` structure.

    The kernel fills it in when the *sender* attaches an (empty)
    ``SCM_CREDS`` message, so the receiver gets the sender's real and
    effective ids and up to ``CMGROUP_MAX`` groups, the first being the
    effective gid.
    """
    _need(data, CMSGCRED_SIZE, "struct cmsgcred")
    o = _order(byteorder)
    pid, ruid, euid, rgid, ngroups = struct.unpack_from(o + "iIIIh", data)
    n = _groups(ngroups, CMGROUP_MAX, "struct cmsgcred")
    groups = struct.unpack_from(f"{o}{n}I", data, 20)
    egid = groups[0] if groups else rgid
    return DecodedCredentials(
        "cmsgcred", _pid(pid), euid, egid, tuple(groups), real_uid=ruid, real_gid=rgid
    )


def _xucred(data: bytes, o: str, what: str) -> tuple[int, tuple[int, ...]]:
    version, uid, ngroups = struct.unpack_from(o + "IIh", data)
    if version != XUCRED_VERSION:
        raise CredentialsStructError(
            f"{what} has cr_version {version}; afunix knows version {XUCRED_VERSION}"
        )
    n = _groups(ngroups, XU_NGROUPS, what)
    if n == 0:
        raise CredentialsStructError(f"{what} has no groups; cr_groups[0] must be the gid")
    return uid, tuple(struct.unpack_from(f"{o}{n}I", data, 12))


def parse_freebsd_xucred(
    data: bytes, byteorder: ByteOrder | None = None, pointer_size: int = 8
) -> DecodedCredentials:
    """FreeBSD/DragonFly ``struct xucred`` from ``LOCAL_PEERCRED`` (``getpeereid``).

    ``pointer_size`` (8 on LP64, 4 on 32-bit systems) places the union that
    holds ``cr_pid`` on FreeBSD 13+; a zero there (DragonFly, older FreeBSD)
    means "no pid".
    """
    if pointer_size not in (4, 8):
        raise ValueError("pointer_size must be 4 or 8")
    pid_at = 76 if pointer_size == 4 else 80
    size = pid_at + pointer_size
    what = "struct xucred (FreeBSD)"
    _need(data, size, what)
    o = _order(byteorder)
    uid, groups = _xucred(data, o, what)
    (pid,) = struct.unpack_from(o + "i", data, pid_at)
    return DecodedCredentials("xucred", _pid(pid), uid, groups[0], groups)


def parse_macos_xucred(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """macOS ``struct xucred`` from ``LOCAL_PEERCRED`` (no pid: see ``LOCAL_PEERPID``)."""
    what = "struct xucred (macOS)"
    _need(data, MACOS_XUCRED_SIZE, what)
    uid, groups = _xucred(data, _order(byteorder), what)
    return DecodedCredentials("xucred", None, uid, groups[0], groups)


def parse_unpcbid(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """NetBSD ``struct unpcbid`` from ``LOCAL_PEEREID`` (effective ids and pid)."""
    _need(data, 12, "struct unpcbid")
    pid, euid, egid = struct.unpack_from(_order(byteorder) + "iII", data)
    return DecodedCredentials("unpcbid", _pid(pid), euid, egid)


def parse_openbsd_sockpeercred(
    data: bytes, byteorder: ByteOrder | None = None
) -> DecodedCredentials:
    """OpenBSD ``struct sockpeercred`` from ``SO_PEERCRED``: uid, gid, *then* pid."""
    _need(data, 12, "struct sockpeercred")
    uid, gid, pid = struct.unpack_from(_order(byteorder) + "IIi", data)
    return DecodedCredentials("sockpeercred", _pid(pid), uid, gid)


def _sockcred_tail(data: bytes, o: str, at: int, what: str) -> tuple[int, ...]:
    (ngroups,) = struct.unpack_from(o + "i", data, at)
    n = _groups(ngroups, _MAX_GROUPS, what)
    _need(data, at + 4 + 4 * n, f"{what} with {n} groups")
    return tuple(struct.unpack_from(f"{o}{n}I", data, at + 4))


def parse_freebsd_sockcred(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """FreeBSD ``struct sockcred`` (``LOCAL_CREDS``): ids and groups, no pid."""
    what = "struct sockcred (FreeBSD)"
    _need(data, 20, what)
    o = _order(byteorder)
    ruid, euid, rgid, egid = struct.unpack_from(o + "4I", data)
    groups = _sockcred_tail(data, o, 16, what)
    return DecodedCredentials("sockcred", None, euid, egid, groups, real_uid=ruid, real_gid=rgid)


def parse_freebsd_sockcred2(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """FreeBSD 13+ ``struct sockcred2`` (``SCM_CREDS2``): a version, the pid, ids, groups."""
    what = "struct sockcred2"
    _need(data, 28, what)
    o = _order(byteorder)
    version, pid, ruid, euid, rgid, egid = struct.unpack_from(o + "ii4I", data)
    if version != SOCKCRED2_VERSION:
        raise CredentialsStructError(
            f"{what} has sc_version {version}; afunix knows version {SOCKCRED2_VERSION}"
        )
    groups = _sockcred_tail(data, o, 24, what)
    return DecodedCredentials(
        "sockcred2", _pid(pid), euid, egid, groups, real_uid=ruid, real_gid=rgid
    )


def parse_netbsd_sockcred(data: bytes, byteorder: ByteOrder | None = None) -> DecodedCredentials:
    """NetBSD ``struct sockcred`` (``LOCAL_CREDS``): the pid first, then ids and groups."""
    what = "struct sockcred (NetBSD)"
    _need(data, 24, what)
    o = _order(byteorder)
    pid, ruid, euid, rgid, egid = struct.unpack_from(o + "i4I", data)
    groups = _sockcred_tail(data, o, 20, what)
    return DecodedCredentials(
        "sockcred", _pid(pid), euid, egid, groups, real_uid=ruid, real_gid=rgid
    )
