"""``afunix probe ADDR``: what is at a Unix socket address, with one exit status per verdict."""

from __future__ import annotations

import argparse
import pwd
from typing import Any

from .. import Address, AddressKind
from ..probe import EXIT_STATUS, ProbeResult, probe
from ._common import address_arg, emit_json, print_line

SCHEMA = "afunix.probe/1"

EPILOG = """\
exit status (one per verdict):
  0  live        a server answers at ADDR (or listens with a full accept queue)
  3  nothing     no file at the path, or no socket bound to the abstract name
  4  not-socket  a file that is not a socket (regular file, directory, FIFO, ...)
  5  stale       a socket file nobody is bound to (its server is gone)
  6  starting    a socket is bound to ADDR but does not listen yet
  7  denied      this user may not reach the file or connect to it
  2  usage error (a bad ADDR, an unknown option)

The probe connects without blocking, reads the server's credentials
(SO_PEERCRED) and closes at once: the server sees one client that leaves.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "probe",
        help="say what is at an address: live, stale, starting, denied, not a socket, nothing",
        description=(
            "Say what is at ADDR (a socket path or @abstract name): nothing, a file that "
            "is not a socket, a stale socket file, a socket bound but not listening yet, "
            "permission denied, or a live server with its type, holder (pid, command, "
            "uid), credentials and accept queue."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("address", type=unix_address_arg, metavar="ADDR", help="path or @abstract name")
    p.add_argument("--json", action="store_true", help=f"print one JSON object ({SCHEMA})")
    p.set_defaults(func=cmd_probe)


def unix_address_arg(text: str) -> Address:
    """argparse type: a socket path or @abstract name (a TCP address is a usage error)."""
    addr = address_arg(text)
    if addr.kind not in (AddressKind.PATH, AddressKind.ABSTRACT):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Unix socket address: give a path or an @abstract name"
        )
    return addr


def to_json(result: ProbeResult) -> dict[str, Any]:
    """The documented ``afunix.probe/1`` object (docs/operations.md)."""
    server = None
    if result.server is not None:
        pid, uid, gid = result.server
        server = {"pid": pid, "uid": uid, "gid": gid}
    return {
        "schema": SCHEMA,
        "address": result.address,
        "verdict": result.verdict,
        "exit_status": result.exit_status,
        "detail": result.detail,
        "type": result.type,
        "inode": result.inode,
        "holders": [{"pid": h.pid, "command": h.command, "uid": h.uid} for h in result.holders],
        "server": server,
        "accept_queue": result.accept_queue,
        "backlog": result.backlog,
        "queue_full": result.queue_full,
    }


def user_name(uid: int) -> str:
    """``name(uid)`` when the user database knows *uid*, else the number."""
    try:
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except KeyError:
        return str(uid)


def render(result: ProbeResult) -> list[str]:
    """The human report: the verdict line, then what was learnt."""
    lines = [f"{result.address}: {result.verdict} - {result.detail}"]
    if result.type and result.verdict in ("live", "starting"):
        lines.append(
            f"  type      {result.type}" + (f", inode {result.inode}" if result.inode else "")
        )
    for h in result.holders:
        lines.append(f"  holder    pid {h.pid} ({h.command}), uid {user_name(h.uid)}")
    if result.server is not None:
        pid, uid, gid = result.server
        lines.append(f"  server    pid {pid}, uid {user_name(uid)}, gid {gid} (SO_PEERCRED)")
    if result.backlog is not None:
        lines.append(f"  queue     {result.accept_queue} waiting of backlog {result.backlog}")
    return lines


def cmd_probe(args: argparse.Namespace) -> int:
    result = probe(args.address)
    if args.json:
        emit_json("probe", to_json(result))
    else:
        for line in render(result):
            print_line(line)
    return EXIT_STATUS[result.verdict]
