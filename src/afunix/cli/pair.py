"""``afunix pair``: the seed's socketpair parent/child example (UNP 15.3), ending cleanly."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import pair
from ._common import count_arg


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pair",
        help="socketpair between a parent and its child: messages both ways",
        description=(
            "Create a socketpair, fork, and exchange messages both ways for --rounds "
            "rounds: the child writes 'i am children', the parent reads it and answers "
            "'i am father' (the seed's example, which loops forever; this one ends: "
            "the parent closes its end, the child sees end of file and exits)."
        ),
    )
    p.add_argument("--rounds", type=count_arg(), default=3, help="messages each way (default 3)")
    p.add_argument("--type", choices=["stream", "seqpacket", "dgram"], default="stream")
    p.set_defaults(func=cmd_pair)


def run_pair(rounds: int, sock_type: str, write: Any = print) -> int:
    """Run the exchange; returns the child's exit status."""
    parent_end, child_end = pair(sock_type)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child; checked through its output
        code = 0
        try:
            parent_end.close()
            for _ in range(rounds):
                child_end.sendall(b"i am children\n")
                data = child_end.recv(1024)
                if not data:
                    break
                write(f"children say : {data.decode().rstrip()}")
                sys.stdout.flush()
            # the parent closes its end when done: we see EOF (or the last reply)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    child_end.close()
    try:
        for _ in range(rounds):
            data = parent_end.recv(1024)
            if not data:
                break
            write(f"father say : {data.decode().rstrip()}")
            sys.stdout.flush()
            parent_end.sendall(b"i am father\n")
    finally:
        parent_end.close()
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cmd_pair(args: argparse.Namespace) -> int:
    code = run_pair(args.rounds, args.type)
    print(f"child exited with status {code}")
    return 0 if code == 0 else 1
