"""The ``afunix`` command line: one module per command group.

Each command module has ``register(subparsers)`` that adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace``, returning an exit status).
The command line lists its commands from the static table :data:`COMMANDS`
(name, one-line help, module) and imports only the module of the command it
runs: ``afunix --help`` imports no command module (nor the broker, the
benchmarks or asyncio they use). A new command joins the table; a unit test
checks that the table says what each module's ``register`` does.
Errors become one line on stderr and an exit status from the table in
:mod:`afunix.cli._common` (after sysexits.h; 2 only for usage errors);
``--debug``, before or after the command name, shows the traceback. The
conventions a command follows (``--json``, statuses, progress) are described
at the top of :mod:`afunix.cli._common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._common import BadArgument, exit_status_epilog, report_error, run


@dataclass(frozen=True)
class Command:
    """One command of :data:`COMMANDS`: what ``afunix --help`` lists without importing it."""

    name: str
    """The command name, as typed (``send-fds``)."""
    help: str
    """The one-line help: the same text as the module's ``register`` gives."""

    @property
    def module(self) -> str:
        """The module that implements it (``afunix.cli.send_fds``)."""
        return f"{__name__}.{self.name.replace('-', '_')}"


#: Every command, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command("bind", "bind a socket, print getsockname() and the file's mode (unixbind)"),
    Command("pair", "socketpair between a parent and its child: messages both ways"),
    Command("serve", "run a server on ADDR (echo by default)"),
    Command("connect", "send standard input to ADDR, print replies (like nc -U)"),
    Command("dial-stdio", "relay standard input and output to ADDR (for ssh's ProxyCommand)"),
    Command("creds", "ask a 'serve --show-creds' server what it sees of this client"),
    Command("load", "load-test an echo server: latency percentiles, errors, connections held"),
    Command("bench", "benchmark Unix-domain IPC against a C baseline, TCP, pipes, zmq, asyncio"),
    Command("broker", "open files for other processes by policy and pass the descriptors back"),
    Command(
        "open", "open PATH through a descriptor broker; print it, write stdin to it, or list it"
    ),
    Command(
        "openfile", "helper of my_open: open PATH, pass the descriptor on SOCKFD, exit with errno"
    ),
    Command("cat", "print files opened by a helper process that passes the descriptors (mycat)"),
    Command(
        "send-fds", "open FILEs and pass their descriptors to ADDR (SCM_RIGHTS, one-byte payload)"
    ),
    Command(
        "spy",
        "relay clients from LISTEN to the server at TARGET, showing bytes, "
        "descriptors and credentials",
    ),
    Command("ls", "list every Unix socket: address, type, state, holder, peer, queues"),
    Command(
        "probe", "say what is at an address: live, stale, starting, denied, not a socket, nothing"
    ),
    Command("tour", "run every section of UNP chapter 15 live, narrated"),
    Command("completion", "print a shell completion script (bash, zsh, fish)"),
)


def version_text() -> str:
    """What ``afunix --version`` prints: version, core, Python and platform, one per line."""
    import afunix

    return (
        f"afunix {afunix.__version__}\n"
        f"core: {afunix.__core__}\n"
        f"python: {platform.python_implementation()} {platform.python_version()}\n"
        f"platform: {platform.platform()}"
    )


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` as it is (argparse's own reflows it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``afunix`` parser; *commands* says which command modules to import.

    ``None`` (the default): every command's module is imported and registers its
    full parser, as the tests of options and completion of a whole line need.
    A collection of names: only those commands' modules are imported; every
    other command gets a parser with its name and help from :data:`COMMANDS`
    and nothing else, which is all ``afunix --help`` and the list of an
    unknown command's error show. :func:`main` passes the one command it runs.
    """
    wanted = None if commands is None else set(commands)
    parser = argparse.ArgumentParser(
        prog="afunix",
        description=(
            "Unix-domain socket IPC from the shell: bind, serve, connect, pass "
            "descriptors and check credentials (after Stevens' UNP, chapter 15)."
        ),
        epilog="Addresses: /path, unix:/path, @abstract, unix-abstract:name, tcp://host:port, "
        "ssh://[user@]host[:port]/path (a socket on another host, through ssh). "
        "Run 'afunix COMMAND --help' for a command's options; 'afunix tour' for a live tour. "
        f"{exit_status_epilog()} (details: docs/operations.md; openfile exits with the errno).",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show version, core, Python and platform"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        if wanted is None or command.name in wanted:
            importlib.import_module(command.module).register(sub)
        else:  # listed by --help; never parsed (main builds the real one to run it)
            sub.add_parser(command.name, help=command.help)
    for command_parser in sub.choices.values():
        # --debug after the command name too; SUPPRESS keeps a --debug given before it.
        command_parser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
    return parser


def command_named(args: Sequence[str]) -> list[str]:
    """The command that *args* (the arguments after ``afunix``) runs: ``[name]``, or ``[]``.

    The first argument that is not an option: ``afunix`` itself takes only
    options without values (``--debug``, ``--version``, ``--help``), so that is
    the command name (after ``--`` too, as argparse reads it). ``[]`` for none
    or a name not in :data:`COMMANDS` (argparse then says which names exist).
    """
    names = {command.name for command in COMMANDS}
    for arg in args:
        if not arg.startswith("-"):
            return [arg] if arg in names else []
    return []


def _completion_commands() -> list[str] | None:
    """The command of the line a shell asks completions for (``None``: import every one).

    The words before the one being completed, from ``COMP_LINE`` and
    ``COMP_POINT`` (argcomplete's protocol); a line shlex cannot split (an open
    quote) takes the full parser, so completion is never wrong, only slower.
    """
    import shlex

    line = os.environ.get("COMP_LINE", "")
    try:
        before = line[: int(os.environ.get("COMP_POINT", len(line)))]  # as argcomplete cuts it
        words = shlex.split(before)
    except ValueError:
        return None
    done = words[1:] if before.endswith((" ", "\t")) else words[1:-1]
    return command_named(done)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afunix`` console script.

    Builds only the parser of the command it runs (:func:`build_parser`), so
    ``afunix --help`` and a mistyped command import no command module.
    """
    completing = argv is None and "_ARGCOMPLETE" in os.environ  # a shell asks for completions
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_completion_commands() if completing else command_named(argv))
    if completing:
        from .completion import complete

        complete(parser)
    try:
        args = parser.parse_args(argv)
    except BadArgument as bad:  # e.g. a path too long: one line, not a usage message
        return report_error(bad, debug="--debug" in argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
