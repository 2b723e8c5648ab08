"""The ``afunix`` command line: one module per command group.

Each command module has ``register(subparsers)`` that adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace``, returning an exit status).
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
from collections.abc import Sequence
from typing import Any

from ._common import BadArgument, exit_status_epilog, report_error, run

#: Command modules, in the order ``--help`` lists them.
COMMANDS = [
    "bind",
    "pair",
    "serve",
    "connect",
    "dial-stdio",
    "creds",
    "load",
    "bench",
    "broker",
    "open",
    "openfile",
    "cat",
    "send-fds",
    "spy",
    "ls",
    "probe",
    "tour",
    "completion",
]


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


def build_parser() -> argparse.ArgumentParser:
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
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        module.register(sub)
    for command in sub.choices.values():
        # --debug after the command name too; SUPPRESS keeps a --debug given before it.
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afunix`` console script."""
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell asks for completions
        from .completion import complete

        complete(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except BadArgument as bad:  # e.g. a path too long: one line, not a usage message
        return report_error(bad, debug="--debug" in argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
