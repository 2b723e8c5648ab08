"""``afunix creds ADDR``: what does the server see of me? (UNP 15.8)

The client side of a tiny report-back protocol spoken by ``afunix serve
--show-creds``. This module also holds the server side (the handlers and the
``--show-creds``/``--allow-*`` options that :mod:`afunix.cli.serve` adds).

The protocol, version 1:

* The client's *first* message is the 14 bytes ``afunix-creds?\\n``: the
  first bytes of a stream connection, or one whole seqpacket record or
  datagram. On a datagram socket the client attaches its credentials
  (``SCM_CREDENTIALS``) and must be bound so that a reply can reach it.
* A ``--show-creds`` server answers with one line, ``afunix-creds `` + a JSON
  object + ``\\n`` (one record or datagram on packet sockets), describing
  the client as the *kernel* reported it: ``version`` (1), ``mechanism``
  (``SO_PEERCRED``, ``SCM_CREDENTIALS``, ...), ``pid``, ``uid``, ``user``,
  ``gid``, ``group``, ``groups`` (list, or null when the kernel gives none),
  ``pidfd`` (whether the server holds a pidfd of the client), ``exe``,
  ``cmdline`` (list), ``cgroup``, ``verified`` (the /proc facts were checked
  through the pidfd to belong to the client), ``policy`` (why the server's
  peer policy admitted the client, or null without a policy) and
  ``server_pid``. Unknown fields must be ignored by clients.
* Then the connection goes on as an echo server. Anything else as a first
  message is simply echoed, so a plain echo server sends the request back:
  that is how the client tells "not a --show-creds server".
* A client that the server's policy refuses gets no reply: its connection is
  closed (end of file), its datagram dropped. Nothing else refuses a client:
  when the server cannot print (its standard output is a closed pipe or a full
  disk) it says so once on standard error, stops printing and goes on
  answering. A client cannot tell a refusal from a server that failed while
  answering, so its error says both; the server's log says which.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
from typing import Any

from .. import AfunixError, PeerCredentials, PeerError, connect
from ..lowlevel import send_credentials
from ..policy import PeerPolicy
from ..server import AsyncConnection, Connection, Datagram, Handler
from ._common import (
    ServerOutput,
    add_json_option,
    address_arg,
    emit_json,
    id_arg,
    print_line,
    seconds_arg,
)

REQUEST = b"afunix-creds?\n"
REPLY_PREFIX = b"afunix-creds "
PROTOCOL_VERSION = 1


# ===================================================================== server
def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The credential options of ``afunix serve``."""
    g = p.add_argument_group(
        "credentials and peer policy (UNP 15.8)",
        "Any --allow-* option turns on a peer policy: clients matching no rule are "
        "refused (closed, or their datagram dropped) and logged with their credentials. "
        "This is the access control of abstract (@name) sockets, which have no file "
        "permissions.",
    )
    g.add_argument(
        "--show-creds",
        action="store_true",
        help="print each peer's pid, uid, gid and executable; answer 'afunix creds'",
    )
    g.add_argument(
        "--allow-uid", type=id_arg("a user id"), action="append", default=[], metavar="UID"
    )
    g.add_argument(
        "--allow-gid", type=id_arg("a group id"), action="append", default=[], metavar="GID"
    )
    g.add_argument("--allow-user", action="append", default=[], metavar="NAME")
    g.add_argument(
        "--allow-group",
        action="append",
        default=[],
        metavar="NAME",
        help="allow members of this group (primary or supplementary)",
    )
    g.add_argument(
        "--allow-same-user", action="store_true", help="allow clients running as the server's user"
    )
    g.add_argument(
        "--allow-tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="tls://: allow clients whose certificate has this name (CN, DNS or URI); needs --ca",
    )


def policy_from_args(args: argparse.Namespace) -> PeerPolicy | None:
    """The :class:`PeerPolicy` the ``--allow-*`` options describe, or ``None`` for none.

    Built once per parsed command line (names are resolved then).
    """
    if "_peer_policy" not in vars(args):
        args._peer_policy = _build_policy(args)
    policy: PeerPolicy | None = args._peer_policy
    return policy


def _build_policy(args: argparse.Namespace) -> PeerPolicy | None:
    if not (
        args.allow_uid
        or args.allow_gid
        or args.allow_user
        or args.allow_group
        or args.allow_same_user
        or getattr(args, "allow_tls_name", None)
    ):
        return None
    return PeerPolicy(
        uids=args.allow_uid,
        gids=args.allow_gid,
        users=args.allow_user,
        groups=args.allow_group,
        same_user=args.allow_same_user,
        tls_names=getattr(args, "allow_tls_name", ()),
    )


def report(creds: PeerCredentials | None, policy: PeerPolicy | None) -> dict[str, Any]:
    """What the server saw of one client, as the protocol's JSON object."""
    out: dict[str, Any] = {"version": PROTOCOL_VERSION}
    if creds is None:
        out["mechanism"] = None
        out["server_pid"] = os.getpid()
        return out
    out.update(creds.as_dict())
    exe = cmdline = cgroup = None
    verified = False
    if creds.pid is not None:
        try:
            facts = creds.facts()
        except OSError:
            pass
        else:
            exe, cmdline, cgroup, verified = facts.exe, facts.cmdline, facts.cgroup, facts.verified
    out.update(
        exe=exe,
        cmdline=None if cmdline is None else list(cmdline),
        cgroup=cgroup,
        verified=verified,
        policy=None if policy is None else policy.check(creds).reason,
        server_pid=os.getpid(),
    )
    return out


def _show(info: dict[str, Any]) -> str:
    """One grep-friendly line per peer, for the server's standard output."""
    if info.get("mechanism") is None:
        return "peer: no credentials (not a Unix-domain socket, or none attached)"
    groups = info["groups"]
    via = info["mechanism"] + ("+pidfd" if info["pidfd"] else "")
    user = f"({info['user']})" if info["user"] else ""
    group = f"({info['group']})" if info["group"] else ""
    return (
        f"peer: pid={info['pid'] if info['pid'] is not None else '?'} "
        f"uid={info['uid']}{user} gid={info['gid']}{group} "
        f"groups={','.join(map(str, groups)) if groups else '-'} "
        f"exe={info['exe'] or '?'}{'' if info['verified'] else ' (unverified)'} via={via}"
    )


def _reply(info: dict[str, Any]) -> bytes:
    return REPLY_PREFIX + json.dumps(info, separators=(",", ":")).encode() + b"\n"


def _credentials_of(conn: Connection | AsyncConnection) -> PeerCredentials | None:
    try:
        return conn.credentials
    except OSError:
        return None  # TCP, or an exotic socket: nothing to show


def show_creds_handler(
    model: str, sock_type: int, policy: PeerPolicy | None, output: ServerOutput | None = None
) -> Handler:
    """The ``--show-creds`` handler for *model* and *sock_type* (echo after the report).

    Each peer's line goes to *output* (standard output); when that fails the
    server stops printing and still answers every client (see
    :class:`~afunix.cli._common.ServerOutput`): a client is refused only by
    the peer policy, never because the server could not print.
    """
    packets = sock_type != socket.SOCK_STREAM
    printer = ServerOutput() if output is None else output

    def first_message(buf: bytes) -> bool:
        """Whether to stop reading the first message: complete, or cannot be the request."""
        return packets or len(buf) >= len(REQUEST) or not REQUEST.startswith(buf)

    if sock_type == socket.SOCK_DGRAM:

        def on_datagram(dgram: Datagram) -> bytes:
            info = report(dgram.credentials, policy)
            printer.lines(_show(info))
            return _reply(info) if dgram.data == REQUEST else dgram.data

        if model != "asyncio":
            return on_datagram

        async def on_datagram_async(dgram: Datagram) -> bytes:
            return on_datagram(dgram)

        return on_datagram_async

    def answer(info: dict[str, Any], first: bytes) -> list[bytes]:
        if first == REQUEST or (not packets and first.startswith(REQUEST)):
            rest = first[len(REQUEST) :]
            return [_reply(info)] + ([rest] if rest else [])
        return [first] if first else []

    if model != "asyncio":

        def on_connection(conn: Connection) -> None:
            info = report(_credentials_of(conn), policy)
            printer.lines(_show(info))
            first = b""
            while True:
                chunk = conn.recv()
                if not chunk:
                    break
                first += chunk
                if first_message(first):
                    break
            for out in answer(info, first):
                conn.send(out)
            for chunk in conn:
                conn.send(chunk)

        return on_connection

    async def on_connection_async(conn: AsyncConnection) -> None:
        info = report(_credentials_of(conn), policy)
        printer.lines(_show(info))
        first = b""
        while True:
            chunk = await conn.recv()
            if not chunk:
                break
            first += chunk
            if first_message(first):
                break
        for out in answer(info, first):
            await conn.send(out)
        async for chunk in conn:
            await conn.send(chunk)

    return on_connection_async


# ===================================================================== client
def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "creds",
        help="ask a 'serve --show-creds' server what it sees of this client",
        description=(
            "Connect to ADDR (or send it a datagram carrying this process's credentials) "
            "and print what the server saw: pid, uid, gid, groups and executable, as the "
            "kernel reported them (SO_PEERCRED for connections, SCM_CREDENTIALS for "
            "datagrams). The server must run 'afunix serve ADDR --show-creds'. Exit status "
            "0 when the server answered; 77 (permission denied) when it closed the connection "
            "without answering: a server refuses clients its peer policy (--allow-*) does not "
            "admit that way, and its log says so with the rule; 75 (ETIMEDOUT) when no report "
            "came in time; 77 (EPERM) when the kernel refused to send claimed credentials; "
            "65 when the server is not a --show-creds server."
        ),
        epilog=(
            "Example: afunix serve @demo --show-creds --allow-uid 0 &  "
            "setpriv --reuid 65534 --regid 65534 --clear-groups afunix creds @demo"
        ),
    )
    p.add_argument("address", type=address_arg, metavar="ADDR", help="server address")
    p.add_argument(
        "--type", choices=["stream", "dgram", "seqpacket"], default="stream", help="socket type"
    )
    p.add_argument(
        "--timeout", type=seconds_arg(), default=5.0, help="seconds to wait for the report"
    )
    add_json_option(p, "the server's report")
    claims = p.add_argument_group(
        "claimed credentials (datagrams only)",
        "Attach these ids instead of your own (SCM_CREDENTIALS). The kernel lets only a "
        "privileged process claim another identity; otherwise the send fails with EPERM.",
    )
    claims.add_argument("--claim-pid", type=id_arg("a process id"), metavar="PID")
    claims.add_argument("--claim-uid", type=id_arg("a user id"), metavar="UID")
    claims.add_argument("--claim-gid", type=id_arg("a group id"), metavar="GID")
    p.set_defaults(func=cmd_creds)


def _refused(where: str) -> AfunixError:
    return PeerError(
        errno.EACCES,
        f"{where} closed the connection without a report: it refused this client "
        f"(uid {os.geteuid()}, gid {os.getegid()}) or failed while answering; the "
        "server's log says which",
    )


def _parse_reply(reply: bytes, where: str) -> dict[str, Any]:
    if reply == REQUEST:
        raise PeerError(
            errno.EPROTO,
            f"{where} echoed the request back: it is an echo server, not running "
            "'afunix serve --show-creds'",
        )
    if not reply.startswith(REPLY_PREFIX):
        raise PeerError(
            errno.EPROTO,
            f"{where} answered {reply[:40]!r}, not a credentials report: is it "
            "'afunix serve --show-creds'?",
        )
    try:
        info = json.loads(reply[len(REPLY_PREFIX) :])
    except ValueError as exc:
        raise PeerError(errno.EPROTO, f"{where} sent a malformed report: {exc}") from None
    if not isinstance(info, dict):
        raise PeerError(errno.EPROTO, f"{where} sent a report that is not a JSON object")
    return info


def ask(
    address: Any,
    sock_type: str = "stream",
    *,
    timeout: float = 5.0,
    claim: tuple[int | None, int | None, int | None] = (None, None, None),
) -> dict[str, Any]:
    """Send the request to *address* and return the server's report (a dict)."""
    where = f"the server at {address.describe() if hasattr(address, 'describe') else address}"
    if sock_type != "dgram" and claim != (None, None, None):
        raise ValueError(
            "--claim-* works on datagrams only: a connection's credentials are taken by "
            "the kernel at connect time (SO_PEERCRED) and cannot be claimed"
        )
    with connect(address, sock_type, timeout=timeout) as sock:
        sock.settimeout(timeout)
        try:
            if sock_type == "dgram":
                pid, uid, gid = claim
                send_credentials(sock, REQUEST, pid=pid, uid=uid, gid=gid)
                reply = sock.recv(65536)
            elif sock_type == "seqpacket":
                sock.sendall(REQUEST)
                reply = sock.recv(65536)
            else:
                sock.sendall(REQUEST)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except TimeoutError:
            what = "datagram" if sock_type == "dgram" else "request"
            raise AfunixError(
                errno.ETIMEDOUT,
                f"no report from {where} within {timeout:g}s: it dropped the {what} (it "
                "refused this client, or it is not 'afunix serve --show-creds'; the server's "
                "log says which)",
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            raise _refused(where) from None
    if not reply:
        raise _refused(where)
    return _parse_reply(reply, where)


def _describe(info: dict[str, Any]) -> list[str]:
    me = os.getpid()
    lines = [f"the server (pid {info.get('server_pid', '?')}) saw, via {info.get('mechanism')}:"]

    def note(value: Any, mine: int) -> str:
        return "this process" if value == mine else f"NOT this process's {mine}"

    pid = info.get("pid")
    lines.append(f"  pid     {pid if pid is not None else '?'} ({note(pid, me)})")
    for key, name, mine in (
        ("uid", "user", os.getuid()),
        ("gid", "group", os.getgid()),
    ):
        label = f" {info.get(name)}" if info.get(name) else ""
        value = info.get(key)
        same = value == mine or value == (os.geteuid() if key == "uid" else os.getegid())
        lines.append(
            f"  {key}     {value}{label}"
            + ("" if same else f"  (this process: {mine}: the claim was accepted)")
        )
    groups = info.get("groups")
    if groups is None:
        lines.append("  groups  (not reported by this mechanism)")
    else:
        lines.append(f"  groups  {', '.join(map(str, groups)) if groups else '(none)'}")
    exe = info.get("exe")
    how = "checked through a pidfd" if info.get("verified") else "read on trust in the pid"
    lines.append(f"  exe     {exe} ({how})" if exe else "  exe     (not readable by the server)")
    if info.get("policy"):
        lines.append(f"  policy  admitted: {info['policy']}")
    return lines


def cmd_creds(args: argparse.Namespace) -> int:
    info = ask(
        args.address,
        args.type,
        timeout=args.timeout,
        claim=(args.claim_pid, args.claim_uid, args.claim_gid),
    )
    if args.json:
        info.pop("schema", None)
        emit_json("creds", info)
    else:
        for line in _describe(info):
            print_line(line)
    sys.stdout.flush()
    return 0
