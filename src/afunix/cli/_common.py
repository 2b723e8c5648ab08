"""What every command shares: error reporting, JSON output, argument types."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from typing import Any

from .._address import Address
from .._errors import AfunixError


def run(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; turn exceptions into one line on stderr."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed by a pager or `head`: not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 141
    except (OSError, ValueError, TypeError) as exc:
        return report_error(exc, debug=getattr(args, "debug", False))


def report_error(exc: BaseException, *, debug: bool = False) -> int:
    """Print *exc* as one ``afunix: error: ...`` line (traceback first if *debug*).

    Returns the exit status: the errno when there is one (below 126), else 2.
    """
    if debug:
        traceback.print_exception(exc)
    print(f"afunix: error: {describe_error(exc)}", file=sys.stderr)
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno if exc.errno < 126 else 1
    return 2


class BadArgument(Exception):
    """An argument argparse read but afunix refuses, such as a path too long for ``sun_path``.

    Deliberately not a ``ValueError``: argparse would turn it into a usage
    message. :func:`afunix.cli.main` reports ``error`` in one line instead,
    with its errno as the exit status, like any other error.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, AfunixError):
        return str(exc)
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}" + (f" [{name}]" if name else "")
    return str(exc)


def address_arg(text: str) -> Address:
    """argparse type: parse an address; a bad one ends the run with one error line."""
    try:
        return Address.parse(text)
    except OSError as exc:
        raise BadArgument(exc) from exc


def mode_arg(text: str) -> int:
    """argparse type: an octal file mode such as 660 or 0o600."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mode must be octal like 660, not {text!r}") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode {text} is out of range 0-7777")
    return value


def print_line(text: str) -> None:
    """Print a line that names files, writing undecodable bytes back as they were.

    A non-UTF-8 path decodes to lone surrogates; ``print`` fails on them under
    most locales. Like C's ``printf``, this writes the path's original bytes.
    """
    sys.stdout.flush()
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.buffer.write(text.encode(encoding, "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=None, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


SOCKET_TYPES = ["stream", "dgram", "seqpacket"]
