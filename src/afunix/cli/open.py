"""``afunix open --broker ADDR PATH``: open a file through the descriptor broker."""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import stat
import sys
from typing import Any

from ..broker.client import Client
from ._common import NoInput, UsageError, add_json_option, emit_json, mode_arg, seconds_arg


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "open",
        help="open PATH through a descriptor broker; print it, write stdin to it, or list it",
        description=(
            "Ask the broker at ADDR to open PATH for you and use the descriptor it passes "
            "back. By default the file is read and copied to standard output. With --write "
            "or --append, standard input is written to it; with --list, the names in the "
            "directory are printed; with --stat, what was received is described instead. "
            "Errors are the ones open() would give (e.g. 'Permission denied' when the "
            "policy does not grant it)."
        ),
        epilog=(
            "Examples: afunix open --broker /run/afunix-broker.sock /srv/data/report.txt; "
            "echo hello | afunix open --broker @broker /srv/out/new.txt --write --create "
            "--excl --mode 640"
        ),
    )
    p.add_argument(
        "--broker",
        metavar="ADDR",
        default=os.environ.get("AFUNIX_BROKER"),
        help="the broker's socket (default: $AFUNIX_BROKER)",
    )
    p.add_argument("path", metavar="PATH", help="the file to open (relative: to the cwd)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--write", action="store_true", help="open write-only; copy stdin into it")
    how.add_argument("--append", action="store_true", help="open for appending; copy stdin")
    how.add_argument("--list", action="store_true", help="a directory descriptor: list names")
    p.add_argument("--create", action="store_true", help="create the file if missing (O_CREAT)")
    p.add_argument("--excl", action="store_true", help="fail if it exists (O_EXCL)")
    p.add_argument("--truncate", action="store_true", help="truncate it (O_TRUNC)")
    p.add_argument(
        "--mode", type=mode_arg, default=0o666, help="mode for a created file (default 666)"
    )
    p.add_argument("--nofollow", action="store_true", help="refuse a symlink as last component")
    p.add_argument("--stat", action="store_true", help="describe the received descriptor")
    add_json_option(p, "what --stat describes (instead of the file's contents)")
    p.add_argument(
        "--timeout", type=seconds_arg(), default=10.0, help="seconds to wait for the broker"
    )
    p.set_defaults(func=cmd_open)


def open_flags(args: argparse.Namespace) -> int:
    """The ``os.O_*`` flags the options ask for."""
    if args.list:
        flags = os.O_RDONLY | os.O_DIRECTORY
    elif args.append:
        flags = os.O_WRONLY | os.O_APPEND
    elif args.write:
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if args.create:
        flags |= os.O_CREAT
    if args.excl:
        flags |= os.O_EXCL
    if args.truncate:
        flags |= os.O_TRUNC
    if args.nofollow:
        flags |= os.O_NOFOLLOW
    return flags


def _describe(fd: int, path: str) -> str:
    st = os.fstat(fd)
    access = {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only", os.O_RDWR: "read-write"}
    how = access.get(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, "?")
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "regular file"
    return (
        f"received fd {fd} for {path}: {kind}, {how}, inode {st.st_ino} on device "
        f"{st.st_dev}, {st.st_size} bytes, mode {stat.filemode(st.st_mode)}, "
        f"owner {st.st_uid}:{st.st_gid}"
    )


def _fields(fd: int, path: str) -> dict[str, object]:
    """What ``--json`` reports of the received descriptor (the facts ``--stat`` prints)."""
    st = os.fstat(fd)
    access = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}
    return {
        "path": path,
        "kind": "directory" if stat.S_ISDIR(st.st_mode) else "regular file",
        "access": access.get(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, "?"),
        "inode": st.st_ino,
        "device": st.st_dev,
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _with_reason(exc: OSError) -> OSError:
    """Add the broker's one-line reason (if any) to an open error."""
    reason = getattr(exc, "broker_reason", "")
    if not reason:
        return exc
    return OSError(exc.errno, f"{exc.strerror} (broker: {reason})", exc.filename)


def cmd_open(args: argparse.Namespace) -> int:
    if not args.broker:
        raise UsageError("no broker: give --broker ADDR or set $AFUNIX_BROKER")
    with Client(args.broker, timeout=args.timeout) as client:
        try:
            fd = client.open_fd(args.path, open_flags(args), args.mode)
        except OSError as exc:
            error = _with_reason(exc)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # the file named: no input (66)
                error = NoInput(error.errno, error.strerror or str(error), error.filename)
            raise error from None
    try:
        if args.json:
            emit_json("open", _fields(fd, args.path))
        elif args.stat:
            print(_describe(fd, args.path))
        elif args.list:
            for name in sorted(os.listdir(fd)):
                print(name)
        elif args.write or args.append:
            with os.fdopen(fd, "ab" if args.append else "wb", closefd=False) as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
        else:
            with os.fdopen(fd, "rb", closefd=False) as f:
                shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    finally:
        os.close(fd)
    return 0
