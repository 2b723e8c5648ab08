"""Tour section 15.8: credentials, and the access control built on them."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys

from .. import connect, listen, peer_credentials
from ..lowlevel import (
    CredentialsRefused,
    credential_mechanisms,
    credstructs,
    enable_credentials,
    recv_credentials,
    send_credentials,
)
from ..policy import PeerPolicy
from ..server import Connection, Server
from .tour import Tour, section

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

_STAY = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
a = sys.argv[1]
s.connect("\0" + a[1:] if a.startswith("@") else a)
print(s.recv(100).decode() or "(closed without a word)", flush=True)
sys.stdin.read()
"""

_FORGE = r"""
import sys, afunix, afunix.lowlevel
s = afunix.connect(sys.argv[1], "dgram", bind=None)
try:
    afunix.lowlevel.send_credentials(s, b"forged", uid=0)
    print("sent!?")
except afunix.lowlevel.CredentialsRefused as exc:
    print(exc)
"""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@section("15.8", "Passing credentials: who is on the other end, and who may be")
def _credentials(t: Tour) -> None:
    t.say("The book passes FreeBSD's struct cmsgcred as ancillary data (SCM_CREDS): the")
    t.say("sender attaches an empty one and the kernel fills in the truth. Linux has no")
    t.say("cmsgcred, but afunix decodes its bytes all the same (they are tested in tables):")
    sample = struct.pack("=iIIIh2x16I", 4321, 1001, 1001, 20, 2, 20, 5, *[0] * 14)
    dec = credstructs.parse_cmsgcred(sample)
    t.show("struct cmsgcred", f"{len(sample)} bytes: 4 ids, a short, 16 groups")
    t.show(
        "decoded",
        f"pid {dec.pid}, uid {dec.real_uid}, euid {dec.uid}, gid {dec.real_gid}, "
        f"groups {dec.groups}",
    )
    t.check(
        "cmsgcred is 84 bytes; groups[0] is the effective gid",
        len(sample) == credstructs.CMSGCRED_SIZE == 84 and dec.gid == dec.groups[0]
        if dec.groups
        else False,
    )

    mech = credential_mechanisms()
    t.say(f"On this system ({mech['system']}) a connection's peer is read with {mech['peer']},")
    t.say(f"and each message can carry {mech['message']}.")

    switch = os.geteuid() == 0 and shutil.which("setpriv") is not None
    prefix = NOBODY if switch else []
    who = "as nobody (uid 65534, via setpriv)" if switch else "as you"
    want_uid = 65534 if switch else os.geteuid()

    # ------------------------------------------------ peer credentials + pidfd
    path = t.path("creds.sock")
    t.say(f"A client process connects {who}; the server asks the kernel who it is:")
    with listen(path, mode=0o666) as lst:
        lst.settimeout(10)
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", _STAY, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            conn, _ = lst.accept()
            with conn, peer_credentials(conn) as creds:
                t.show("SO_PEERCRED", creds.describe())
                t.check("the server sees the client's uid", creds.uid == want_uid)
                t.check("and its real pid", creds.pid == proc.pid)
                if creds.pidfd is not None:
                    facts = creds.facts()
                    t.show("its executable", f"{facts.exe} (checked through a pidfd)")
                    t.check("the pidfd names the client", creds.current_pid() == proc.pid)
                    conn.sendall(b"bye")
                    assert proc.stdin is not None
                    proc.stdin.close()
                    t.check("the server sees the client exit", creds.exited(timeout=10))
                    proc.wait(10)
                    t.check(
                        "once reaped, the pidfd names no pid (never a recycled one)",
                        creds.current_pid() is None,
                    )
                else:
                    t.say("    (no SO_PEERPIDFD on this kernel: Linux 6.5+ gives a pidfd)")
        finally:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()

    # ------------------------------------------------ per-message credentials
    if mech["message"] is not None:
        dpath = t.path("creds-dg.sock")
        t.say("Datagram sockets have no connection: each datagram carries its sender's")
        t.say("credentials instead (SO_PASSCRED on the receiver):")
        with listen(dpath, "dgram", mode=0o666) as rx:
            rx.settimeout(10)
            enable_credentials(rx)
            with connect(dpath, "dgram") as tx:
                tx.send(b"hello")
            with recv_credentials(rx) as msg:
                assert msg.credentials is not None
                t.show("datagram from", msg.credentials.describe())
                t.check("per-message pid is ours", msg.credentials.pid == os.getpid())
            t.say("A sender may attach credentials itself, but the kernel checks the claim:")
            if switch:
                out = subprocess.run(
                    [*NOBODY, sys.executable, "-c", _FORGE, dpath],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                t.show("nobody claims uid 0", out.stdout.strip())
                t.check("the forgery is refused (EPERM)", "[EPERM]" in out.stdout)
                with connect(dpath, "dgram") as tx:
                    send_credentials(tx, b"claim", uid=1234)
                with recv_credentials(rx) as msg:
                    assert msg.credentials is not None
                    t.show("root claims uid 1234", f"accepted: {msg.credentials.describe()}")
                    t.check("root (CAP_SETUID) may claim", msg.credentials.uid == 1234)
            else:
                try:
                    with connect(dpath, "dgram") as tx:
                        send_credentials(tx, b"forged", uid=0)
                    t.check("the forgery is refused (EPERM)", False)
                except CredentialsRefused as exc:
                    t.show("claiming uid 0", exc)
                    t.check("the forgery is refused (EPERM)", True)

    # ------------------------------------------------------------ the policy
    name = f"@afunix-tour-creds-{os.getpid()}"
    policy = PeerPolicy(same_user=True) if switch else PeerPolicy(uids=[0])
    t.say(f"An abstract socket ({name}) has no file permissions: anybody may connect.")
    t.say(f"A peer policy closes it: {policy.describe()}.")

    def hello(conn: Connection) -> None:
        conn.send(f"welcome, uid {conn.credentials.uid}".encode())

    collect = _Collect()
    logger = logging.getLogger("afunix.server")
    logger.addHandler(collect)
    try:
        with Server(name, hello, model="thread", policy=policy) as srv:
            srv.start()
            out = subprocess.run(
                [*prefix, sys.executable, "-c", _STAY, name],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            t.show(f"client {who} got", out.stdout.strip())
            t.show("server log", collect.lines[0] if collect.lines else "(nothing)")
            t.check("the client was refused before the handler", srv.rejected == 1)
            if switch:
                with connect(name, timeout=5) as c:
                    c.settimeout(10)
                    got = c.recv(100).decode()
                t.show("root client got", got)
                t.check("the server's own user is served", got == "welcome, uid 0")
    finally:
        logger.removeHandler(collect)
