"""Who a peer is, as the kernel reported it: :class:`PeerCredentials` (UNP 15.8).

The value types of credentials, apart from the socket calls that get them
(:mod:`afunix._creds`): the ids, the optional pidfd this object owns, and
what the platform backend can say about the process behind it
(:meth:`PeerCredentials.exited`, :meth:`~PeerCredentials.facts`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import signal
from dataclasses import dataclass
from typing import Any

from ._credstructs import DecodedCredentials
from ._errors import AfunixError, UnsupportedFeature
from ._platform import PLATFORM

__all__ = ["PeerCredentials", "PeerGone", "ProcessFacts", "TlsPeer"]


class PeerGone(AfunixError):
    """The peer process has exited, so facts about it can no longer be read safely.

    ``errno`` is ``ESRCH``. Its pid may already name another process.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESRCH, message)


@dataclass(frozen=True)
class ProcessFacts:
    """What ``/proc`` says about a peer process, for logs and policy.

    ``verified`` is true when a pidfd confirmed, *after* reading, that the
    pid still named the peer (so no other process could have inherited the
    pid meanwhile). Facts the system would not show (another user's
    executable without privilege, no ``/proc``) are ``None``.
    """

    pid: int
    exe: str | None
    cmdline: tuple[str, ...] | None
    cgroup: str | None
    verified: bool


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


class PeerCredentials:
    """The identity of a peer, as the kernel reported it.

    Attributes:
        pid: the peer's process id in this process's pid namespace, or
            ``None`` where the system does not say (DragonFly, FreeBSD < 13)
            or the peer lives in a pid namespace this one cannot see.
        uid, gid: the peer's ids. Peer credentials (``SO_PEERCRED``,
            ``LOCAL_PEERCRED``) report *effective* ids at connect time;
            Linux per-message credentials report what the sender attached,
            by default its *real* ids at send time.
        groups: supplementary groups where the kernel gives them
            (``SO_PEERGROUPS``, ``xucred``), else ``None``.
        pidfd: on Linux 6.5+, a descriptor naming the peer process (owned by
            this object: :meth:`close` it, or use ``with``), else ``None``.
        mechanism: how the kernel told us, e.g. ``"SO_PEERCRED"``.

    Equality and hashing use ``(pid, uid, gid, groups)``.
    """

    __slots__ = ("_pidfd", "gid", "groups", "mechanism", "pid", "uid")

    def __init__(
        self,
        pid: int | None,
        uid: int,
        gid: int,
        groups: tuple[int, ...] | None = None,
        pidfd: int | None = None,
        *,
        mechanism: str = "",
    ) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.groups = None if groups is None else tuple(groups)
        self.mechanism = mechanism
        self._pidfd = pidfd

    @classmethod
    def _from_decoded(
        cls, dec: DecodedCredentials, pidfd: int | None, mechanism: str
    ) -> PeerCredentials:
        return cls(dec.pid, dec.uid, dec.gid, dec.groups, pidfd, mechanism=mechanism)

    # ------------------------------------------------------------ identity
    @property
    def pidfd(self) -> int | None:
        """The pidfd (still owned by this object), or ``None``."""
        return self._pidfd

    @property
    def user(self) -> str | None:
        """The user name of :attr:`uid`, if the user database knows it."""
        return _user_name(self.uid)

    @property
    def group(self) -> str | None:
        """The group name of :attr:`gid`, if the group database knows it."""
        return _group_name(self.gid)

    def describe(self) -> str:
        """``"pid 123, uid 65534 (nobody), gid 65534 (nogroup)"`` for logs."""
        user, group = self.user, self.group
        parts = [
            f"pid {self.pid if self.pid is not None else '?'}",
            f"uid {self.uid}" + (f" ({user})" if user else ""),
            f"gid {self.gid}" + (f" ({group})" if group else ""),
        ]
        if self.groups:
            parts.append("groups " + ",".join(map(str, self.groups)))
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no descriptor numbers)."""
        return {
            "pid": self.pid,
            "uid": self.uid,
            "user": self.user,
            "gid": self.gid,
            "group": self.group,
            "groups": None if self.groups is None else list(self.groups),
            "mechanism": self.mechanism,
            "pidfd": self._pidfd is not None,
        }

    def _key(self) -> tuple[int | None, int, int, tuple[int, ...] | None]:
        return (self.pid, self.uid, self.gid, self.groups)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerCredentials):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fd = f", pidfd={self._pidfd}" if self._pidfd is not None else ""
        return (
            f"PeerCredentials(pid={self.pid}, uid={self.uid}, gid={self.gid}, "
            f"groups={self.groups}{fd})"
        )

    # ------------------------------------------------------- the process
    def _need_pidfd(self, what: str) -> int:
        if self._pidfd is None:
            raise UnsupportedFeature(
                f"{what} needs a pidfd, and these credentials have none (Linux 6.5+ "
                "SO_PEERPIDFD, or enable_credentials(..., pidfd=True) for messages)"
            )
        return self._pidfd

    def exited(self, timeout: float | None = 0.0) -> bool:
        """Whether the peer process has exited, waiting up to *timeout* seconds.

        ``timeout=None`` waits for as long as it takes. Needs a pidfd: a pid
        number alone cannot answer this (it may already name another process).
        """
        return PLATFORM.backend.pidfd_exited(
            self._need_pidfd("telling whether the peer exited"), timeout
        )

    def current_pid(self) -> int | None:
        """The pid the pidfd names now: :attr:`pid` while the peer lives, ``None`` once reaped."""
        return PLATFORM.backend.pidfd_pid(self._need_pidfd("following the peer process"))

    def send_signal(self, sig: int) -> None:
        """Signal the peer through its pidfd: never a process that reused its pid.

        Raises ``ProcessLookupError`` if the peer has exited.
        """
        signal.pidfd_send_signal(self._need_pidfd("signalling the peer safely"), sig)

    def facts(self) -> ProcessFacts:
        """Executable, command line and cgroup of the peer, read from ``/proc``.

        With a pidfd, the facts are checked to belong to the peer
        (``verified``); without one (old kernels, per-message credentials)
        they are read on trust in the pid (``verified=False``). Raises
        :class:`PeerGone` if the peer has exited, and
        :class:`~afunix.UnsupportedFeature` if the pid is unknown.
        """
        if self.pid is None:
            raise UnsupportedFeature("the peer's pid is unknown, so /proc cannot be consulted")
        try:
            exe, cmdline, cgroup, verified = PLATFORM.backend.process_facts(self.pid, self._pidfd)
        except ProcessLookupError as exc:
            raise PeerGone(
                f"peer pid {self.pid} has exited; its /proc entry is gone or may "
                "already belong to another process"
            ) from exc
        return ProcessFacts(self.pid, exe, cmdline, cgroup, verified)

    # --------------------------------------------------------- ownership
    def detach_pidfd(self) -> int | None:
        """Hand the pidfd over to the caller (who must close it)."""
        fd, self._pidfd = self._pidfd, None
        return fd

    def close(self) -> None:
        """Close the pidfd, if any. The ids stay readable."""
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PeerCredentials:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Like a socket object: a forgotten descriptor is closed, not leaked.
        if getattr(self, "_pidfd", None) is not None:
            self.close()


@dataclass(frozen=True)
class TlsPeer:
    """Who the peer of a ``tls://`` connection is: its certificate, as the handshake verified it.

    The TLS counterpart of :class:`PeerCredentials`: where the kernel vouches
    for a Unix-socket peer's uid, over TLS the certificate authority of your
    ``ssl.SSLContext`` vouches for these names. Only a verified certificate
    gives one (a server context with ``verify_mode = ssl.CERT_REQUIRED``
    refuses clients without a valid one; a client context verifies the
    server by default).

    Attributes:
        common_name: the subject's ``commonName`` (``CN``), or ``None``.
        dns_names: the ``DNS`` entries of the subjectAltName extension.
        uri_names: its ``URI`` entries (e.g. SPIFFE ids, ``spiffe://org/svc``).
        ip_addresses: its ``IP Address`` entries.
        subject: every attribute of the subject, ``(("organizationName",
            "Example"), ("commonName", "db1"), ...)``, in order.
        issuer: the issuer's attributes, likewise.
        serial_number: the certificate's serial number (hex).
        not_after: when it expires, as OpenSSL prints it.
        version: the TLS version negotiated, e.g. ``"TLSv1.3"``.
    """

    common_name: str | None
    dns_names: tuple[str, ...] = ()
    uri_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    subject: tuple[tuple[str, str], ...] = ()
    issuer: tuple[tuple[str, str], ...] = ()
    serial_number: str = ""
    not_after: str = ""
    version: str = ""

    @classmethod
    def from_certificate(cls, cert: dict[str, Any], version: str | None = None) -> TlsPeer:
        """Build one from what ``SSLObject.getpeercert()`` returns (a verified certificate)."""
        subject = _attributes(cert.get("subject", ()))
        alt: list[tuple[str, str]] = [(str(k), str(v)) for k, v in cert.get("subjectAltName", ())]
        return cls(
            common_name=next((v for k, v in subject if k == "commonName"), None),
            dns_names=tuple(v for k, v in alt if k == "DNS"),
            uri_names=tuple(v for k, v in alt if k == "URI"),
            ip_addresses=tuple(v for k, v in alt if k == "IP Address"),
            subject=subject,
            issuer=_attributes(cert.get("issuer", ())),
            serial_number=str(cert.get("serialNumber", "")),
            not_after=str(cert.get("notAfter", "")),
            version=version or "",
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the certificate gives its holder: the ``CN``, then the DNS and URI
        names (what ``PeerPolicy(tls_names=...)`` matches), without repeats."""
        found = ([self.common_name] if self.common_name else []) + [
            *self.dns_names,
            *self.uri_names,
        ]
        return tuple(dict.fromkeys(found))

    def describe(self) -> str:
        """``certificate CN=client.example (DNS client.example)``, for logs."""
        cn = f"CN={self.common_name}" if self.common_name else "no CN"
        alt = [f"DNS {n}" for n in self.dns_names] + [f"URI {n}" for n in self.uri_names]
        return f"certificate {cn}" + (f" ({', '.join(alt)})" if alt else "")


def _attributes(rdns: Any) -> tuple[tuple[str, str], ...]:
    """``getpeercert()``'s nested subject tuples, flattened to ``(name, value)`` pairs."""
    return tuple((str(k), str(v)) for rdn in rdns for k, v in rdn)
