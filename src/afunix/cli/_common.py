"""What every command shares: error reporting, JSON output, argument types."""

from __future__ import annotations

import argparse
import errno
import json
import math
import mmap
import os
import sys
import threading
import traceback
from collections.abc import Callable
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


MAX_SECONDS = 365 * 24 * 3600
"""The longest time any option takes: 365 days (31,536,000 s).

Longer waits overflow the kernel's timeouts (``settimeout(1e10)`` raises
``OverflowError``); leave a timeout option out for no limit at all.
"""

INT_MAX = 2**31 - 1
"""The largest C ``int``: the kernel's limit for counts such as ``listen()``'s backlog."""

ID_MAX = 2**32 - 2
"""The largest user or group id (``(uid_t)-1`` means "no id" to the kernel)."""


def seconds_arg(*, zero: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number of seconds, above 0 (or from 0 when *zero*).

    Negative, ``nan`` and ``inf`` values are usage errors (exit status 2) whose
    message says what is allowed, e.g.::

        afunix serve: error: argument --idle-timeout: -1 is not allowed: give a
        number of seconds above 0, at most 31536000 (such as 0.5 or 30)
    """
    allowed = f"from 0 to {MAX_SECONDS}" if zero else f"above 0, at most {MAX_SECONDS}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{text} is not allowed: give a number of seconds {allowed} "
                f"(such as {'0, ' if zero else ''}0.5 or 30)"
            )
        if value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(
                f"{text} is too long: at most {MAX_SECONDS} seconds (365 days); "
                "leave the option out for no limit"
            )
        return value

    parse.__name__ = "seconds"
    return parse


def count_arg(minimum: int = 1, maximum: int = INT_MAX, *, what: str = "") -> Callable[[str], int]:
    """argparse type: a whole number from *minimum* to *maximum* (decimal).

    *what* names the kind of number in the message ("a user id"); out of range
    or not a whole number is a usage error (exit status 2).
    """
    kind = what or "a whole number"

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{text} is not allowed: give {kind} from {minimum} to {maximum}"
            )
        return value

    parse.__name__ = "count"
    return parse


def id_arg(what: str) -> Callable[[str], int]:
    """argparse type: a numeric user, group or process id (0 or more)."""
    return count_arg(0, ID_MAX if what != "a process id" else INT_MAX, what=what)


def print_line(text: str) -> None:
    """Print a line that names files, writing undecodable bytes back as they were.

    A non-UTF-8 path decodes to lone surrogates; ``print`` fails on them under
    most locales. Like C's ``printf``, this writes the path's original bytes.
    """
    sys.stdout.flush()
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.buffer.write(text.encode(encoding, "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()


class ServerOutput:
    """What a server prints on standard output for its user (peers, descriptors).

    A server must never fail a client because of its own standard output: a
    pager quit, ``| head`` exited, the disk is full. The first write that fails
    (``EPIPE``, ``ENOSPC``, ``EIO``, ...) makes the server say so in one line
    on standard error and stop printing; it goes on serving every client as
    before. Standard output is then pointed at ``/dev/null``, so that the
    interpreter's flush at exit does not fail again.

    Created before serving: the "stopped printing" flag lives in a shared
    anonymous mapping, so that with the fork model the first child that finds
    standard output gone stops the others printing as well (one line on
    standard error, not one per client). Thread-safe.
    """

    def __init__(self, command: str = "afunix serve") -> None:
        self.command = command
        self._lock = threading.Lock()
        self._stopped = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: seen across fork()

    @property
    def stopped(self) -> bool:
        """Whether printing stopped because standard output failed."""
        return self._stopped[0] != 0

    def lines(self, *texts: str) -> None:
        """Print *texts*, one line each (bytes of undecodable paths kept), then flush."""
        with self._lock:
            if self.stopped:
                return
            try:
                if sys.stdout is None:  # started with standard output closed
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                for text in texts:
                    print_line(text)
            except OSError as exc:
                self._stop(exc)

    def _stop(self, exc: OSError) -> None:
        self._stopped[0] = 1
        # Only when sys.stdout exists: started with descriptor 1 closed, the
        # number may since belong to a socket, which must not be replaced.
        try:
            if sys.stdout is not None:
                devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.dup2(devnull, sys.stdout.fileno())
                finally:
                    os.close(devnull)
        except (OSError, ValueError):
            pass
        try:
            print(
                f"{self.command}: cannot write to standard output ({describe_error(exc)}); "
                "no longer printing, still serving",
                file=sys.stderr,
                flush=True,
            )
        except (OSError, AttributeError):
            pass


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=None, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


SOCKET_TYPES = ["stream", "dgram", "seqpacket"]
