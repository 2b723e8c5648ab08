"""Tour section "broker": my_open grown into a privilege-separation daemon (docs/broker.md)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

from ..broker import Broker, Client, confine, parse_policy
from .tour import Tour, section

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

_ASK = r"""
import json, os, sys
from afunix.broker import Client
out = {}
with Client(sys.argv[1], timeout=10) as c:
    for path in sys.argv[2:]:
        try:
            with c.open(path) as f:
                out[path] = f.read().decode()
        except OSError as e:
            out[path] = f"{e.strerror} [{__import__('errno').errorcode[e.errno]}]"
print(json.dumps(out))
"""


@section("broker", "The descriptor broker: my_open grown into a privilege-separation daemon")
def _broker(t: Tour) -> None:
    root = t.path("srv")
    os.makedirs(os.path.join(root, "reports"))
    os.chmod(root, 0o755)
    os.chmod(os.path.join(root, "reports"), 0o755)
    secret = os.path.join(root, "reports", "q3.txt")
    with open(secret, "w") as f:
        f.write("revenue: up\n")
    os.chmod(secret, 0o600)
    os.symlink("/etc", os.path.join(root, "reports", "etc"))
    policy_text = (
        f'[[rule]]\nname = "reports"\nroot = "{root}/reports"\npaths = ["*.txt", "etc/**"]\n'
        'anyone = true\nallow = ["read"]\n'
    )
    t.say("A privileged broker opens files for other processes, by policy, and passes the")
    t.say("descriptors back (UNP 15.7's my_open, as a daemon). The policy, in TOML:")
    for line in policy_text.splitlines():
        t.say("    " + line)
    switch = os.geteuid() == 0 and shutil.which("setpriv") is not None
    sock = t.path("broker.sock")
    audit = t.path("audit.jsonl")
    with Broker(sock, parse_policy(policy_text), audit=audit, mode=0o666) as broker:
        broker.start()
        how = "openat2" if isinstance(broker.resolver, confine.Openat2Resolver) else "fallback"
        t.show("resolver", f"{broker.resolver.name} ({how}: every open stays beneath its root)")
        asks = [secret, os.path.join(root, "reports", "etc", "passwd"), "/etc/hostname"]
        if switch:
            t.say("A client runs as nobody (uid 65534). q3.txt is root's, mode 0600:")
            direct = subprocess.run(
                [*NOBODY, "cat", secret], capture_output=True, text=True, timeout=30, check=False
            )
            t.show("cat q3.txt as nobody", direct.stderr.strip() or direct.stdout.strip())
            t.check("nobody cannot open it itself", direct.returncode != 0)
            proc = subprocess.run(
                [*NOBODY, sys.executable, "-c", _ASK, sock, *asks],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
            answers = json.loads(proc.stdout or "{}")
        else:
            t.say("(not root: the client runs as you; run the tour as root to see the")
            t.say(" privilege boundary)")
            answers = {}
            with Client(sock) as c:
                for path in asks:
                    try:
                        with c.open(path) as f:
                            answers[path] = f.read().decode()
                    except OSError as e:
                        answers[path] = f"{e.strerror} [{errno.errorcode[e.errno or 0]}]"
        for path in asks:
            t.show(f"broker open {path}", str(answers.get(path, "?")).strip())
        t.check("the granted file came through the broker", answers.get(secret) == "revenue: up\n")
        t.check(
            "a symlink inside the root pointing out is refused (openat2 RESOLVE_BENEATH)",
            "EACCES" in str(answers.get(asks[1])),
        )
        t.check("a path no rule grants is refused", "EACCES" in str(answers.get(asks[2])))
        with Client(sock) as c:
            started = time.perf_counter()
            for _ in range(500):
                os.close(c.open_fd(secret))
            rate = 500 / (time.perf_counter() - started)
        t.show("500 opens over one connection", f"{rate:,.0f} per second (audited)")
    with open(audit, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if '"open"' in line]
    last_denied = next(r for r in recs if r["decision"] == "denied")
    t.say("Each request is one JSON line in the audit log, with the kernel's view of the peer:")
    t.show("denied", f"uid {last_denied['peer']['uid']}, {last_denied['reason']}")
    t.check("every request was audited", len(recs) == len(asks) + 500)
