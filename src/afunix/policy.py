"""Peer authorization: which users and groups may talk to a server.

A :class:`PeerPolicy` lists who is allowed; everybody else is refused
(deny by default). It judges the credentials the *kernel* reports
(:func:`afunix.peer_credentials` for connections, per-message credentials
for datagrams), so a client cannot lie its way in::

    policy = afunix.PeerPolicy(users=["postgres"], groups=["admin"], same_user=True)
    afunix.Server("@myapp", handler, policy=policy).serve_forever()

:class:`~afunix.Server` checks it before the handler sees a connection or a
datagram; a refused peer is closed (a datagram dropped) and logged with its
credentials on the ``afunix.server`` logger.

This matters most for Linux *abstract* sockets (``@name``): they have no
file, hence no permissions, and any process in the network namespace can
connect. A path socket can also be guarded by its file mode and group
(``listen(..., mode=0o660, group=...)``); a policy adds a second, finer check
(this user only, this uid only) on top.

Over ``tls://`` the peer's identity is its certificate, verified by the
server's ``ssl.SSLContext``: ``tls_names`` allows the certificates naming one
of them (subject ``CN``, or a DNS or URI subjectAltName, matched exactly)::

    policy = afunix.PeerPolicy(tls_names=["billing.internal", "spiffe://corp/billing"])
    afunix.Server("tls://0.0.0.0:7000", handler, ssl=context, policy=policy)

A TLS peer is judged by ``tls_names`` only (it has no uid), a Unix-socket peer
by the uid and gid rules only; a server refuses at construction a policy that
could allow none of its clients (uid rules on a ``tls://`` server).

Groups match the peer's primary gid and, where the kernel reports them
(``SO_PEERGROUPS`` on Linux, ``xucred`` on BSD/macOS), its supplementary
groups. Linux datagrams carry no group list, so only the primary gid counts
there. Names are resolved to ids when the policy is built, so an unknown
name is an error at once, not a silent "nobody matches" later.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from ._creds import PeerCredentials
from ._errors import AfunixError
from ._peer import TlsPeer

__all__ = ["Decision", "PeerPolicy", "PolicyError"]


class PolicyError(AfunixError, ValueError):
    """A policy cannot be used (``EINVAL``): it names a user or group that does not exist,
    or an invalid id. The broker's :class:`afunix.broker.PolicyFileError` (a policy file
    that cannot be read or is invalid) is a subclass, so ``except afunix.PolicyError``
    catches both; *filename* is then the policy file."""

    def __init__(self, message: str, filename: object = None) -> None:
        super().__init__(errno.EINVAL, message, filename)


@dataclass(frozen=True)
class Decision:
    """The verdict on one peer: ``allowed`` and a reason fit for a log line."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def _check_id(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0xFFFFFFFF:
        raise PolicyError(f"{what} {value!r} is not a valid id (0 to 4294967294)")
    return value


def _uid_of(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        hint = " (use uids=[...] / --allow-uid for numeric ids)" if name.isdigit() else ""
        raise PolicyError(f"no user named {name!r} on this system{hint}") from None


def _gid_of(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        hint = " (use gids=[...] / --allow-gid for numeric ids)" if name.isdigit() else ""
        raise PolicyError(f"no group named {name!r} on this system{hint}") from None


def _uname(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _gname(gid: int) -> str:
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"


class PeerPolicy:
    """Allow peers by uid, gid, user or group name, "same user as me" or TLS certificate
    name; deny the rest.

    Args:
        uids, gids: numeric ids to allow.
        users, groups: names, resolved to ids now (:class:`PolicyError` if unknown).
        same_user: allow peers whose uid is this process's effective uid
            (taken when the policy is built).
        tls_names: certificate names to allow over ``tls://``: a peer whose
            verified certificate has one of them as its subject ``CN`` or as a
            DNS or URI subjectAltName (:attr:`TlsPeer.names`), exactly.

    A policy with no rule at all allows nobody: setting a policy means "deny
    unless listed". Pass ``policy=None`` to a server for no check.
    """

    def __init__(
        self,
        *,
        uids: Iterable[int] = (),
        gids: Iterable[int] = (),
        users: Iterable[str] = (),
        groups: Iterable[str] = (),
        same_user: bool = False,
        tls_names: Iterable[str] = (),
    ) -> None:
        allowed_uids = {_check_id(u, "uid") for u in uids}
        allowed_uids |= {_uid_of(n) for n in users}
        self.same_user_uid: int | None = os.geteuid() if same_user else None
        allowed_gids = {_check_id(g, "gid") for g in gids}
        allowed_gids |= {_gid_of(n) for n in groups}
        self.uids: frozenset[int] = frozenset(allowed_uids)
        self.gids: frozenset[int] = frozenset(allowed_gids)
        if isinstance(tls_names, str):
            raise PolicyError(f"tls_names must be a list of names, not the string {tls_names!r}")
        names = [str(n) for n in tls_names]
        if any(not n for n in names):
            raise PolicyError("an empty certificate name in tls_names would match nothing")
        self.tls_names: frozenset[str] = frozenset(names)

    @property
    def empty(self) -> bool:
        """True when no rule is set (and so nobody is allowed)."""
        return not self.uids and not self.gids and self.same_user_uid is None and not self.tls_names

    def describe(self) -> str:
        """The rules in words, e.g. ``"allow uid 0 (root); allow the server's user ..."``."""
        rules = [f"allow {_uname(u)}" for u in sorted(self.uids)]
        if self.same_user_uid is not None:
            rules.append(f"allow the server's own user, {_uname(self.same_user_uid)}")
        rules += [f"allow members of {_gname(g)}" for g in sorted(self.gids)]
        rules += [f"allow TLS certificates named {n!r}" for n in sorted(self.tls_names)]
        return "; ".join(rules) if rules else "allow nobody (no rule set)"

    def check(self, creds: PeerCredentials | TlsPeer) -> Decision:
        """Judge *creds*: the first rule that matches allows; no match denies.

        A :class:`~afunix.TlsPeer` (a ``tls://`` client's certificate) is judged by
        ``tls_names``; :class:`~afunix.PeerCredentials` by the uid and gid rules.
        """
        if isinstance(creds, TlsPeer):
            return self._check_tls(creds)
        if creds.uid in self.uids:
            return Decision(True, f"{_uname(creds.uid)} is allowed")
        if self.same_user_uid is not None and creds.uid == self.same_user_uid:
            return Decision(True, f"{_uname(creds.uid)} is the server's own user")
        if creds.gid in self.gids:
            return Decision(True, f"primary group {_gname(creds.gid)} is allowed")
        for g in creds.groups or ():
            if g in self.gids:
                return Decision(True, f"supplementary group {_gname(g)} is allowed")
        return Decision(False, f"no rule allows {_uname(creds.uid)}, {_gname(creds.gid)}")

    def _check_tls(self, peer: TlsPeer) -> Decision:
        for name in peer.names:
            if name in self.tls_names:
                return Decision(True, f"TLS certificate name {name!r} is allowed")
        shown = ", ".join(repr(n) for n in peer.names) or "no name"
        return Decision(False, f"no rule allows a TLS certificate with {shown}")

    def allows(self, creds: PeerCredentials | TlsPeer) -> bool:
        """``check(creds).allowed``."""
        return self.check(creds).allowed

    def __repr__(self) -> str:
        return f"PeerPolicy({self.describe()})"
