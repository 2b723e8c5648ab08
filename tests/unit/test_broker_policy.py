"""The TOML policy: parsing, errors with line numbers, globs, path checks, decisions."""

from __future__ import annotations

import errno
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from afunix.broker._rules import compile_glob, glob_match
from afunix.broker.flags import Wire
from afunix.broker.policy import (
    BrokerLimits,
    PathRefused,
    PolicyFileError,
    load_policy,
    parse_policy,
    split_path,
)

DOCS = Path(__file__).parents[2] / "docs" / "broker.md"


@dataclass
class Who:
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None


def policy(tmp: Path, body: str) -> str:
    return textwrap.dedent(body).replace("ROOT", str(tmp))


# ------------------------------------------------------------------ errors
INVALID = [
    ("version = 2\n", 1, "version 2"),
    ("colour = 1\n", 1, "unknown top-level key 'colour'"),
    ("[[rule]\n", 1, "not valid TOML"),
    (
        'version = 1\n\n[[rule]]\nroot = "ROOT"\nallow = ["read"]\nanyone = tru\n',
        6,
        "not valid TOML",
    ),
    ('[[rule]]\nroot = "ROOT"\nallow = ["read"]\n', 1, "names no subject"),
    ('[[rule]]\nanyone = true\nallow = ["read"]\n', 1, "has no root"),
    ('[[rule]]\nroot = "relative"\nanyone = true\nallow = ["read"]\n', 2, "absolute path"),
    ('[[rule]]\nroot = "ROOT/../etc"\nanyone = true\nallow = ["read"]\n', 2, "'..'"),
    ('[[rule]]\nroot = "ROOT/missing"\nanyone = true\nallow = ["read"]\n', 2, "not an existing"),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\n\n\nallow = ["read", "delete"]\n',
        6,
        "unknown operation 'delete'",
    ),
    ('[[rule]]\nroot = "ROOT"\nanyone = true\nallow = []\n', 4, "allow is missing or empty"),
    ('[[rule]]\nroot = "ROOT"\nanyone = true\n', 1, "allow is missing"),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\ncolour = 1\n',
        5,
        "unknown key 'colour'",
    ),
    ('[[rule]]\nroot = "ROOT"\nusers = ["no-such-user-x"]\nallow = ["read"]\n', 3, "no such user"),
    (
        '[[rule]]\nroot = "ROOT"\ngroups = ["no-such-group-x"]\nallow = ["read"]\n',
        3,
        "no such group",
    ),
    ('[[rule]]\nroot = "ROOT"\nuids = ["0"]\nallow = ["read"]\n', 3, "numeric ids"),
    ('[[rule]]\nroot = "ROOT"\nanyone = "yes"\nallow = ["read"]\n', 3, "true or false"),
    ('[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\npaths = ["../x"]\n', 5, "'..'"),
    ('[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\npaths = ["/etc"]\n', 5, "absolute"),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\npaths = ["a**"]\n',
        5,
        "whole component",
    ),
    ('[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\npaths = []\n', 5, "grants nothing"),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["create"]\ncreate_mode = 0o4755\n',
        5,
        "create_mode",
    ),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["read"]\ncreate_excl = true\n',
        5,
        "does not allow create",
    ),
    (
        '[[rule]]\nroot = "ROOT"\nanyone = true\nallow = ["create"]\ncreate_owner = "x"\n',
        5,
        "create_owner",
    ),
    (
        '[[rule]]\nname = "a"\nroot = "ROOT"\nanyone = true\nallow = ["read"]\n'
        '[[rule]]\nname = "a"\nroot = "ROOT"\nanyone = true\nallow = ["read"]\n',
        7,
        "two rules",
    ),
    ("[limits]\nburst = 0\n", 2, "outside"),
    ("[limits]\nidle_timeout = nan\n", 2, "must be a number"),
    ('[limits]\nburst = "many"\n', 2, "must be an integer"),
    ("[limits]\nspeed = 1\n", 2, "unknown limit 'speed'"),
    ("rule = 1\n", 1, "array of tables"),
]


@pytest.mark.parametrize(("body", "line", "why"), INVALID)
def test_invalid_policies_name_the_line_and_the_reason(
    tmp_path: Path, body: str, line: int, why: str
) -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy(policy(tmp_path, body), "p.toml")
    exc = info.value
    assert exc.line == line, exc
    assert why in exc.reason
    assert exc.errno == errno.EINVAL
    assert f"p.toml, line {line}: " in str(exc)


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read it"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"version = 1\n# caf\xe9\n")
    with pytest.raises(PolicyFileError, match="line 2: not valid UTF-8"):
        load_policy(bad)


def test_valid_policy(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    p = parse_policy(
        policy(
            tmp_path,
            """
            version = 1
            [limits]
            burst = 5
            idle_timeout = 2.5

            [[rule]]
            name = "first"
            root = "ROOT/a/"
            paths = ["*.log", "archive/**"]
            exclude = ["secret*"]
            users = ["nobody"]
            groups = ["nogroup"]
            uids = [1000]
            allow = ["read", "list"]

            [[rule]]
            root = "ROOT"
            anyone = true
            allow = ["create", "append"]
            create_mode = 0o640
            create_excl = true
            create_owner = "peer"
            no_symlinks = true
            """,
        )
    )
    first, second = p.rules
    assert first.name == "first" and first.line == 7
    assert first.root == str(tmp_path / "a")
    assert first.uids == {65534, 1000} and first.gids == {65534}
    assert second.name == "rule 2" and second.line == 17
    assert second.create_mode == 0o640 and second.create_excl and second.no_symlinks
    assert p.limits == BrokerLimits(burst=5, idle_timeout=2.5)


def test_an_empty_policy_denies_everything(tmp_path: Path) -> None:
    p = parse_policy("version = 1\n")
    d = p.decide(Who(0, 0), ("etc", "hostname"), int(Wire.READ))
    assert not d.allowed and d.errno == errno.EACCES and "default deny" in d.reason


def test_examples_in_the_docs_are_valid(tmp_path: Path) -> None:
    """Every ```toml block of docs/broker.md parses.

    Roots are redirected to a temp dir, and user/group names (site-specific) to root's.
    """
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2

    def redirect(m: re.Match[str]) -> str:
        d = tmp_path / m.group(1).strip("/")
        d.mkdir(parents=True, exist_ok=True)
        return f'root = "{d}"'

    for i, block in enumerate(blocks):
        text = re.sub(r'root = "([^"]+)"', redirect, block)
        text = re.sub(r"^(users|groups) = \[.*\]", r'\1 = ["root"]', text, flags=re.M)
        parse_policy(text, f"docs block {i + 1}")


# ------------------------------------------------------------------- globs
GLOBS = [
    ("**", "", True),
    ("**", "a/b/c", True),
    ("*.txt", "a.txt", True),
    ("*.txt", ".hidden.txt", True),
    ("*.txt", "d/a.txt", False),
    ("*/*.txt", "d/a.txt", True),
    ("a/**", "a", True),
    ("a/**", "a/b/c.txt", True),
    ("a/**", "ab/c", False),
    ("a/**/z", "a/z", True),
    ("a/**/z", "a/b/c/z", True),
    ("a/**/z", "a/b/c/y", False),
    ("**/*.log", "x/y/z.log", True),
    ("**/*.log", "z.log", True),
    ("?.c", "a.c", True),
    ("?.c", "ab.c", False),
    ("[ab].c", "b.c", True),
    ("[!ab].c", "b.c", False),
    ("", "", True),
    (".", "", True),
    (".", "a", False),
    ("", "a", False),
    ("./a", "a", True),
]


@pytest.mark.parametrize(("pattern", "path", "match"), GLOBS)
def test_globs(pattern: str, path: str, match: bool) -> None:
    comps = tuple(c for c in path.split("/") if c)
    assert glob_match(compile_glob(pattern), comps) is match


# ------------------------------------------------------------- request paths
PATHS = [
    (b"/a/b", ("a", "b")),
    (b"//a/./b/", ("a", "b")),
    (b"/", ()),
    ("/caf\u00e9".encode(), ("caf\u00e9",)),
]


@pytest.mark.parametrize(("raw", "comps"), PATHS)
def test_split_path(raw: bytes, comps: tuple[str, ...]) -> None:
    assert split_path(raw) == comps


REFUSED = [
    (b"", errno.ENOENT),
    (b"a/b", errno.EINVAL),
    (b"/a/../b", errno.EACCES),
    (b"/a/..", errno.EACCES),
    (b"/a\0b", errno.EINVAL),
    (b"/\xff", errno.EILSEQ),
    (b"/\xc0\xae\xc0\xae", errno.EILSEQ),  # overlong "..", a classic
    (b"/" + b"a" * 4095, errno.ENAMETOOLONG),
    (b"/" + b"a" * 256, errno.ENAMETOOLONG),
]


@pytest.mark.parametrize(("raw", "err"), REFUSED)
def test_split_path_refuses(raw: bytes, err: int) -> None:
    with pytest.raises(PathRefused) as info:
        split_path(raw)
    assert info.value.errno == err


# ---------------------------------------------------------------- decisions
@pytest.fixture
def two_rules(tmp_path: Path) -> object:
    (tmp_path / "logs").mkdir()
    return parse_policy(
        policy(
            tmp_path,
            """
            [[rule]]
            name = "logs"
            root = "ROOT/logs"
            paths = ["*.log", "old/**"]
            exclude = ["old/private/**"]
            gids = [4]
            allow = ["read", "list"]

            [[rule]]
            name = "append"
            root = "ROOT/logs"
            uids = [1000]
            allow = ["write", "create"]
            create_excl = true
            """,
        )
    )


def test_decide(tmp_path: Path, two_rules: object) -> None:
    from afunix.broker.policy import Policy

    assert isinstance(two_rules, Policy)
    logs = tuple(str(tmp_path / "logs").strip("/").split("/"))
    R, W = int(Wire.READ), int(Wire.WRITE)
    adm = Who(1000, 1000, (4,))
    cases = [
        (adm, (*logs, "a.log"), R, "logs"),
        (Who(5, 4), (*logs, "a.log"), R, "logs"),  # primary gid
        (Who(5, 5), (*logs, "a.log"), R, None),  # not a subject
        (adm, (*logs, "a.txt"), R, None),  # not in paths; rule 2 has no read
        (adm, (*logs, "old", "x", "y"), R, "logs"),
        (adm, (*logs, "old", "private", "y"), R, None),  # excluded
        (adm, logs, R | int(Wire.DIR), None),  # the root itself is not in paths
        (adm, (*logs, "old"), R | int(Wire.DIR), "logs"),
        (adm, (*logs, "a.log"), W | int(Wire.APPEND), "append"),  # write grants append
        (adm, (*logs, "n.log"), W | int(Wire.CREATE), None),  # create needs EXCL
        (adm, (*logs, "n.log"), W | int(Wire.CREATE | Wire.EXCL), "append"),
        (adm, (*logs, "a.log"), R | W, None),  # no single rule grants both
        (Who(1000, 1000), ("etc", "passwd"), R, None),
    ]
    for who, comps, flags, rule in cases:
        d = two_rules.decide(who, comps, flags)
        assert (d.rule.name if d.rule else None) == rule, (who, comps, flags, d.reason)
        if rule is None:
            assert d.errno == errno.EACCES
    d = two_rules.decide(adm, (*logs, "n.log"), W | int(Wire.CREATE))
    assert "only with EXCL" in d.reason
    d = two_rules.decide(adm, (*logs, "a.log"), R | W)
    assert "does not grant write" in d.reason and "does not grant read" in d.reason


def test_toml_lines_locates_tables_and_keys() -> None:
    """The line locator behind every error's line number (``broker/_toml_lines.py``)."""
    from afunix.broker._toml_lines import TomlLines

    text = textwrap.dedent(
        '''\
        version = 1
        [limits]
        burst = 5
        [[rule]]
        name = """a name
        root = "/not/a/key"
        """
        root = "/srv"
        [[other]]
        root = "/x"
        [[rule]]
        "allow" = ["read"]
        '''
    )
    lines = TomlLines(text)
    assert lines.of("", 0, "version") == 1
    assert lines.of("limits", 0, "burst") == 3
    assert lines.of("rule", 0) == 4
    assert lines.of("rule", 0, "name") == 5
    assert lines.of("rule", 0, "root") == 8  # not line 6, inside the multi-line string
    assert lines.of("other", 0, "root") == 10
    assert lines.of("rule", 1, "allow") == 12
    assert lines.of("rule", 1, "paths") == 11  # a missing key: the table's header
    assert lines.of("rule", 2) is None
