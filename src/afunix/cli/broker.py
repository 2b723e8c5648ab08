"""``afunix broker ADDR --policy FILE``: the descriptor broker daemon (and ``--check``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..broker import Broker, load_policy
from ..broker.policy import Policy
from ._common import (
    UsageError,
    add_json_option,
    address_arg,
    creating_socket,
    emit_json,
    mode_arg,
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "broker",
        help="open files for other processes by policy and pass the descriptors back",
        description=(
            "Run the descriptor broker on ADDR: clients (afunix open --broker, afunix cat "
            "--broker, afunix.broker.Client) ask it to open files; it checks the TOML "
            "policy against their kernel credentials, opens the file beneath the rule's "
            "root (openat2 RESOLVE_BENEATH), and passes the descriptor back. Default deny. "
            "SIGHUP reloads the policy (the old one stays if the new one is invalid) and "
            "reopens the audit log; SIGTERM stops. Under systemd (Type=notify-reload, "
            "WatchdogSec=) it sends READY=1, WATCHDOG=1, RELOADING=1 then READY=1 around "
            "each reload, and STOPPING=1. See docs/broker.md."
        ),
        epilog=(
            "Examples: afunix broker --check /etc/afunix/broker.toml; "
            "afunix broker /run/afunix-broker.sock --policy /etc/afunix/broker.toml "
            "--audit /var/log/afunix-broker.jsonl --mode 666"
        ),
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", nargs="?", help="where to listen")
    p.add_argument("--policy", metavar="FILE", help="the TOML policy (required to serve)")
    p.add_argument(
        "--check",
        metavar="FILE",
        help="validate the policy FILE, print its rules, and exit (non-zero if invalid)",
    )
    p.add_argument(
        "--audit", metavar="FILE", help="append one JSON line per request to FILE ('-': stderr)"
    )
    p.add_argument("--mode", type=mode_arg, help="socket file mode, e.g. 666")
    p.add_argument("--owner", help="socket file owner (user name or uid)")
    p.add_argument("--group", help="socket file group (group name or gid)")
    p.add_argument("-v", "--verbose", action="store_true", help="log reloads and connections")
    add_json_option(p, "the --check result")
    p.set_defaults(func=cmd_broker)


def describe_policy(policy: Policy) -> list[str]:
    """One line per rule, for ``--check``."""
    lines = []
    for rule in policy.rules:
        paths = ", ".join("/".join(p) or "." for p in rule.paths)
        extra = []
        if "create" in rule.allow:
            extra.append(f"create mode {rule.create_mode:04o}")
            if rule.create_excl:
                extra.append("O_EXCL required")
            if rule.create_owner == "peer":
                extra.append("owned by the client")
        if rule.exclude:
            extra.append("except " + ", ".join("/".join(p) for p in rule.exclude))
        if rule.no_symlinks:
            extra.append("no symlinks")
        ops = ", ".join(sorted(rule.allow))
        tail = f" ({'; '.join(extra)})" if extra else ""
        lines.append(
            f"  rule {rule.name!r} (line {rule.line}): {rule.subjects()} may {ops} "
            f"beneath {rule.root} matching {paths}{tail}"
        )
    return lines


def cmd_broker(args: argparse.Namespace) -> int:
    if args.check:
        policy = load_policy(args.check)
        if args.json:
            emit_json(
                "broker-check",
                {
                    "file": args.check,
                    "valid": True,
                    "default": "deny",
                    "rules": [
                        {
                            "name": rule.name,
                            "line": rule.line,
                            "root": rule.root,
                            "allow": sorted(rule.allow),
                            "description": text.strip(),
                        }
                        for rule, text in zip(policy.rules, describe_policy(policy), strict=True)
                    ],
                },
            )
            return 0
        print(f"{args.check}: valid, {len(policy.rules)} rule(s), default deny")
        for line in describe_policy(policy):
            print(line)
        return 0
    if args.json:
        raise UsageError("--json goes with --check FILE (serving prints no result)")
    if args.address is None or args.policy is None:
        raise UsageError("give ADDR and --policy FILE to serve, or --check FILE")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="afunix broker: %(message)s",
        stream=sys.stderr,
    )
    with creating_socket():
        broker = Broker(
            args.address,
            args.policy,
            audit=args.audit,
            mode=args.mode,
            owner=args.owner,
            group=args.group,
        )
    print(
        f"afunix broker: serving {broker.address.describe()} "
        f"({broker.server.origin}) with {len(broker.policy.rules)} rule(s) from {args.policy}; "
        f"resolver {broker.resolver.name}; audit {args.audit or 'off'}; "
        "SIGHUP reloads, Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    broker.serve_forever()
    return 0
