"""What every command shares: exit statuses, error reporting, JSON output, argument types.

For command authors (every module in :data:`afunix.cli.COMMANDS`):

* **Listing.** A new command module joins :data:`afunix.cli.COMMANDS` with
  its name and the one-line help its ``register`` gives: ``afunix --help``
  lists the table without importing the module (tests/unit/test_lazy_imports.py
  fails when the two differ). Import what only running the command needs
  (asyncio, the broker, rich) inside the module, not in this one.
* **Exit status.** Return 0 on success; raise an exception for a failure and
  :func:`run` turns it into one ``afunix: error: ...`` line on standard error
  and the status :func:`exit_status` picks (the table in :data:`EXIT_STATUSES`,
  after sysexits.h). Raise :class:`UsageError` for a wrong combination of
  options (status 2, as argparse does for a bad option); raise
  :class:`NoInput` when a file the user named as input cannot be read (66).
  A command may define statuses of its own (``openfile`` exits with the errno,
  as the book's program does; ``load`` exits 1 when requests failed; ``probe``
  has one status per verdict): say so in its ``--help`` and in
  docs/operations.md, and use numbers outside the table or the table's own.
* **JSON.** Add ``--json`` with :func:`add_json_option`; print the result with
  :func:`emit_json` ``("COMMAND", {...})``: one object on one line, its first
  key ``"schema": "afunix.COMMAND/1"``, never ``NaN`` or ``Infinity`` (a value
  that is not a finite number is a bug, reported as exit status 70). Errors stay
  one line on standard error in JSON mode too. Document the fields in
  docs/cli-json.md; add fields freely, never change or remove one without
  bumping the version in the schema name.
* **--debug** is accepted before and after the command name (added to every
  command's parser by :func:`afunix.cli.build_parser`); read it as
  ``getattr(args, "debug", False)``.
* **Progress** of a long run: :func:`progress_console` gives a rich console on
  standard error when standard error is a terminal, else ``None`` (show no
  progress). Rich honours ``NO_COLOR``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import mmap
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from .. import Address, AddressKind, AfunixError, PeerError

EX_OK = 0
EX_GENERIC = 1
EX_USAGE_ARGPARSE = 2
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
EX_INTERRUPTED = 130
EX_STDOUT_CLOSED = 141

EXIT_STATUSES: list[tuple[int, str, str]] = [
    (EX_OK, "success", "success"),
    (EX_GENERIC, "failed", "failed for a command's own reason (load: some requests failed)"),
    (EX_USAGE_ARGPARSE, "usage", "usage error: a bad option or argument, or a bad combination"),
    (EX_DATAERR, "bad data", "the peer broke the protocol, or a value is invalid (EINVAL)"),
    (EX_NOINPUT, "no input", "an input file named on the command line cannot be opened"),
    (EX_UNAVAILABLE, "unavailable", "no such socket, nothing listening, wrong socket type"),
    (EX_SOFTWARE, "internal error", "a bug in afunix (--debug shows the traceback)"),
    (EX_CANTCREAT, "cannot create", "cannot create the socket file: address in use, file there"),
    (EX_IOERR, "I/O error", "connection reset or closed by the peer, EIO, disk full"),
    (EX_TEMPFAIL, "try again", "timed out, EAGAIN, listen queue full, out of descriptors"),
    (EX_NOPERM, "permission denied", "EACCES, EPERM, or the server refused this client"),
    (EX_CONFIG, "bad config", "a policy file (broker or peer policy) is invalid or unreadable"),
    (EX_INTERRUPTED, "interrupted", "interrupted (Ctrl-C)"),
    (EX_STDOUT_CLOSED, "output closed", "standard output was closed (| head, a pager): silent"),
]
"""Exit statuses of every command, after BSD's sysexits.h: ``(status, label, meaning)``.

64 (``EX_USAGE``) is not used: a usage error is 2, as argparse makes it.
Never a raw errno, except where a command says otherwise (``openfile``).
"""

_ERRNO_STATUS: dict[int, int] = {}
for _status, _names in (
    (EX_DATAERR, ("EPROTO", "EBADMSG", "EINVAL", "EILSEQ")),
    (
        EX_UNAVAILABLE,
        (
            "ENOENT",
            "ENOTDIR",
            "ECONNREFUSED",
            "ENOTSOCK",
            "EPROTOTYPE",
            "EHOSTUNREACH",
            "ENETUNREACH",
            "EADDRNOTAVAIL",
            "ENOTCONN",
            "ESRCH",
            "EOPNOTSUPP",
            "ENOTSUP",
            "EAFNOSUPPORT",
            "EPROTONOSUPPORT",
        ),
    ),
    (EX_CANTCREAT, ("EADDRINUSE", "EEXIST", "EROFS")),
    (
        EX_IOERR,
        ("EIO", "EPIPE", "ECONNRESET", "ECONNABORTED", "ENOSPC", "EDQUOT", "EMSGSIZE", "EBADF"),
    ),
    (
        EX_TEMPFAIL,
        (
            "EAGAIN",
            "EWOULDBLOCK",
            "ETIMEDOUT",
            "EINTR",
            "ENOBUFS",
            "ENOMEM",
            "EMFILE",
            "ENFILE",
            "EBUSY",
            "EINPROGRESS",
        ),
    ),
    (EX_NOPERM, ("EACCES", "EPERM")),
):
    for _name in _names:
        if hasattr(errno, _name):
            _ERRNO_STATUS.setdefault(getattr(errno, _name), _status)


class UsageError(ValueError):
    """A wrong combination of options found after parsing: exit status 2, one line."""


class NoInput(OSError):
    """An input file named on the command line cannot be opened: exit status 66.

    Keeps the errno and file name of the failed open (``NoInput.wrap(exc)``).
    """

    @classmethod
    def wrap(cls, exc: OSError) -> NoInput:
        return cls(exc.errno, exc.strerror or str(exc), exc.filename)


_STATUS_ATTR = "afunix_exit_status"


@contextlib.contextmanager
def creating_socket() -> Iterator[None]:
    """Around the creation of a socket file (bind, serve, broker): ``ENOENT`` means 73.

    By errno alone, ``ENOENT`` is "no such socket" (69, for a client); when
    creating one it means that the directory is missing: the file cannot be
    created (73, ``EX_CANTCREAT``), as with ``EADDRINUSE`` and ``EEXIST``.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            setattr(exc, _STATUS_ATTR, EX_CANTCREAT)
        raise


def exit_status(exc: BaseException) -> int:
    """The exit status for a command that failed with *exc* (see :data:`EXIT_STATUSES`).

    The one mapping from exceptions and errnos to statuses: usage errors 2, an
    invalid policy 78, an unreadable input file 66, a peer breaking the protocol
    65, then by errno; an errno outside the table is 1, and an exception that is
    not an ``OSError``, ``ValueError`` or ``TypeError`` is a bug (70).
    """
    from .. import PolicyError  # the broker's PolicyFileError is one too

    if isinstance(getattr(exc, _STATUS_ATTR, None), int):
        return int(getattr(exc, _STATUS_ATTR))
    if isinstance(exc, KeyboardInterrupt):
        return EX_INTERRUPTED
    if isinstance(exc, (UsageError, BadArgument)):
        return EX_USAGE_ARGPARSE
    if isinstance(exc, PolicyError):
        return EX_CONFIG
    if isinstance(exc, NoInput):
        return EX_NOINPUT
    if isinstance(exc, OSError):
        status = _ERRNO_STATUS.get(exc.errno or 0)
        if status is not None:
            return status
        return EX_DATAERR if isinstance(exc, PeerError) else EX_GENERIC
    if isinstance(exc, (ValueError, TypeError)):
        return EX_DATAERR
    return EX_SOFTWARE


def exit_status_epilog() -> str:
    """The short exit-status table for ``afunix --help``."""
    return "Exit status: " + ", ".join(f"{status} {label}" for status, label, _ in EXIT_STATUSES)


def run(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; turn exceptions into one line on stderr and a status."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except BrokenPipeError:
        # stdout closed by a pager or `head`: not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EX_STDOUT_CLOSED
    except Exception as exc:
        return report_error(exc, debug=getattr(args, "debug", False))


def report_error(exc: BaseException, *, debug: bool = False) -> int:
    """Print *exc* as one ``afunix: error: ...`` line (traceback first if *debug*).

    Returns the exit status :func:`exit_status` gives.
    """
    if debug:
        traceback.print_exception(exc)
    status = exit_status(exc)
    text = describe_error(exc.error if isinstance(exc, BadArgument) else exc)
    if status == EX_SOFTWARE:
        text = (
            f"internal error: {type(exc).__name__}: {text} (a bug in afunix: "
            "run again with --debug for the traceback and report it)"
        )
    print(f"afunix: error: {text}", file=sys.stderr)
    return status


class BadArgument(Exception):
    """An argument argparse read but afunix refuses, such as a path too long for ``sun_path``.

    Deliberately not a ``ValueError``: argparse would turn it into a usage
    message. :func:`afunix.cli.main` reports ``error`` in one line instead,
    with exit status 2 (a usage error), its errno named in the message.
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


def add_json_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """Add ``--json``: print *what* as one JSON object (schema in docs/cli-json.md)."""
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as one JSON object (fields: docs/cli-json.md)",
    )


def json_text(command: str, data: dict[str, Any]) -> str:
    """*data* as one line of JSON, ``"schema": "afunix.COMMAND/1"`` first.

    Refuses ``NaN`` and infinities (``ValueError``): JSON has no such numbers
    and strict parsers reject them; a command gives ``null`` for "no value".
    """
    obj = {"schema": f"afunix.{command}/1", **data}
    return json.dumps(obj, allow_nan=False, separators=(", ", ": "))


def emit_json(command: str, data: dict[str, Any]) -> None:
    """Print :func:`json_text` of *data* on standard output (bytes of odd paths kept)."""
    print_line(json_text(command, data))


def strict_json(data: Any) -> Any:
    """*data* with every ``NaN`` and infinity (at any depth) made ``None``.

    For output that holds measured figures (``bench``): a figure that could
    not be measured is ``null`` in the JSON, never the invalid ``NaN``.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def progress_console() -> Any:
    """A rich ``Console`` on standard error for a progress display, or ``None``.

    ``None`` when standard error is not a terminal (a pipe, a file, a CI log:
    no progress at all) or when rich is not installed. Rich honours
    ``NO_COLOR`` (https://no-color.org): colours off, the bar still moves.
    """
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is in the cli extra
        return None
    return Console(stderr=True)


SOCKET_TYPES = ["stream", "dgram", "seqpacket"]


def add_tls_options(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """``--cert``, ``--key``, ``--ca``: the TLS context of a ``tls://`` server or client."""
    g = parser.add_argument_group(
        "tls:// (mutual TLS)",
        (
            "A tls:// server needs --cert and --key; with --ca it requires every client "
            "to show a certificate signed by that CA (mutual TLS), and may then listen "
            "beyond loopback without --allow-remote. --allow-tls-name NAME allows only "
            "certificates with that name (CN, DNS or URI)."
        )
        if server
        else (
            "The server's certificate is checked against --ca (default: the system's "
            "CAs) and the host of ADDR. --cert and --key give this client's own "
            "certificate, which a mutual-TLS server requires."
        ),
    )
    g.add_argument("--cert", metavar="PEM", help="this side's certificate chain (PEM)")
    g.add_argument("--key", metavar="PEM", help="its private key (default: in --cert)")
    g.add_argument(
        "--ca",
        metavar="PEM",
        help="CA certificates to trust: clients' (server) or the server's (client)",
    )


def tls_context(args: argparse.Namespace, address: Address, *, server: bool) -> Any:
    """The ``ssl.SSLContext`` the TLS options describe for *address*; ``None`` unless
    it is ``tls://``. Options without ``tls://``, or a server without ``--cert``, are
    usage errors."""
    given = [o for o in ("cert", "key", "ca") if getattr(args, o, None)]
    if address.kind is not AddressKind.TLS:
        if given:
            raise UsageError(f"--{given[0]} is for tls:// addresses, not {address.describe()}")
        return None
    if server and not args.cert:
        raise UsageError(f"serving {address} needs --cert (and --key unless it is in --cert)")
    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    import ssl

    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    try:
        ctx = ssl.create_default_context(purpose, cafile=args.ca)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except ssl.SSLError as exc:
        raise NoInput(errno.EINVAL, f"cannot use the TLS files given: {exc}") from exc
    except OSError as exc:
        raise NoInput.wrap(exc) from exc
    if server and args.ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
