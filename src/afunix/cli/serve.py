"""``afunix serve ADDR``: an echo server (UNP 15.5, 15.6) with every model and option."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from typing import Any

from ..lowlevel import socket_type
from ..server import Handler, Limits, Model, Server, echo_handler
from ._common import (
    SOCKET_TYPES,
    UsageError,
    add_tls_options,
    address_arg,
    count_arg,
    creating_socket,
    mode_arg,
    seconds_arg,
    tls_context,
)
from .creds import add_serve_options, policy_from_args, show_creds_handler


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run a server on ADDR (echo by default)",
        description=(
            "Serve on ADDR. By default an echo server: bytes are echoed on stream and "
            "seqpacket sockets, each datagram is sent back to its sender on datagram "
            "sockets. A stale socket file at ADDR is replaced; a live one is refused. "
            "ADDR may also be tcp://HOST:PORT (loopback only unless --allow-remote: plain "
            "TCP authenticates nobody) or tls://HOST:PORT (--cert and --key; --ca makes it "
            "mutual TLS, --allow-tls-name picks the client certificates allowed). "
            "SIGTERM or Ctrl-C stops accepting, lets connections finish "
            "(--shutdown-timeout) and removes the socket file. SIGUSR2 restarts without "
            "downtime: the same command is started again, takes over the listening socket "
            "(passed with SCM_RIGHTS), and this process finishes its connections and exits. "
            "Under systemd socket activation (LISTEN_FDS, with LISTEN_PID naming this "
            "process) the inherited socket is used instead of binding ADDR, and "
            "READY=1/STOPPING=1 go to NOTIFY_SOCKET; with WATCHDOG_USEC (WatchdogSec=) the "
            "serving loop sends WATCHDOG=1 at half that interval. serve has nothing to "
            "reload: use Type=notify, not notify-reload (see docs/operations.md). "
            "--show-creds and --show-fds print on standard output; if that fails (a closed "
            "pipe, a full disk) serve says so once on standard error, stops printing and "
            "goes on serving: only a peer policy (--allow-*) ever refuses a client. "
            "Numbers are checked: a negative, zero (where it makes no sense), nan or "
            "infinite value is a usage error (exit status 2)."
        ),
        epilog="Examples: afunix serve /tmp/echo.sock --model fork --mode 660 --group staff; "
        "afunix serve tcp://127.0.0.1:7000 --model thread; "
        "afunix serve tls://0.0.0.0:7443 --cert srv.pem --key srv.key --ca clients-ca.pem",
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="where to listen")
    p.add_argument("--type", choices=SOCKET_TYPES, default="stream", help="socket type")
    p.add_argument(
        "--model",
        choices=["async", "asyncio", "thread", "fork"],
        default="async",
        help="concurrency: one event loop (default), a thread or a child process per client",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="tcp://: listen on an address other hosts can reach (refused without it: "
        "plain TCP authenticates nobody; loopback needs nothing). Not a peer policy.",
    )
    p.add_argument("--mode", type=mode_arg, help="socket file mode, e.g. 660")
    p.add_argument("--owner", help="socket file owner (user name or uid)")
    p.add_argument("--group", help="socket file group (group name or gid)")
    p.add_argument("--parent-mode", type=mode_arg, help="create a missing parent directory")
    p.add_argument(
        "--backlog",
        type=count_arg(),
        default=None,
        help="listen queue length (default: the system's net.core.somaxconn)",
    )
    p.add_argument(
        "--max-clients",
        type=count_arg(),
        help="at most this many clients at once (default: 256 for --model thread, "
        "no bound otherwise)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=seconds_arg(zero=True),
        default=5.0,
        help="seconds to let clients finish (0: close them at once)",
    )
    p.add_argument(
        "--idle-timeout",
        type=seconds_arg(),
        metavar="S",
        help="close clients silent for S seconds",
    )
    p.add_argument(
        "--send-timeout",
        type=seconds_arg(),
        metavar="S",
        help="close clients that leave replies unread for S seconds",
    )
    p.add_argument("--pidfile", help="write this process's pid here once accepting")
    p.add_argument(
        "--nofile",
        type=count_arg(),
        metavar="N",
        help="raise the descriptor limit (RLIMIT_NOFILE) to N, for many connections",
    )
    p.add_argument("--uvloop", action="store_true", help="use uvloop (async model; extra)")
    p.add_argument(
        "--fdstore",
        action="store_true",
        help="park the listener with systemd (FDSTORE=1) so restarts keep it",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each connection")
    add_serve_options(p)
    add_tls_options(p, server=True)
    p.add_argument(
        "--show-fds",
        action="store_true",
        help="instead of echoing, print each message's size and every descriptor passed "
        "with it (number, kind, path, inode, open mode), then close it (UNP 15.7)",
    )
    p.set_defaults(func=cmd_serve)


def pick_handler(args: argparse.Namespace, model: Model, sock_type: int) -> Handler:
    """The handler the options ask for (echo unless a --show-* option is given)."""
    if args.show_creds:
        return show_creds_handler(model, sock_type, policy_from_args(args))
    return echo_handler(model, sock_type)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="afunix serve: %(message)s",
        stream=sys.stderr,
    )
    if args.show_fds:
        from ._show_fds import serve_show_fds

        return serve_show_fds(args)
    model: Model = "asyncio" if args.model == "async" else args.model
    if args.nofile is not None:
        from .load import raise_nofile

        got = raise_nofile(args.nofile)
        if got < args.nofile:
            raise OSError(
                errno.EPERM,
                f"cannot raise the descriptor limit to {args.nofile}: the hard limit is {got}",
            )
    sock_type = socket_type(args.type)
    if getattr(args, "allow_tls_name", None) and not args.ca:
        raise UsageError(
            "--allow-tls-name judges client certificates: give --ca, the CA that signs them "
            "(without it clients show none)"
        )
    # Until serve_forever installs its own handlers, a SIGTERM must still remove
    # the socket file: turn it into SystemExit, which the finally below handles.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with creating_socket():
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
            allow_remote=args.allow_remote,
            ssl=tls_context(args, args.address, server=True),
            max_clients=args.max_clients,
            shutdown_timeout=args.shutdown_timeout,
            fdstore=args.fdstore,
            event_loop="uvloop" if args.uvloop else "asyncio",
            on_ready=lambda srv: _write_pidfile(args.pidfile),
            policy=policy_from_args(args),
            limits=Limits(idle_timeout=args.idle_timeout, send_timeout=args.send_timeout),
        )
    print(
        f"afunix: serving {args.type} on {server.address.describe()} (model {model}, "
        f"socket {server.origin}); "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    if server.policy is not None:
        print(f"afunix: peer policy: {server.policy.describe()}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    if server.handed_over_to is not None:
        print(
            f"afunix: handed over to pid {server.handed_over_to}; exiting",
            file=sys.stderr,
            flush=True,
        )
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _write_pidfile(path: str | None) -> None:
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # atomic: readers see the old pid or the new one
