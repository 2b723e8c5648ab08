"""Bad policies: a clear error at start, the old policy kept on SIGHUP (issue 15, item 6).

Before, some invalid policies raised something other than ``PolicyFileError`` out
of the loader (``RecursionError`` from deeply nested arrays, ``ValueError`` from
``getpwnam`` with a NUL byte or from an integer of thousands of digits); in the
``SIGHUP`` handler that exception killed the broker. A FIFO in the policy's
place hung the reload, and with it the accept loop.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afunix.broker import Policy, PolicyFileError, parse_policy
from tests.conftest import afunix_cmd, wait_until
from tests.security.broker_support import BrokerProcess, Tree, as_nobody, tree

__all__ = ["tree"]

DEEP = 3000


def _deep_arrays(t: Tree) -> bytes:
    return b"version = 1\n\nx = " + b"[" * DEEP + b"]" * DEEP + b"\n"


def _deep_tables(t: Tree) -> bytes:
    return b"version = 1\n\nx = " + b"{a = " * DEEP + b"}" * DEEP + b"\n"


def _rule(t: Tree, extra: str, root: str | None = None) -> bytes:
    return (
        f'version = 1\n\n[[rule]]\nroot = "{root or t.root}"\nallow = ["read"]\n{extra}\n'
    ).encode()


#: (name, policy bytes from the tree, line, what the reason says)
BAD: list[tuple[str, object, int | None, str]] = [
    ("deeply nested arrays", _deep_arrays, 3, "nested too deeply"),
    ("deeply nested inline tables", _deep_tables, 3, "nested too deeply"),
    ("NUL in users", lambda t: _rule(t, 'users = ["ro\\u0000ot"]'), 6, "no such user 'ro\\x00ot'"),
    ("NUL in groups", lambda t: _rule(t, 'groups = ["a\\u0000"]'), 6, "no such group"),
    (
        "an integer of 5000 digits",
        lambda t: b"version = 1\n[limits]\n\nburst = " + b"9" * 5000 + b"\n",
        4,
        "ValueError: Exceeds the limit",
    ),
    (
        "a root that is a file",
        lambda t: _rule(t, "anyone = true", str(t.root / "pub.txt")),
        4,
        "pub.txt' is not a directory",
    ),
    (
        "a root through a symlink",
        lambda t: _rule(t, "anyone = true", str(t.root / "out")),
        4,
        "is a symlink",
    ),
    ("not UTF-8", lambda t: b"version = 1\n# caf\xe9\n", 2, "not valid UTF-8"),
    ("a NUL byte in the text", lambda t: b"version = 1\n\0\n", 2, "not valid TOML"),
]
IDS = [b[0] for b in BAD]


def _write_bad(t: Tree, make: object) -> None:
    t.policy.write_bytes(make(t))  # type: ignore[operator]


@pytest.mark.parametrize(("name", "make", "line", "why"), BAD, ids=IDS)
def test_a_bad_policy_at_start_is_one_clear_error(
    tree: Tree, name: str, make: object, line: int | None, why: str
) -> None:
    _write_bad(tree, make)
    proc = subprocess.run(
        afunix_cmd("broker", str(tree.sock), "--policy", str(tree.policy)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78, proc.stderr[-2000:]  # bad config (docs/operations.md)
    assert "Traceback" not in proc.stderr
    assert f"invalid policy {tree.policy}, line {line}: " in proc.stderr, proc.stderr[-2000:]
    assert why in proc.stderr
    assert len(proc.stderr) < 2000  # one line, values cut
    assert not tree.sock.exists()


def test_a_fifo_in_place_of_the_policy_is_refused_at_start(tree: Tree) -> None:
    tree.policy.unlink()
    os.mkfifo(tree.policy)
    proc = subprocess.run(
        afunix_cmd("broker", str(tree.sock), "--policy", str(tree.policy)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78  # bad config
    assert f"invalid policy {tree.policy}: cannot read it: not a regular file" in proc.stderr


def _reload_failures(t: Tree) -> list[dict[str, object]]:
    return [r for r in t.audit_lines() if r["event"] == "reload-failed"]


def _wait(pred: Callable[[], object], timeout: float = 15.0) -> bool:
    return wait_until(pred, timeout)


def test_sighup_with_each_bad_policy_keeps_the_old_one(tree: Tree) -> None:
    """One broker, one SIGHUP per bad policy of the table (and a FIFO): it survives each,
    the old policy still answers, and the audit log and stderr say why, with the line."""
    good = tree.policy.read_bytes()
    b = BrokerProcess(tree)
    pub = {"path": str(tree.root / "pub.txt")}
    try:
        assert as_nobody(tree.sock, [pub])[0]["ok"]
        for n, (name, make, line, why) in enumerate(BAD, 1):
            _write_bad(tree, make)
            os.kill(b.pid, signal.SIGHUP)
            assert _wait(lambda n=n: len(_reload_failures(tree)) == n), name
            assert b.proc.poll() is None, f"{name}: the broker died"
            failed = _reload_failures(tree)[-1]
            assert failed["line"] == line, (name, failed)
            assert why in str(failed["reason"]), (name, failed)
            assert as_nobody(tree.sock, [pub])[0]["ok"], name
        tree.policy.unlink()
        os.mkfifo(tree.policy)  # would block an open() for reading
        os.kill(b.pid, signal.SIGHUP)
        assert _wait(lambda: len(_reload_failures(tree)) == len(BAD) + 1)
        assert "not a regular file" in str(_reload_failures(tree)[-1]["reason"])
        assert as_nobody(tree.sock, [pub])[0]["ok"]
        # And a good policy is taken again afterwards.
        tree.policy.unlink()
        tree.policy.write_bytes(good)
        os.kill(b.pid, signal.SIGHUP)
        assert _wait(lambda: any(r["event"] == "reload" for r in tree.audit_lines()))
        assert as_nobody(tree.sock, [pub])[0]["ok"]
    finally:
        err = b.stop()
    assert err.count("reload refused, keeping the previous policy") == len(BAD) + 1
    assert "Traceback" not in err
    for line in tree.audit_lines():
        assert len(json.dumps(line)) < 2000


# ------------------------------------------------------------------- fuzz
_KEYS = [
    "version",
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
    "burst",
    "idle_timeout",
    "requests_per_second",
    "x y",
    "",
]

_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["read", "write", "append", "create", "list", "root", "nobody", "/", "**"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3)
    ),
    max_leaves=12,
)


def _toml(value: object) -> str:
    """A value as TOML (strings as JSON, which TOML's basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value > 0 else "-inf")
            if abs(value) == float("inf")
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@st.composite
def _policies(draw: st.DrawFn) -> str:
    parts = []
    if draw(st.booleans()):
        parts.append(f"version = {_toml(draw(_values))}")
    if draw(st.booleans()):
        limits = draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=3))
        parts.append(
            "[limits]\n" + "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in limits.items())
        )
    for _ in range(draw(st.integers(0, 3))):
        keys = draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6))
        keys.setdefault(
            "root", draw(st.sampled_from(["/", "/etc", "/etc/hostname", "x", "/no/such"]))
        )
        parts.append(
            "[[rule]]\n" + "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in keys.items())
        )
    return "\n\n".join(parts) + "\n"


_NOISE = st.text(
    alphabet=st.sampled_from([*"[]{}=\"'\\#\n ,.0123456789abrtuex_-", "\0", "\u00e9", "\ud7ff"]),
    max_size=200,
)


def _only_policy_or_policy_error(text: str) -> None:
    try:
        result = parse_policy(text, "fuzz.toml")
    except PolicyFileError as exc:
        assert exc.errno == errno.EINVAL and exc.source == "fuzz.toml"
        assert len(str(exc)) < 1000
    else:
        assert isinstance(result, Policy)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies())
def test_fuzzed_policies_give_a_policy_or_a_policy_error(text: str) -> None:
    _only_policy_or_policy_error(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_NOISE)
def test_fuzzed_noise_gives_a_policy_or_a_policy_error(text: str) -> None:
    _only_policy_or_policy_error(text)


def test_the_deep_nesting_finder_names_the_line() -> None:
    text = "".join(f"k{i} = {i}\n" for i in range(41)) + "x = [" + "[" * DEEP + "]" * (DEEP + 1)
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text, "p.toml")
    assert info.value.line == 42 and "nested too deeply" in info.value.reason
