"""``afunix ls``: every Unix socket on the host, with holder, peer and queues."""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from typing import Any

from ..diag import Holder, UnixSocketInfo, dump_or_fallback, holders
from ._common import count_arg, emit_json, print_line

SCHEMA = "afunix.ls/1"
COLUMNS = ("INODE", "ADDRESS", "TYPE", "STATE", "PID", "COMMAND", "UID", "QUEUE", "PEER")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ls",
        help="list every Unix socket: address, type, state, holder, peer, queues",
        description=(
            "List every Unix-domain socket on the host (this network namespace), from the "
            "kernel's sock_diag interface: its path or @abstract name, type, state "
            "(listening, connected, unconnected), the process holding it (pid, command, "
            "uid, from /proc/*/fd), the peer of a connected socket and its holder, and "
            "queue lengths: for a listener, connections waiting to be accepted against "
            "its backlog (QUEUE 2/128); otherwise bytes waiting to be read / bytes sent "
            "and not yet read by the peer. Run as root to see every holder."
        ),
    )
    p.add_argument("--listening", action="store_true", help="only listening sockets")
    p.add_argument(
        "--path", metavar="PREFIX", help="only addresses starting with PREFIX (@ for abstract)"
    )
    p.add_argument("--pid", type=count_arg(1, what="a process id"), help="only sockets PID holds")
    p.add_argument(
        "--user", metavar="USER", type=user_arg, help="only sockets of USER (name or uid)"
    )
    p.add_argument("--json", action="store_true", help=f"print one JSON object ({SCHEMA})")
    p.set_defaults(func=cmd_ls)


def user_arg(text: str) -> int:
    """argparse type: a user name or a numeric uid."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user named {text!r}") from None


def _wanted(info: UnixSocketInfo, held: list[Holder], args: argparse.Namespace) -> bool:
    if args.listening and not info.listening:
        return False
    if args.path is not None and not (info.address or "").startswith(args.path):
        return False
    if args.pid is not None and all(h.pid != args.pid for h in held):
        return False
    return args.user is None or info.uid == args.user or any(h.uid == args.user for h in held)


def _holders_json(held: list[Holder]) -> list[dict[str, Any]]:
    return [{"pid": h.pid, "command": h.command, "uid": h.uid} for h in held]


def to_json(
    info: UnixSocketInfo, by_inode: dict[int, UnixSocketInfo], held: dict[int, list[Holder]]
) -> dict[str, Any]:
    """One socket as the documented ``afunix.ls/1`` object (docs/operations.md)."""
    peer = None
    if info.peer is not None:
        other = by_inode.get(info.peer)
        peer = {
            "inode": info.peer,
            "address": other.address if other else None,
            "holders": _holders_json(held.get(info.peer, [])),
        }
    listening = info.listening
    return {
        "inode": info.inode,
        "address": info.address,
        "type": info.type_name,
        "state": info.state_name,
        "uid": info.uid,
        "holders": _holders_json(held.get(info.inode, [])),
        "peer": peer,
        "accept_queue": info.rqueue if listening else None,
        "backlog": info.wqueue if listening else None,
        "pending": info.pending if listening else [],
        "rqueue": None if listening else info.rqueue,
        "wqueue": None if listening else info.wqueue,
    }


def _row(obj: dict[str, Any]) -> tuple[str, ...]:
    held = obj["holders"]
    first = held[0] if held else None
    more = f"+{len(held) - 1}" if len(held) > 1 else ""
    uid = first["uid"] if first else obj["uid"]
    if obj["accept_queue"] is not None:
        queue = f"{obj['accept_queue']}/{obj['backlog']}"
    elif obj["rqueue"] is not None:
        queue = f"{obj['rqueue']}/{obj['wqueue']}"
    else:
        queue = "-"
    peer = "-"
    if obj["peer"] is not None:
        p = obj["peer"]
        peer = p["address"] or f"ino {p['inode']}"
        if p["holders"]:
            peer += f" (pid {p['holders'][0]['pid']} {p['holders'][0]['command']})"
    return (
        str(obj["inode"]),
        obj["address"] or "-",
        obj["type"],
        obj["state"],
        f"{first['pid']}{more}" if first else "-",
        first["command"] if first else "-",
        "-" if uid is None else _user(uid),
        queue,
        peer,
    )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _plain(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for r in [COLUMNS, *rows]:
        print_line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _rich(rows: list[tuple[str, ...]]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    colour = "NO_COLOR" not in os.environ  # https://no-color.org: no colour, no bold
    table = Table(box=None, header_style="bold" if colour else "", pad_edge=False)
    for name in COLUMNS:
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(*r, style="green" if colour and r[3] == "listening" else None)
    Console(no_color=not colour, highlight=False).print(table)
    return True


def cmd_ls(args: argparse.Namespace) -> int:
    sockets, source = dump_or_fallback()
    held = holders()
    by_inode = {s.inode: s for s in sockets}
    chosen = [s for s in sockets if _wanted(s, held.get(s.inode, []), args)]
    chosen.sort(key=lambda s: (not s.listening, s.address is None, s.address or "", s.inode))
    objects = [to_json(s, by_inode, held) for s in chosen]
    if args.json:
        emit_json("ls", {"source": source, "sockets": objects})
        return 0
    rows = [_row(o) for o in objects]
    if not (sys.stdout.isatty() and _rich(rows)):
        _plain(rows)
    if source != "sock_diag":
        print(
            "afunix ls: sock_diag unavailable: read /proc/net/unix (no peers, queues or owners)",
            file=sys.stderr,
        )
    return 0
