"""``afunix serve ADDR``: an echo server (UNP 15.5, 15.6) with every model and option."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .._sockets import socket_type
from ..server import Handler, Model, Server, echo_handler
from ._common import SOCKET_TYPES, address_arg, mode_arg


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run a server on ADDR (echo by default)",
        description=(
            "Serve on ADDR. By default an echo server: bytes are echoed on stream and "
            "seqpacket sockets, each datagram is sent back to its sender on datagram "
            "sockets. A stale socket file at ADDR is replaced; a live one is refused. "
            "SIGTERM or Ctrl-C stops accepting, lets connections finish "
            "(--shutdown-timeout) and removes the socket file."
        ),
        epilog="Example: afunix serve /tmp/echo.sock --model fork --mode 660 --group staff",
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="where to listen")
    p.add_argument("--type", choices=SOCKET_TYPES, default="stream", help="socket type")
    p.add_argument(
        "--model",
        choices=["async", "asyncio", "thread", "fork"],
        default="async",
        help="concurrency: one event loop (default), a thread or a child process per client",
    )
    p.add_argument("--mode", type=mode_arg, help="socket file mode, e.g. 660")
    p.add_argument("--owner", help="socket file owner (user name or uid)")
    p.add_argument("--group", help="socket file group (group name or gid)")
    p.add_argument("--parent-mode", type=mode_arg, help="create a missing parent directory")
    p.add_argument("--backlog", type=int, default=128, help="listen queue length")
    p.add_argument("--max-clients", type=int, help="at most this many clients at once")
    p.add_argument(
        "--shutdown-timeout", type=float, default=5.0, help="seconds to let clients finish"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each connection")
    p.set_defaults(func=cmd_serve)


def pick_handler(args: argparse.Namespace, model: Model, sock_type: int) -> Handler:
    """The handler the options ask for (echo unless a --show-* option is given)."""
    return echo_handler(model, sock_type)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="afunix serve: %(message)s",
        stream=sys.stderr,
    )
    model: Model = "asyncio" if args.model == "async" else args.model
    sock_type = socket_type(args.type)
    server = Server(
        args.address,
        pick_handler(args, model, sock_type),
        type=args.type,
        model=model,
        backlog=args.backlog,
        mode=args.mode,
        owner=args.owner,
        group=args.group,
        parent_mode=args.parent_mode,
        max_clients=args.max_clients,
        shutdown_timeout=args.shutdown_timeout,
    )
    print(
        f"afunix: serving {args.type} on {server.address.describe()} (model {model}); "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()
    return 0
