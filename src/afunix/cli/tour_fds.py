"""Tour section 15.7: passing descriptors (mycat through a helper, a shared offset)."""

from __future__ import annotations

import os
import subprocess
import sys

from .. import Channel, ControlTruncated, pair
from ..lowlevel import my_open, recv_fds, send_fds
from .tour import Tour, section

# The other process of the shared-offset demo. It opens the file, reads 4
# bytes, passes the descriptor, and after the tour's go-ahead shows that the
# tour's read moved *its* offset too; then it passes a second descriptor and
# closes it at once (in flight, 15.7 step 3) before exiting.
_PEER = r"""
import os, sys, afunix
ch = afunix.Channel.from_socket(afunix.Socket(fileno=int(sys.argv[1])))
fd = os.open(sys.argv[2], os.O_RDONLY)
first = os.read(fd, 4)
print(f"    peer pid {os.getpid()}: opened the file as fd {fd}, read {first!r}; "
      f"offset now {os.lseek(fd, 0, os.SEEK_CUR)}; passing fd {fd}", flush=True)
ch.send(b"A", [fd])
with ch.recv():
    pass
print(f"    peer pid {os.getpid()}: after the tour's read, my fd {fd} is at offset "
      f"{os.lseek(fd, 0, os.SEEK_CUR)}", flush=True)
os.close(fd)
other = os.open(sys.argv[3], os.O_RDONLY)
ch.send(b"B", [other])
os.close(other)
print(f"    peer pid {os.getpid()}: passed fd {other} for the second file, closed it "
      "and is exiting", flush=True)
ch.close()
"""


@section("15.7", "Passing descriptors: mycat through a helper, one open file in two processes")
def _descriptors(t: Tour) -> None:
    data = t.path("alphabet.txt")
    with open(data, "w") as f:
        f.write("0123456789abcdefghij\n")
    t.say("The book's mycat does not open its file: my_open() makes a socketpair, forks")
    t.say("and execs the helper 'openfile SOCKFD PATH MODE', which opens the file and")
    t.say("passes the descriptor back with one byte of payload; exit status = errno.")
    fd = my_open(data)
    try:
        content = os.read(fd, 100)
        t.show("descriptor from the helper", f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        t.show("read through it", repr(content))
        t.check("the helper's descriptor reads the file", content.startswith(b"0123"))
    finally:
        os.close(fd)
    try:
        my_open(t.path("missing.txt"))
    except FileNotFoundError as exc:
        t.show("a missing file", f"helper exited with status {exc.errno}; my_open raised {exc!r}")
        t.check("the helper's exit status comes back as the errno (ENOENT)", exc.errno == 2)
    else:  # pragma: no cover
        t.check("a missing file is reported", False)

    t.say()
    t.say("A descriptor crossing processes: the receiver gets another number for the")
    t.say("same open file (15.7 step 4), so the file offset is shared.")
    second = t.path("second.txt")
    with open(second, "w") as f:
        f.write("still readable\n")
    mine, theirs = pair("stream")
    with Channel(mine) as ch:
        sys.stdout.flush()
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(theirs.fileno()), data, second],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        try:
            with ch.recv() as msg:
                got = msg.take_fd()
            try:
                offset = os.lseek(got, 0, os.SEEK_CUR)
                t.say(f"    tour pid {os.getpid()}: received it as fd {got}, at offset {offset}")
                t.check("the received descriptor starts at the peer's offset (4)", offset == 4)
                more = os.read(got, 4)
                t.say(f"    tour pid {os.getpid()}: read {more!r}")
                t.check("reading continues where the peer stopped", more == b"4567")
                sys.stdout.flush()
                ch.send(b"go")
                status = proc.wait(10)
                t.check("the peer has exited before we receive its second descriptor", status == 0)
                with ch.recv() as msg2:
                    late = msg2.take_file(0)
                with late:
                    text = late.read()
                t.show("second file, sender already closed it and exited", repr(text))
                t.check(
                    "a descriptor in flight stays open after the sender closes it (step 3)",
                    text == b"still readable\n",
                )
            finally:
                os.close(got)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on failure
                proc.kill()
            proc.wait()

    t.say()
    t.say("A receiver with room for fewer descriptors than were sent (MSG_CTRUNC):")
    a, b = pair("stream")
    with a, b:
        before = sorted(os.listdir("/proc/self/fd"))
        send_fds(a, b"x", [0, 1, 2])
        try:
            recv_fds(b, 10, maxfds=1)
        except ControlTruncated as exc:
            t.show("error", exc)
            t.check("truncated control data is an error, not a silent loss", True)
        else:  # pragma: no cover
            t.check("truncated control data is an error", False)
        t.check(
            "nothing leaked: the descriptor table is as before",
            sorted(os.listdir("/proc/self/fd")) == before,
        )
