"""The broker's policy: who may open what, read from a TOML file (sans-IO).

A policy is a list of rules and a default of *deny*. A rule names its
subjects (uids, gids, user and group names, or ``anyone``), a ``root``
directory, the paths beneath it (globs), and the operations it grants::

    version = 1

    [[rule]]
    name = "app logs"
    root = "/var/log/app"
    paths = ["*.log", "archive/**"]     # globs relative to root (default: "**")
    exclude = ["private/**"]            # never granted by this rule
    users = ["alice"]                   # and/or uids, gids, groups, anyone = true
    groups = ["adm"]
    allow = ["read", "list"]            # read write append create list

    [[rule]]
    name = "uploads"
    root = "/srv/uploads"
    anyone = true
    allow = ["create", "write"]
    create_mode = 0o640                 # the most a created file gets (default 0o600)
    create_excl = true                  # creating needs O_EXCL
    create_owner = "peer"               # created files belong to the client
    no_symlinks = true                  # refuse symlinks anywhere beneath root

    [limits]                            # optional; the defaults are shown in docs/broker.md
    requests_per_second = 100

A request is granted by the *first* rule, in file order, whose subjects
include the peer, whose root contains the path, whose ``paths`` match the
rest of it (and ``exclude`` does not), and which grants every operation the
request needs (:func:`afunix.broker.flags.operations`). ``write`` includes
``append``. Nothing else is granted. An ``append`` granted without ``write``
is served as a pipe that the broker drains into the file (the client cannot
clear ``O_APPEND`` on it), so it cannot be combined with ``read``.

Globs match the path *beneath* the root, one component at a time:
``*``, ``?`` and ``[...]`` never match ``/`` (a leading dot is matched like
any other character); ``**`` as a whole component matches any number of
components, including none (so ``"**"`` also matches the root itself).

Users and groups are resolved to ids when the policy is loaded; reload it
(``SIGHUP``) after changing them. An invalid policy is refused with
:class:`PolicyFileError` (an :class:`afunix.PolicyError`), which names the file,
the line and the reason.

Renamed (the old names still work for one release, with a ``DeprecationWarning``):
``Limits`` is :class:`BrokerLimits` (``afunix.Limits`` are a server's per-connection
limits), ``PolicyError`` is :class:`PolicyFileError`, ``Decision`` is
:class:`AccessDecision` (``afunix.policy.Decision`` is a peer policy's verdict).
"""

from __future__ import annotations

import errno
import grp
import math
import os
import pwd
import re
import stat
import tomllib
import warnings
from collections.abc import Mapping
from typing import Any, Final

from ..policy import PolicyError as _PeerPolicyError
from ._rules import (
    LIMIT_RANGES,
    MAX_PATH,
    OPERATIONS,
    AccessDecision,
    BrokerLimits,
    PathRefused,
    Policy,
    Rule,
    Subject,
    compile_glob,
    split_path,
)
from ._toml_lines import TomlLines

__all__ = [
    "MAX_PATH",
    "OPERATIONS",
    "AccessDecision",
    "BrokerLimits",
    "PathRefused",
    "Policy",
    "PolicyFileError",
    "Rule",
    "Subject",
    "load_policy",
    "parse_policy",
    "split_path",
]


class PolicyFileError(_PeerPolicyError):
    """The policy file cannot be used (``EINVAL``). ``line`` is where (1-based), or ``None``
    for the whole file; ``source`` (also ``filename``) is the file.

    An :class:`afunix.PolicyError` (and so an ``OSError`` and a ``ValueError``):
    ``except afunix.PolicyError`` catches a bad peer policy and a bad broker policy alike.
    """

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}, line {line}" if line else source
        super().__init__(f"invalid policy {where}: {reason}", source)
        self.source = source
        self.line = line
        self.reason = reason


# ----------------------------------------------------------------- parsing
_TOP_KEYS: Final = {"version", "limits", "rule"}
_RULE_KEYS: Final = {
    "name",
    "root",
    "paths",
    "exclude",
    "uids",
    "gids",
    "users",
    "groups",
    "anyone",
    "allow",
    "create_mode",
    "create_excl",
    "create_owner",
    "no_symlinks",
}
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


class _Builder:
    """Validates the parsed TOML table by table; every error names its line."""

    def __init__(self, source: str, lines: TomlLines) -> None:
        self.source = source
        self.lines = lines
        #: Where validation is (table, index, key): the line of an unexpected error.
        self.at: tuple[str, int, str] = ("", 0, "")

    def fail(self, table: str, index: int, key: str, reason: str) -> PolicyFileError:
        return PolicyFileError(self.source, self.lines.of(table, index, key), reason)

    def limits(self, raw: Any) -> BrokerLimits:
        if not isinstance(raw, Mapping):
            raise self.fail("", 0, "limits", "[limits] must be a table")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            self.at = ("limits", 0, key)
            if key not in LIMIT_RANGES:
                known = ", ".join(sorted(LIMIT_RANGES))
                raise self.fail("limits", 0, key, f"unknown limit {_show(key)} (known: {known})")
            low, high, kind = LIMIT_RANGES[key]
            ok_type = (
                isinstance(value, int) and not isinstance(value, bool)
                if kind is int
                else isinstance(value, int | float) and not isinstance(value, bool)
            )
            if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
                raise self.fail(
                    "limits", 0, key, f"{key} must be a{'n integer' if kind is int else ' number'}"
                )
            if not low <= value <= high:
                raise self.fail("limits", 0, key, f"{key} = {value} is outside {low}..{high}")
            values[key] = kind(value)
        return BrokerLimits(**values)

    def rule(self, raw: Any, i: int, names: set[str]) -> Rule:
        """The ``i``-th ``[[rule]]`` as a :class:`Rule`; *names* collects the names so far."""
        self.at = ("rule", i, "")
        if not isinstance(raw, Mapping):
            raise self.fail("", 0, "rule", "rule must be an array of tables: write [[rule]]")
        rule = _RuleTable(self, raw, i)
        name = rule.name(names)
        root = rule.root()
        paths = rule.globs("paths", ["**"])
        if not paths:
            raise rule.fail("paths", "paths is empty, so the rule grants nothing")
        exclude = rule.globs("exclude", [])
        uids, gids, anyone = rule.subjects()
        allow = rule.allow()
        create_mode, create_excl, create_owner, no_symlinks = rule.options(allow)
        return Rule(
            name=name,
            root=os.path.normpath(root),
            allow=frozenset(allow),
            line=self.lines.of("rule", i) or 0,
            paths=paths,
            exclude=exclude,
            uids=frozenset(uids),
            gids=frozenset(gids),
            anyone=anyone,
            create_mode=create_mode,
            create_excl=create_excl,
            create_owner=create_owner,
            no_symlinks=no_symlinks,
            root_forms=(tuple(c for c in root.split("/") if c not in ("", ".")),),
            root_line=self.lines.of("rule", i, "root") or 0,
        )


class _RuleTable:
    """The checks of one ``[[rule]]`` table, one key (or a few related keys) per method."""

    def __init__(self, build: _Builder, raw: Mapping[str, Any], i: int) -> None:
        self.build, self.raw, self.i = build, raw, i

    def fail(self, key: str, reason: str) -> PolicyFileError:
        return self.build.fail("rule", self.i, key, reason)

    def name(self, names: set[str]) -> str:
        """Refuse unknown keys; the rule's name (unique; default ``rule N``)."""
        for key in self.raw:
            if key not in _RULE_KEYS:
                known = ", ".join(sorted(_RULE_KEYS))
                raise self.fail(key, f"unknown key {_show(key)} in a rule (known: {known})")
        name = self.raw.get("name", f"rule {self.i + 1}")
        if not isinstance(name, str) or not name:
            raise self.fail("name", "name must be a non-empty string")
        if name in names:
            raise self.fail("name", f"two rules are named {_show(name)}")
        names.add(name)
        return name

    def root(self) -> str:
        """The rule's root: an absolute path, without ``..``, to an existing directory."""
        root = self.raw.get("root")
        if root is None:
            raise self.fail("", "the rule has no root (the directory it grants access beneath)")
        if not isinstance(root, str) or not root.startswith("/"):
            raise self.fail("root", f"root must be an absolute path, not {_show(root)}")
        if "\0" in root or ".." in root.split("/"):
            raise self.fail("root", f"root {_show(root)} must not contain '..' or NUL")
        problem = _root_problem(root)
        if problem:
            raise self.fail("root", problem)
        return root

    def strings(self, key: str, default: list[str]) -> list[str]:
        self.build.at = ("rule", self.i, key)
        value = self.raw.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"{key} must be a list of strings")
        return value

    def globs(self, key: str, default: list[str]) -> tuple[tuple[str, ...], ...]:
        out = []
        for pattern in self.strings(key, default):
            try:
                out.append(compile_glob(pattern))
            except ValueError as exc:
                raise self.fail(key, str(exc)) from None
        return tuple(out)

    def subjects(self) -> tuple[set[int], set[int], bool]:
        """``(uids, gids, anyone)``: numeric ids and names resolved now; at least one."""
        uids: set[int] = set()
        gids: set[int] = set()
        for key, into in (("uids", uids), ("gids", gids)):
            value = self.raw.get(key, [])
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 0xFFFFFFFF
                for v in value
            ):
                raise self.fail(key, f"{key} must be a list of numeric ids")
            into.update(value)
        for key, what, into in (("users", "user", uids), ("groups", "group", gids)):
            for name in self.strings(key, []):
                try:
                    into.add(
                        pwd.getpwnam(name).pw_uid if into is uids else grp.getgrnam(name).gr_gid
                    )
                except (KeyError, ValueError):  # ValueError: a NUL byte in the name
                    raise self.fail(key, f"no such {what} {_show(name)}") from None
        anyone = self.raw.get("anyone", False)
        if not isinstance(anyone, bool):
            raise self.fail("anyone", "anyone must be true or false")
        if not (anyone or uids or gids):
            raise self.fail(
                "",
                "the rule names no subject: give uids, gids, users, groups or anyone = true "
                "(nothing is granted to everyone implicitly)",
            )
        return uids, gids, anyone

    def allow(self) -> list[str]:
        allow = self.strings("allow", [])
        if not allow:
            raise self.fail(
                "allow", "allow is missing or empty: list read, write, append, create, list"
            )
        for op in allow:
            if op not in OPERATIONS:
                known = ", ".join(OPERATIONS)
                raise self.fail("allow", f"unknown operation {_show(op)} (known: {known})")
        return allow

    def options(self, allow: list[str]) -> tuple[int, bool, str, bool]:
        """``(create_mode, create_excl, create_owner, no_symlinks)``; create_* need create."""
        create_mode = self.raw.get("create_mode", 0o600)
        if (
            not isinstance(create_mode, int)
            or isinstance(create_mode, bool)
            or not 0 <= create_mode <= 0o777
        ):
            raise self.fail(
                "create_mode",
                "create_mode must be a permission mode such as 0o640 (no set-id or sticky bits)",
            )
        flags = {}
        for key in ("create_excl", "no_symlinks"):
            value = self.raw.get(key, False)
            if not isinstance(value, bool):
                raise self.fail(key, f"{key} must be true or false")
            flags[key] = value
        owner = self.raw.get("create_owner", "broker")
        if owner not in ("broker", "peer"):
            raise self.fail("create_owner", 'create_owner must be "broker" or "peer"')
        if "create" not in allow:
            for key in ("create_mode", "create_excl", "create_owner"):
                if key in self.raw:
                    raise self.fail(key, f"{key} is set but the rule does not allow create")
        return create_mode, flags["create_excl"], owner, flags["no_symlinks"]


def _root_problem(root: str) -> str | None:
    """Why *root* cannot be a rule's root (opened as the broker will), or ``None``."""
    from .confine import open_root  # confine imports flags only; no cycle

    try:
        os.close(open_root(root))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            detail = f": {exc.strerror}" if exc.errno == errno.ENOTDIR else ""
            return f"root {_show(root)} is not an existing directory{detail}"
        return f"root {_show(root)} cannot be used: {exc.strerror or exc}"
    return None


def _show(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to *limit* characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _what(exc: BaseException) -> str:
    """An unexpected exception from the parser or validation, as a reason."""
    if isinstance(exc, RecursionError):
        return "arrays or inline tables are nested too deeply"
    return f"{type(exc).__name__}: {_show(str(exc), 200)[1:-1]}"


def _failing_line(text: str, kind: type[BaseException]) -> int | None:
    """The first line at which ``tomllib`` fails on *text* with *kind* (not a TOML syntax
    error: those carry their position), found by parsing prefixes (binary search)."""
    lines = text.splitlines(keepends=True)

    def fails(n: int) -> bool:
        try:
            tomllib.loads("".join(lines[:n]))
        except kind:
            return True
        except Exception:
            return False
        return False

    low, high = 1, len(lines)
    if not lines or not fails(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if fails(mid):
            high = mid
        else:
            low = mid + 1
    return low


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate policy *text*; raise :class:`PolicyFileError` with the line if invalid.

    Whatever is wrong with *text*, the only exception is :class:`PolicyFileError`:
    a failure the TOML parser or the checks did not foresee (nesting deep
    enough to exhaust the recursion limit, an integer of thousands of digits,
    a NUL byte in a user name) says what it was and, where it can be found,
    on which line.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_POS.search(message)
        line = int(m.group(1)) if m else None
        reason = message[: m.start()] if m else message
        raise PolicyFileError(source, line, f"not valid TOML: {reason}") from None
    except Exception as exc:  # RecursionError, ValueError (too many digits), ...
        where = _failing_line(text, type(exc))
        raise PolicyFileError(source, where, f"not valid TOML: {_what(exc)}") from None
    build = _Builder(source, TomlLines(text))
    try:
        return _validate(raw, source, build)
    except PolicyFileError:
        raise
    except Exception as exc:
        raise build.fail(*build.at, f"cannot be used: {_what(exc)}") from None


def _validate(raw: dict[str, Any], source: str, build: _Builder) -> Policy:
    for key in raw:
        if key not in _TOP_KEYS:
            raise build.fail(
                "", 0, key, f"unknown top-level key {_show(key)} (known: version, limits, rule)"
            )
    version = raw.get("version", 1)
    if version != 1:
        raise build.fail(
            "", 0, "version", f"policy version {_show(version)} is not supported (use 1)"
        )
    limits = build.limits(raw["limits"]) if "limits" in raw else BrokerLimits()
    raw_rules = raw.get("rule", [])
    if not isinstance(raw_rules, list):
        raise build.fail("", 0, "rule", "rule must be an array of tables: write [[rule]]")
    names: set[str] = set()
    rules = tuple(build.rule(r, i, names) for i, r in enumerate(raw_rules))
    return Policy(rules, limits, source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at *path* (a regular file of at most 1 MiB)."""
    source = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang the (re)load.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise PolicyFileError(source, None, f"cannot read it: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PolicyFileError(source, None, "cannot read it: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read((1 << 20) + 1)
    except OSError as exc:
        if isinstance(exc, PolicyFileError):
            raise
        raise PolicyFileError(source, None, f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > 1 << 20:
        raise PolicyFileError(source, None, "file is larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyFileError(source, line, "not valid UTF-8") from None
    return parse_policy(text, source)


#: Old names (renamed so that ``afunix`` and ``afunix.broker`` never share a name): they
#: work for one release and warn.
_RENAMED: Final = {
    "Limits": "BrokerLimits",
    "PolicyError": "PolicyFileError",
    "Decision": "AccessDecision",
}


def __getattr__(name: str) -> object:
    new = _RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} is deprecated: it is now {__name__}.{new} "
        "(the old name is removed in the next minor release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return globals()[new]
