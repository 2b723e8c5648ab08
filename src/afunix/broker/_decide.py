"""One request's decision, and what the audit log says of it.

:func:`decide` checks a request's flags and path, asks the policy with the
peer's kernel credentials, and opens the granted file beneath the rule's root
(an append grant: through a pipe the broker drains into the file). It returns
an :class:`Outcome`, whose ``opened.fd`` the caller owns. :func:`request_record`
and :func:`peer_record` are the audit line's fields; :func:`peer_exe` what the
broker knows of a peer beyond its credentials.

A decision is made against an :class:`Installed` policy: the policy and its
rules' roots, opened once (:func:`hold_roots`) and replaced whole on reload.
:class:`afunix.broker.server.Broker` holds one and calls these; ``Outcome`` is
public as ``afunix.broker.server.Outcome``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Final

from .. import PeerCredentials
from . import confine
from . import flags as _flags
from .appends import AppendLimit, AppendPipes
from .audit import MAX_SHOWN, errno_name, text
from .policy import (
    AccessDecision,
    BrokerLimits,
    PathRefused,
    Policy,
    PolicyFileError,
    Rule,
    split_path,
)
from .protocol import OpenRequest

__all__ = [
    "FACT_BYTES",
    "Installed",
    "Outcome",
    "decide",
    "hold_roots",
    "peer_exe",
    "peer_record",
    "rate_limited",
    "request_record",
]

#: Longest fact about a peer (the path of its executable) read, in bytes.
FACT_BYTES: Final = 4096


@dataclass
class Outcome:
    """What happened to one request (for the reply and the audit line)."""

    decision: str
    errno: int
    reason: str
    rule: str | None = None
    opened: confine.Opened | None = None
    #: What the client is told, if less than ``reason`` (which names rules).
    public: str | None = None
    #: ``opened.fd`` is the write end of a pipe drained into the file (an append grant).
    pipe: bool = False


@dataclass(frozen=True)
class Installed:
    """A policy together with its rules' roots, opened once (replaced whole on reload)."""

    policy: Policy
    roots: confine.HeldRoots


def hold_roots(policy: Policy) -> confine.HeldRoots:
    """Open every rule's root without following symlinks, or raise :class:`PolicyFileError`."""
    try:
        return confine.HeldRoots.open(
            (rule.root, rule.root_line or rule.line) for rule in policy.rules
        )
    except confine.RootError as exc:
        raise PolicyFileError(policy.source, exc.line, exc.reason) from None


def rate_limited(creds: PeerCredentials, limits: BrokerLimits) -> Outcome:
    """The outcome of a request past its uid's token bucket (``EAGAIN``)."""
    return Outcome(
        "limited",
        errno.EAGAIN,
        f"rate limit: uid {creds.uid} may make {limits.requests_per_second:g} "
        f"requests/s (burst {limits.burst}); retry later",
    )


def decide(
    req: OpenRequest,
    creds: PeerCredentials,
    policy: Policy,
    roots: confine.HeldRoots | None,
    *,
    appends: AppendPipes,
    append_limits: tuple[int, int],
    resolver: confine.Resolver,
) -> Outcome:
    """Check, judge and (if granted) open one request. The caller owns ``opened.fd``.

    The open is confined beneath *roots* (held, see :class:`Installed`), or
    with *roots* ``None`` beneath each rule's root opened for this call
    (without following symlinks). An append grant goes through a pipe of
    *appends*, within *append_limits* (``(per uid, in all)``, see
    :meth:`afunix.broker.server.DescriptorBudget.append_pipes`).
    """
    try:
        _flags.check(req.flags, req.mode)
    except _flags.FlagError as exc:
        return Outcome("denied", exc.errno or errno.EINVAL, f"flags refused: {exc.reason}")
    try:
        comps = split_path(req.path)
    except PathRefused as exc:
        return Outcome("denied", exc.errno or errno.EINVAL, f"path refused: {exc.reason}")
    decision = policy.decide(creds, comps, req.flags)
    rule = decision.rule
    if rule is None:
        return Outcome(
            "denied", decision.errno, decision.reason, public="not granted by the policy"
        )
    return _open(
        req,
        creds,
        decision,
        rule,
        roots=roots,
        appends=appends,
        limits=append_limits,
        resolver=resolver,
    )


def _open(
    req: OpenRequest,
    creds: PeerCredentials,
    decision: AccessDecision,
    rule: Rule,
    *,
    roots: confine.HeldRoots | None,
    appends: AppendPipes,
    limits: tuple[int, int],
    resolver: confine.Resolver,
) -> Outcome:
    """Open what *rule* grants (:func:`decide`, once the policy said yes)."""
    owner = (creds.uid, creds.gid) if rule.create_owner == "peer" else None
    pipe = rule.appends_through_pipe(_flags.operations(req.flags))
    try:
        if pipe:  # refuse before creating anything; and earlier bytes go in first
            appends.check_room(creds.uid, *limits)
            appends.flush(creds.uid)
        opened = confine.open_beneath(
            rule.root if roots is None else roots.fd(rule.root),
            decision.rel,
            req.flags,
            req.mode & rule.create_mode,
            no_symlinks=rule.no_symlinks,
            owner=owner,
            resolver=resolver,
        )
    except AppendLimit as exc:
        return Outcome("limited", exc.errno or errno.EAGAIN, exc.strerror or "", rule.name)
    except confine.ConfinementError as exc:
        kernel = f" (kernel: {errno_name(exc.kernel_errno)})" if exc.kernel_errno else ""
        return Outcome(
            "denied",
            exc.errno or errno.EACCES,
            f"confinement: {exc.strerror}{kernel}",
            rule.name,
        )
    except OSError as exc:
        err = exc.errno or errno.EIO
        return Outcome("failed", err, f"open failed: {exc.strerror or os.strerror(err)}", rule.name)
    if pipe:
        what = {"peer": {"pid": creds.pid, "uid": creds.uid}, "rule": rule.name}
        what["file"] = {"dev": opened.dev, "ino": opened.ino, "path": text(opened.path)}
        try:
            opened.fd = appends.start(
                creds.uid,
                opened.fd,
                what,
                nonblock=bool(req.flags & _flags.Wire.NONBLOCK),
                limits=limits,
            )
        except OSError as exc:  # the file descriptor is closed by start()
            return Outcome(
                "limited" if isinstance(exc, AppendLimit) else "failed",
                exc.errno or errno.EAGAIN,
                exc.strerror or str(exc),
                rule.name,
            )
    reason = decision.reason + (" (append through a pipe)" if pipe else "")
    return Outcome("granted", 0, reason, rule.name, opened, public="granted", pipe=pipe)


def request_record(req: OpenRequest, peer: dict[str, Any], out: Outcome) -> dict[str, Any]:
    """The fields of a request's audit line (``open``): who asked what, and what happened."""
    rec: dict[str, Any] = {
        "peer": peer,
        "request": {
            "id": req.id,
            "path": text(req.path),
            "flags": _flags.describe(req.flags),
            "mode": f"{req.mode:04o}",
        },
        "decision": out.decision,
        "errno": errno_name(out.errno),
        "reason": out.reason,
    }
    if out.rule is not None:
        rec["rule"] = out.rule
    if out.opened is not None:
        rec["file"] = {
            "dev": out.opened.dev,
            "ino": out.opened.ino,
            "path": text(out.opened.path),
            "created": out.opened.created,
        }
        if out.pipe:
            rec["file"]["via"] = "pipe"
        rec["resolver"] = out.opened.resolver
    return rec


def peer_record(creds: PeerCredentials) -> dict[str, Any]:
    """The ``peer`` field of an audit line: the peer's kernel credentials."""
    return {
        "pid": creds.pid,
        "uid": creds.uid,
        "gid": creds.gid,
        "groups": None if creds.groups is None else list(creds.groups),
    }


def peer_exe(creds: PeerCredentials) -> str | None:
    """The peer's executable as bounded text, or ``None`` if unknown or gone.

    The path is whatever bytes the client's executable has (newlines, bytes
    that are not UTF-8, up to ``PATH_MAX``): it is read as bytes, at most
    :data:`FACT_BYTES`, and written with ``\\xNN`` escapes, cut at
    :data:`~afunix.broker.audit.MAX_SHOWN` characters. Where the kernel gives a
    pidfd it is checked *after* reading that the peer still lives, so the path
    cannot be that of a process that reused its pid. Nothing here raises: a
    client cannot make its own handler fail by how it was started.
    """
    if creds.pid is None:
        return None
    try:
        raw = os.readlink(f"/proc/{creds.pid}/exe".encode())
    except FileNotFoundError:
        if os.path.exists("/proc/self/exe"):
            return None  # gone
        try:  # no /proc: whatever this system offers
            exe = creds.facts().exe
        except (OSError, ValueError):
            return None
        return None if exe is None else text(exe[:FACT_BYTES])
    except (OSError, ValueError):
        return None
    try:
        if creds.pidfd is not None and creds.exited():
            return None
    except OSError:
        return None
    return text(raw[:FACT_BYTES], MAX_SHOWN)
