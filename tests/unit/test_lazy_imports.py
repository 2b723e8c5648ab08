"""What each entry point imports, read from ``sys.modules`` of a real process.

``import afunix`` and ``afunix --help`` are what every program and every shell
session pays for; the design guide (section 9, Phase 2 step 5) keeps them
cheap: the command line lists its commands from a static table and imports
only the one it runs, ``afunix.bench`` imports its parts on first use, and
``afunix._sockets`` and ``afunix._connect`` import ``tempfile``, ``shutil`` and
the ``ssh://`` transport where they are used. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import afunix.cli
from afunix.cli import COMMANDS, build_parser, command_named

#: Runs ``-m afunix ARGS`` or ``-c CODE``, then writes ``sys.modules`` (one per line) to the
#: file named first at exit, even when argparse exits. Not ``-X importtime``: it does
#: not see ``importlib.import_module``, which is how the command line imports a command.
WRAPPER = """
import atexit, sys
listing = sys.argv[1]
def _dump():
    with open(listing, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
atexit.register(_dump)
if sys.argv[2] == "-m":
    import runpy
    module, sys.argv = sys.argv[3], ["afunix", *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    exec(sys.argv[3])
"""


def imported(tmp_path: Path, *args: str) -> set[str]:
    """The modules a process running ``-m afunix ARGS`` or ``-c CODE`` has imported."""
    listing = tmp_path / "modules.txt"
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(listing), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith(("_ARC", "COMP_"))},
    )
    assert out.returncode in (0, 2), out.stderr  # --help exits 0, a usage error 2
    if args[0] == "-m":  # it ran the command line (not a usage error about "afunix")
        assert (out.stdout + out.stderr).startswith(("usage: afunix", "afunix 0"))
        assert "'afunix'" not in out.stderr
    names = set(listing.read_text().split())
    assert "afunix" in names, out.stderr
    return names


def command_modules(names: set[str]) -> set[str]:
    """The command modules (``afunix.cli.<command>``) among *names*."""
    return {command.module for command in COMMANDS} & names


HEAVY = {"asyncio", "afunix.broker", "afunix.bench", "afunix.server", "afunix.aio"}


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["no-such-command"], []],
    ids=["help", "version", "unknown", "nothing"],
)
def test_afunix_help_imports_no_command_module(argv: list[str], tmp_path: Path) -> None:
    names = imported(tmp_path, "-m", "afunix", *argv)
    assert command_modules(names) == set()
    assert names & HEAVY == set()


def test_a_command_imports_its_own_module_only(tmp_path: Path) -> None:
    names = imported(tmp_path, "-m", "afunix", "--debug", "bind", "--help")
    assert command_modules(names) == {"afunix.cli.bind"}
    assert names & HEAVY == set()
    assert command_modules(imported(tmp_path, "-m", "afunix", "bench", "--help")) == {
        "afunix.cli.bench"
    }


def test_import_afunix_loads_no_asyncio_broker_bench_cli_nor_subprocess(tmp_path: Path) -> None:
    """``subprocess``, ``tempfile`` and ``shutil`` (``random``, ``bz2``, ``lzma``) come with
    the first ``ssh://`` connect or datagram reply directory, not with ``import afunix``.
    (``selectors`` and ``threading`` stay: ``socket`` and ``channel`` need them.)"""
    names = imported(tmp_path, "-c", "import afunix")
    for heavy in [*HEAVY, "afunix.cli", "afunix._remote", "subprocess", "shlex", "tempfile"]:
        assert heavy not in names, heavy
    for heavy in ["shutil", "random", "bz2", "lzma"]:
        assert heavy not in names, heavy


def test_import_afunix_bench_loads_none_of_its_parts_until_used(tmp_path: Path) -> None:
    names = imported(tmp_path, "-c", "import afunix.bench")
    parts = {n for n in names if n.startswith("afunix.bench.")}
    assert parts == set()
    assert names & {"matplotlib", "rich", "asyncio", "subprocess", "multiprocessing"} == set()
    code = (
        "import sys, afunix.bench as b\n"
        "assert 'CASES' in dir(b) and 'CASES' not in vars(b)\n"
        "cases = b.CASES\n"
        "assert vars(b)['CASES'] is cases\n"  # kept: the next lookup is a plain one
        "from afunix.bench import to_json\n"
        "print(sorted(m for m in sys.modules if m.startswith('afunix.bench.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "afunix.bench._spec" in out.stdout and "afunix.bench._report" in out.stdout
    assert "impl_" not in out.stdout and "_plot" not in out.stdout


def test_unknown_names_of_afunix_bench_are_attribute_errors() -> None:
    import afunix.bench

    with pytest.raises(AttributeError, match=r"module 'afunix\.bench' has no attribute 'nope'"):
        afunix.bench.nope


# ------------------------------------------------------------- the command table


def _registered(module: str) -> list[tuple[str, str | None]]:
    """What a command module's ``register`` adds: ``(name, help)`` of each parser."""
    sub = argparse.ArgumentParser(prog="afunix").add_subparsers()
    importlib.import_module(module).register(sub)
    return [(action.dest, action.help) for action in sub._choices_actions]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_the_static_table_says_what_register_does(command: afunix.cli.Command) -> None:
    """The table cannot drift: its name and help are the module's own."""
    assert _registered(command.module) == [(command.name, command.help)]


def test_every_command_module_is_in_the_table_once() -> None:
    found = {
        f"afunix.cli.{info.name}"
        for info in pkgutil.iter_modules(afunix.cli.__path__)
        if hasattr(importlib.import_module(f"afunix.cli.{info.name}"), "register")
    }
    listed = [command.module for command in COMMANDS]
    assert len(set(listed)) == len(listed) == 18
    assert found == set(listed)


def _options(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], str]]:
    return [(tuple(a.option_strings), a.dest) for a in parser._actions]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_the_parser_built_for_one_command_is_the_full_one(command: afunix.cli.Command) -> None:
    """What ``afunix CMD ...`` parses with has every option of the full parser; the other
    commands keep their names (for ``--help`` and an unknown command's list)."""
    full = _commands(build_parser())
    lazy = _commands(build_parser([command.name]))
    assert list(lazy) == list(full) == [c.name for c in COMMANDS]
    assert _options(lazy[command.name]) == _options(full[command.name])
    assert lazy[command.name].format_help() == full[command.name].format_help()


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ([], []),
        (["--help"], []),
        (["--debug", "bind", "@x"], ["bind"]),
        (["send-fds", "serve"], ["send-fds"]),
        (["--", "ls"], ["ls"]),
        (["comp"], []),  # no abbreviations: argparse refuses it with the list
        (["--version", "no-such"], []),
    ],
)
def test_the_command_is_the_first_argument_that_is_not_an_option(
    args: list[str], want: list[str]
) -> None:
    assert command_named(args) == want


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("afunix comp", []),  # completing the command name: no module needed
        ("afunix connect --re", ["connect"]),
        ("afunix --debug serve ", ["serve"]),
        ("afunix serve 'unclosed", None),  # not splittable: every module, never wrong
    ],
)
def test_completion_builds_the_parser_of_the_command_on_the_line(
    line: str, want: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    assert afunix.cli._completion_commands() == want
