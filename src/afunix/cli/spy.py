"""``afunix spy LISTEN TARGET``: relay connections to a server and show what crosses.

Like ``socat -v``, but it shows what ``socat`` cannot: every descriptor
passed (and what it refers to), the client's credentials, and afunix frames
decoded as messages. The relay itself is :class:`afunix.relay.Relay`; this
module turns its events into lines (text or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ..relay import SCHEMA, Event, Relay
from ._common import SOCKET_TYPES, ServerOutput, address_arg, count_arg, mode_arg

_ARROW = {"to-server": "client -> server", "to-client": "server -> client"}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "spy",
        help="relay clients from LISTEN to the server at TARGET, showing bytes, "
        "descriptors and credentials",
        description=(
            "Listen at LISTEN and relay each client to the server at TARGET, both ways, "
            "showing the traffic as it goes: connection number, direction, size and a "
            "preview of the bytes (hex and ASCII), afunix frames decoded (payload "
            "length, descriptors announced, memfd), every descriptor passed and what it "
            "refers to (file path, socket with its type and peer, pipe, memfd), and the "
            "client's credentials (pid, uid, gid, command) at connect. Descriptors "
            "(SCM_RIGHTS) are passed on with the same bytes, then closed in the relay; "
            "a MSG_CTRUNC (descriptors lost, e.g. the relay out of descriptors) is "
            "reported and ends that connection. Message boundaries are kept on "
            "seqpacket and datagram sockets. When one side shuts down, the relay shuts "
            "down the other side for writing, then closes both. NOTE: the server sees "
            "the relay, not the client, as its peer: its SO_PEERCRED credentials and "
            "peer policy (--allow-*) apply to this process, so run the relay as the "
            "user the server expects. SIGTERM or Ctrl-C ends every relayed connection, "
            "removes the LISTEN socket file and exits 0."
        ),
        epilog="Example: afunix serve /tmp/real.sock --show-fds & afunix spy /tmp/spy.sock "
        "/tmp/real.sock & afunix send-fds /tmp/spy.sock /etc/hostname",
    )
    p.add_argument("listen", type=address_arg, metavar="LISTEN", help="where clients connect")
    p.add_argument("target", type=address_arg, metavar="TARGET", help="the real server")
    p.add_argument("--type", choices=SOCKET_TYPES, default="stream", help="socket type")
    p.add_argument(
        "--preview",
        type=count_arg(0, 65536),
        default=32,
        metavar="N",
        help="show the first N bytes of each chunk (default 32; 0: none)",
    )
    p.add_argument("--mode", type=mode_arg, help="LISTEN socket file mode, e.g. 660")
    p.add_argument("--backlog", type=count_arg(), default=128, help="listen queue length")
    p.add_argument(
        "--json",
        action="store_true",
        help=f'one JSON object per event and line ("schema": "{SCHEMA}"; see docs/operations.md)',
    )
    p.set_defaults(func=cmd_spy)


def cmd_spy(args: argparse.Namespace) -> int:
    out = ServerOutput("afunix spy")

    def sink(event: Event) -> None:
        if args.json:
            out.lines(json.dumps(event))
        else:
            out.lines(*render(event))

    relay = Relay(
        args.listen,
        args.target,
        args.type,
        sink=sink,
        preview=args.preview,
        mode=args.mode,
        backlog=args.backlog,
    )
    old = {
        sig: signal.signal(sig, lambda *_: relay.stop()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        print(
            f"afunix spy: relaying {args.type} from {relay.listener.address.describe()} to "
            f"{relay.target.describe()}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        relay.serve_forever()
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)
        relay.close()
    return 0


def render(event: Event) -> list[str]:
    """The text lines of one event."""
    kind = event["event"]
    tag = f"#{event['conn']} " if event.get("conn") is not None else ""
    if kind == "listening":
        return [f"relaying {event['type']} {event['listen']} -> {event['target']}"]
    if kind == "connect":
        return [f"{tag}connect: {_client(event)}"]
    if kind == "data":
        return _data_lines(tag, event)
    if kind == "eof":
        return [f"{tag}{_ARROW[event['direction']]}: end of stream (other side shut for writing)"]
    if kind == "close":
        up, down = event["to-server"], event["to-client"]
        return [
            f"{tag}closed: to server {up['bytes']} bytes, {up['fds']} fd(s); "
            f"to client {down['bytes']} bytes, {down['fds']} fd(s)"
        ]
    if kind == "ctrunc":
        where = _ARROW.get(event.get("direction", ""), "")
        hint = f" ({event['hint']})" if event.get("hint") else ""
        return [f"{tag}{where}: descriptors lost (MSG_CTRUNC): {event['error']}{hint}"]
    if kind == "error":
        where = _ARROW.get(event.get("direction") or "", "")
        return [f"{tag}{where + ': ' if where else ''}error: {event['error']}"]
    if kind == "stopped":
        return [f"stopped after {event['connections']} connection(s)"]
    return [json.dumps(event)]  # pragma: no cover - an event this renderer does not know


def _client(event: Event) -> str:
    client = event.get("client")
    who = ""
    if "sender" in event:  # datagrams: no connection, the first datagram's sender
        who = f"datagrams from {event['sender'] or 'an unbound socket (replies cannot return)'}"
        if client is None:
            return f"{who} (no credentials)"
        who += ", "
    if client is None:
        return "client credentials unavailable"
    user = f" ({client['user']})" if client.get("user") else ""
    group = f" ({client['group']})" if client.get("group") else ""
    command = f", command {client['command']!r}" if client.get("command") else ""
    return (
        f"{who}client pid {client['pid']}, uid {client['uid']}{user}, "
        f"gid {client['gid']}{group}{command}"
    )


def _data_lines(tag: str, event: Event) -> list[str]:
    head = f"{tag}{_ARROW[event['direction']]}: {event['size']} byte(s)"
    if event["fds"]:
        head += f", {len(event['fds'])} fd(s)"
    if event.get("truncated"):
        head += " (TRUNCATED: larger than the relay's buffer)"
    lines = [head]
    shown = event.get("preview")
    if shown and shown["shown"]:
        more = " ..." if shown["shown"] < event["size"] else ""
        lines.append(f"    {shown['hex']}{more}  |{shown['ascii']}|")
    for frame in event["frames"]:
        memfd = ", payload in a memfd" if frame["memfd"] else ""
        lines.append(
            f"    frame at byte {frame['at']}: {frame['length']} byte(s) of payload, "
            f"{frame['nfds']} fd(s){memfd}"
        )
    if event.get("not_frames"):
        lines.append(f"    (not afunix frames: {event['not_frames']})")
    for fd in event["fds"]:
        lines.append(f"    fd: {_fd_text(fd)}")
    return lines


def _fd_text(fd: dict[str, Any]) -> str:
    if "error" in fd:
        return f"{fd['kind']} ({fd['error']})"
    text = f"{fd['kind']} {fd['target']} (inode {fd['inode']}, open {fd['mode']})"
    if fd["kind"] == "socket" and "type" in fd:
        text += f", {fd['type']}, address {fd['address']}, peer {fd['peer']}"
    return text
