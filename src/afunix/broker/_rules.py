"""The broker policy's model: rules, limits, decisions and request paths (sans-IO).

:mod:`afunix.broker.policy` reads a policy file into these (and re-exports
them: import them from there); this module holds what a loaded policy *is*
and how it decides, so that each module stays one reading's length.
"""

from __future__ import annotations

import errno
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from .. import AfunixError
from . import flags as _flags

__all__ = [
    "LIMIT_RANGES",
    "MAX_PATH",
    "OPERATIONS",
    "AccessDecision",
    "BrokerLimits",
    "PathRefused",
    "Policy",
    "Rule",
    "Subject",
    "compile_glob",
    "glob_match",
    "split_path",
]

OPERATIONS: Final = ("read", "write", "append", "create", "list")
#: ``PATH_MAX`` less its NUL: the longest path a request may name.
MAX_PATH: Final = 4095


class PathRefused(AfunixError):
    """A request path refused before any rule is looked at; ``errno`` for the client."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(err, reason)
        self.reason = reason


class Subject(Protocol):
    """Who is asking: the kernel's view of the peer (``SO_PEERCRED``, ``SO_PEERGROUPS``)."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def groups(self) -> tuple[int, ...] | None: ...


# ------------------------------------------------------------------ limits
@dataclass(frozen=True)
class BrokerLimits:
    """Resource limits of the daemon (the ``[limits]`` table).

    Per *peer* means per uid: a client cannot dodge a limit by opening more
    connections or forking.
    """

    #: Largest request frame accepted, header included; larger closes the connection.
    max_request_bytes: int = 8192
    #: Sustained requests per second per uid (a token bucket) ...
    requests_per_second: float = 1000.0
    #: ... and how many may come in a burst. Past it: ``EAGAIN``.
    burst: int = 1000
    #: Open connections per uid (each serves one request at a time).
    connections_per_peer: int = 8
    #: Open connections in all; further clients wait in the listen queue.
    max_clients: int = 64
    #: Descriptors sent on one connection and not yet read by the client.
    fds_in_flight: int = 16
    #: Seconds a peer may sit at ``fds_in_flight`` before it is disconnected.
    in_flight_timeout: float = 10.0
    #: Seconds a connection may stay silent between requests.
    idle_timeout: float = 60.0
    #: Seconds to finish sending a request once its first byte arrived.
    request_timeout: float = 5.0
    #: Append pipes (an ``append`` grant without ``write``) open at once per uid ...
    append_pipes_per_peer: int = 16
    #: ... and in all; each has a thread draining it into its file. Past either: ``EAGAIN``.
    max_append_pipes: int = 256


LIMIT_RANGES: Final[dict[str, tuple[float, float, type]]] = {
    "max_request_bytes": (64, 1 << 20, int),
    "requests_per_second": (0.001, 1e6, float),
    "burst": (1, 1_000_000, int),
    "connections_per_peer": (1, 10_000, int),
    "max_clients": (1, 100_000, int),
    "fds_in_flight": (1, 253, int),
    "in_flight_timeout": (0.01, 86400, float),
    "idle_timeout": (0.01, 86400 * 7, float),
    "request_timeout": (0.01, 3600, float),
    "append_pipes_per_peer": (1, 10_000, int),
    "max_append_pipes": (1, 100_000, int),
}


# ------------------------------------------------------------------- rules
def compile_glob(pattern: str) -> tuple[str, ...]:
    if pattern in ("", "."):
        return ()
    if pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} is absolute; patterns are relative to root")
    parts = tuple(p for p in pattern.split("/") if p not in ("", "."))
    for part in parts:
        if part == "..":
            raise ValueError(f"path pattern {pattern!r} contains '..'")
        if "**" in part and part != "**":
            raise ValueError(
                f"path pattern {pattern!r}: '**' must be a whole component (like a/**/b)"
            )
    return parts


def glob_match(pattern: tuple[str, ...], comps: tuple[str, ...]) -> bool:
    """Component-wise glob match; ``**`` spans any number of components (dynamic programming)."""
    # reach[j]: pattern[:i] can match comps[:j]
    reach = [True] + [False] * len(comps)
    for part in pattern:
        if part == "**":
            seen = False
            for j in range(len(comps) + 1):
                seen = seen or reach[j]
                reach[j] = seen
        else:
            nxt = [False] * (len(comps) + 1)
            for j in range(len(comps)):
                if reach[j] and fnmatch.fnmatchcase(comps[j], part):
                    nxt[j + 1] = True
            reach = nxt
        if not any(reach):
            return False
    return reach[len(comps)]


@dataclass(frozen=True)
class Rule:
    """One grant. Built by :func:`parse_policy`; see the module docs for the keys."""

    name: str
    root: str
    allow: frozenset[str]
    line: int = 0
    paths: tuple[tuple[str, ...], ...] = (("**",),)
    exclude: tuple[tuple[str, ...], ...] = ()
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    anyone: bool = False
    create_mode: int = 0o600
    create_excl: bool = False
    create_owner: str = "broker"
    no_symlinks: bool = False
    #: The root's components as written, and (if different) of its real path.
    root_forms: tuple[tuple[str, ...], ...] = field(default=(), compare=False)
    #: The line of the ``root`` key (0 if unknown), for errors about the root.
    root_line: int = field(default=0, compare=False)

    def includes(self, who: Subject) -> bool:
        """Whether the peer is one of this rule's subjects."""
        if self.anyone or who.uid in self.uids:
            return True
        if not self.gids:
            return False
        groups = set(who.groups or ())
        groups.add(who.gid)
        return bool(groups & self.gids)

    def beneath(self, comps: tuple[str, ...]) -> tuple[str, ...] | None:
        """The components of *comps* beneath this rule's root, or ``None`` if outside it."""
        for root in self.root_forms:
            if comps[: len(root)] == root:
                return comps[len(root) :]
        return None

    def covers(self, rel: tuple[str, ...]) -> bool:
        """Whether the ``paths`` globs match *rel* and no ``exclude`` glob does."""
        if not any(glob_match(p, rel) for p in self.paths):
            return False
        return not any(glob_match(p, rel) for p in self.exclude)

    def grants(self, ops: Iterable[str]) -> set[str]:
        """The operations of *ops* this rule does *not* grant (empty: all granted)."""
        missing = set()
        for op in ops:
            if op in self.allow or (op == "append" and "write" in self.allow):
                continue
            missing.add(op)
        return missing

    def appends_through_pipe(self, ops: Iterable[str]) -> bool:
        """Whether this rule grants *ops* as append only: the client then gets a pipe that the
        broker drains into the file (:mod:`afunix.broker.appends`), never the file itself."""
        return "append" in ops and "write" not in self.allow

    def subjects(self) -> str:
        """A short description of who the rule is for, for ``--check`` output."""
        if self.anyone:
            return "anyone"
        parts = [f"uid {u}" for u in sorted(self.uids)] + [f"gid {g}" for g in sorted(self.gids)]
        return ", ".join(parts)


@dataclass(frozen=True)
class AccessDecision:
    """What the policy says about one request.

    ``rule`` is the granting rule (``None`` when denied), ``rel`` the path
    beneath its root, ``errno`` 0 or why not, ``reason`` for the audit log.
    """

    rule: Rule | None
    rel: tuple[str, ...]
    errno: int
    reason: str

    @property
    def allowed(self) -> bool:
        return self.rule is not None


@dataclass(frozen=True)
class Policy:
    """A loaded, valid policy: rules in order, limits, and where it came from."""

    rules: tuple[Rule, ...]
    limits: BrokerLimits = BrokerLimits()
    source: str = "<string>"

    def decide(self, who: Subject, comps: tuple[str, ...], flags: int) -> AccessDecision:
        """Find the first rule that grants the (checked) wire *flags* on *comps* to *who*."""
        ops = _flags.operations(flags)
        shown = "/" + "/".join(comps)
        why_not: list[str] = []
        for rule in self.rules:
            if not rule.includes(who):
                continue
            rel = rule.beneath(comps)
            if rel is None or not rule.covers(rel):
                continue
            missing = rule.grants(ops)
            if missing:
                why_not.append(f"rule {rule.name!r} does not grant {', '.join(sorted(missing))}")
                continue
            if "read" in ops and rule.appends_through_pipe(ops):
                why_not.append(
                    f"rule {rule.name!r} grants append, not write: that is a pipe into the "
                    "file, which cannot also be read (ask for O_WRONLY|O_APPEND)"
                )
                continue
            if "create" in ops and rule.create_excl and not flags & _flags.Wire.EXCL:
                why_not.append(f"rule {rule.name!r} grants create only with EXCL (O_EXCL)")
                continue
            return AccessDecision(rule, rel, 0, f"granted by rule {rule.name!r}")
        if why_not:
            reason = "; ".join(why_not)
        else:
            reason = f"no rule grants uid {who.uid} access to {shown} (default deny)"
        return AccessDecision(None, (), errno.EACCES, reason)


# ------------------------------------------------------------ request paths
def split_path(path: bytes) -> tuple[str, ...]:
    """Check a request path and split it into components, or raise :class:`PathRefused`.

    Refused: empty, longer than ``PATH_MAX`` (``ENAMETOOLONG``), a NUL byte
    or not absolute (``EINVAL``), not UTF-8 (``EILSEQ``: policies are UTF-8
    text, and matching names in another encoding is where escapes hide), a
    ``..`` component (``EACCES``: it could only leave the directory named
    before it). ``.`` and repeated slashes are dropped.
    """
    if not path:
        raise PathRefused(errno.ENOENT, "empty path")
    if len(path) > MAX_PATH:
        raise PathRefused(
            errno.ENAMETOOLONG, f"path of {len(path)} bytes is longer than PATH_MAX ({MAX_PATH})"
        )
    if b"\0" in path:
        where = path.index(b"\0")
        raise PathRefused(errno.EINVAL, f"path contains a NUL byte at offset {where}")
    try:
        text = path.decode("utf-8", "strict")
    except UnicodeDecodeError as exc:
        raise PathRefused(
            errno.EILSEQ, f"path is not valid UTF-8 (byte {exc.start}); the broker refuses it"
        ) from None
    if not text.startswith("/"):
        raise PathRefused(
            errno.EINVAL, "path is not absolute (the broker has no working directory)"
        )
    comps = tuple(c for c in text.split("/") if c not in ("", "."))
    if ".." in comps:
        raise PathRefused(errno.EACCES, "path has a '..' component (refused: it could escape)")
    for c in comps:
        if len(c.encode()) > 255:
            raise PathRefused(errno.ENAMETOOLONG, "a path component is longer than 255 bytes")
    return comps
