"""``afunix cat FILE...``: the book's ``mycat`` (UNP figure 15.7), through ``my_open``."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from ..opener import my_open
from ._common import describe_error


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cat",
        help="print files opened by a helper process that passes the descriptors (mycat)",
        description=(
            "The book's mycat: each FILE is opened not by this process but by a helper "
            "(afunix openfile, or --helper) run through my_open, which passes the "
            "descriptor back over a socketpair; the helper's exit status is the errno "
            "when it fails. The contents are copied to standard output."
        ),
        epilog="Example: afunix cat /etc/hostname --helper ./openfile",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--helper",
        help="the helper program (a command line; default: afunix openfile)",
    )
    p.add_argument(
        "--broker",
        metavar="ADDR",
        help="ask the descriptor broker at ADDR to open each FILE instead (afunix broker)",
    )
    p.set_defaults(func=cmd_cat)


def copy_fd(fd: int, out: int) -> int:
    """Copy *fd* to *out* until end of file; returns the bytes copied."""
    total = 0
    while chunk := os.read(fd, 65536):
        view = memoryview(chunk)
        while view:
            n = os.write(out, view)
            view = view[n:]
        total += len(chunk)
    return total


def cmd_cat(args: argparse.Namespace) -> int:
    if getattr(args, "broker", None):
        from ..broker.client import Client

        with Client(args.broker) as broker:
            return _cat(args, lambda name: broker.open_fd(name, os.O_RDONLY))
    helper = shlex.split(args.helper) if args.helper else None
    return _cat(args, lambda name: my_open(name, os.O_RDONLY, helper=helper))


def _cat(args: argparse.Namespace, opener: Callable[[str], int]) -> int:
    status = 0
    sys.stdout.flush()
    out = sys.stdout.fileno()
    for name in args.files:
        try:
            fd = opener(name)
        except OSError as exc:
            why = exc.strerror if exc.filename == name else describe_error(exc)
            print(f"afunix cat: cannot open {name}: {why}", file=sys.stderr)
            status = 1
            continue
        try:
            copy_fd(fd, out)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            print(f"afunix cat: {name}: {exc.strerror}", file=sys.stderr)
            status = 1
        finally:
            os.close(fd)
    return status
