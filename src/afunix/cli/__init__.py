"""The ``afunix`` command line: one module per command group.

Each command module has ``register(subparsers)`` that adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace``, returning an exit status).
Errors become one line on stderr and a non-zero exit; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._common import BadArgument, report_error, run

#: Command modules, in the order ``--help`` lists them.
COMMANDS = [
    "bind",
    "pair",
    "serve",
    "connect",
    "creds",
    "load",
    "bench",
    "broker",
    "open",
    "openfile",
    "cat",
    "send-fds",
    "ls",
    "probe",
    "tour",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afunix",
        description=(
            "Unix-domain socket IPC from the shell: bind, serve, connect, pass "
            "descriptors and check credentials (after Stevens' UNP, chapter 15)."
        ),
        epilog="Addresses: /path, unix:/path, @abstract, unix-abstract:name, tcp://host:port. "
        "Run 'afunix COMMAND --help' for a command's options; 'afunix tour' for a live tour.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afunix`` console script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except BadArgument as bad:  # e.g. a path too long: one line, not a usage message
        return report_error(bad.error, debug="--debug" in argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
