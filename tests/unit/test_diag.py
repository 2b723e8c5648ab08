"""The sock_diag parser on tables of bytes: no socket, no kernel.

Each reply below is written out as the kernel lays it out on a little-endian
machine (``<linux/netlink.h>``, ``<linux/unix_diag.h>``): a 16-byte
``nlmsghdr``, a 16-byte ``unix_diag_msg``, then 4-byte aligned attributes
(``len`` u16, ``type`` u16, payload).
"""

from __future__ import annotations

import errno
import os
import sys

import pytest

from afunix import diag as _diag

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="tables are little-endian")

HDR_DONE = bytes.fromhex("14000000 0300 0200 01000000 00000000 00000000")

# A listener at /tmp/a.sock: inode 0x123456, file inode 0x1000 on kernel dev
# 8:1, two clients waiting (inodes 0x11, 0x22) of backlog 128, owner uid 1000.
LISTENER = bytes.fromhex(
    "5c000000 1400 0200 01000000 00000000"  # nlmsghdr: len 92, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI
    "01 01 0a 00 56341200 01000000 00000000"  # AF_UNIX, SOCK_STREAM, TCP_LISTEN, ino, cookie
    "0f00 0000" + b"/tmp/a.sock".hex() + "00"  # UNIX_DIAG_NAME (15 bytes + 1 pad)
    "0c00 0100 00100000 01008000"  # UNIX_DIAG_VFS: ino 0x1000, dev (8 << 20) | 1
    "0c00 0300 11000000 22000000"  # UNIX_DIAG_ICONS: two pending clients
    "0c00 0400 02000000 80000000"  # UNIX_DIAG_RQLEN: 2 waiting, backlog 128
    "0800 0700 e8030000"  # UNIX_DIAG_UID: 1000
)

# The accepted end of a connection: abstract name @srv, peer inode 0x77,
# 5 bytes to read, 0 unsent; then a datagram socket with no name at all.
CONNECTED = bytes.fromhex(
    "3c000000 1400 0200 01000000 00000000"  # len 60
    "01 01 01 00 66000000 02000000 00000000"  # SOCK_STREAM, TCP_ESTABLISHED, ino 0x66
    "0800 0000 00737276"  # UNIX_DIAG_NAME: "\0srv"
    "0800 0200 77000000"  # UNIX_DIAG_PEER: 0x77
    "0c00 0400 05000000 00000000"  # UNIX_DIAG_RQLEN: rq 5, wq 0
)
UNNAMED_DGRAM = bytes.fromhex(
    "20000000 1400 0200 01000000 00000000"  # len 32
    "01 02 07 00 99000000 03000000 00000000"  # SOCK_DGRAM, TCP_CLOSE, ino 0x99
)


def test_request_bytes() -> None:
    assert _diag.build_request(7) == bytes.fromhex(
        "28000000 1400 0103 07000000 00000000"  # len 40, type 20, REQUEST|DUMP, seq 7
        "01 00 0000 ffffffff 00000000 5f000000 ffffffff ffffffff"  # AF_UNIX, all states, show
    )


def test_listener_table() -> None:
    assert len(LISTENER) == 92
    found, done = _diag.parse_messages(LISTENER + HDR_DONE)
    assert done
    (info,) = found
    assert info.inode == 0x123456
    assert (info.type_name, info.state_name, info.listening) == ("stream", "listening", True)
    assert info.name == b"/tmp/a.sock"
    assert info.address == "/tmp/a.sock"
    assert info.vfs == (0x1000, os.makedev(8, 1))
    assert info.pending == [0x11, 0x22]
    assert (info.rqueue, info.wqueue) == (2, 128)
    assert info.uid == 1000
    assert info.peer is None


def test_connected_and_unnamed_in_one_reply() -> None:
    found, done = _diag.parse_messages(CONNECTED + UNNAMED_DGRAM)
    assert not done  # no NLMSG_DONE yet: the caller reads again
    conn, dgram = found
    assert (conn.inode, conn.address, conn.state_name, conn.peer) == (
        0x66,
        "@srv",
        "connected",
        0x77,
    )
    assert (conn.rqueue, conn.wqueue) == (5, 0)
    assert (dgram.inode, dgram.type_name, dgram.state_name, dgram.address) == (
        0x99,
        "dgram",
        "unconnected",
        None,
    )
    assert dgram.vfs is None and dgram.uid is None and dgram.pending == []


def test_path_name_loses_its_terminating_nul() -> None:
    # Python's bind() counts the NUL after a path; the kernel reports it back.
    msg = bytes.fromhex(
        "2c000000 1400 0200 01000000 00000000 01 02 07 00 01000000 00000000 00000000"
    )
    name = bytes.fromhex("0c00 0000") + b"/x.sock\0"  # 4 + 8 = 12 bytes, NUL included
    (info,) = _diag.parse_messages(msg + name)[0]
    assert (info.name, info.address) == (b"/x.sock", "/x.sock")


def test_dgram_established_without_peer_is_unconnected() -> None:
    # Linux marks a datagram server established once a client connect()ed to it.
    info = _diag.UnixSocketInfo(inode=1, type=2, state=_diag.TCP_ESTABLISHED)
    assert info.state_name == "unconnected"
    info.peer = 5
    assert info.state_name == "connected"


def test_error_reply_raises_with_kernel_errno() -> None:
    error = bytes.fromhex("24000000 0200 0000 01000000 00000000 feffffff") + bytes(16)  # -ENOENT
    with pytest.raises(OSError) as info:
        _diag.parse_messages(error)
    assert info.value.errno == errno.ENOENT


def test_ack_ends_the_reply() -> None:
    ack = bytes.fromhex("24000000 0200 0000 01000000 00000000 00000000") + bytes(16)
    assert _diag.parse_messages(ack) == ([], True)


@pytest.mark.parametrize(
    "broken",
    [
        LISTENER[:-8] + bytes.fromhex("0900 0700 e8030000"),  # attribute longer than the message
        bytes.fromhex("ff000000 1400 0200 01000000 00000000") + bytes(16),  # message overruns
        bytes.fromhex("14000000 1400 0200 01000000 00000000 01010a00"),  # short unix_diag_msg
    ],
)
def test_malformed_replies_are_errors(broken: bytes) -> None:
    with pytest.raises(ValueError):
        _diag.parse_messages(broken)


def test_unknown_attributes_are_skipped() -> None:
    meminfo = bytes.fromhex("0c00 0500 01000000 02000000")  # UNIX_DIAG_MEMINFO, not asked for
    msg = bytes.fromhex(
        "34000000 1400 0200 01000000 00000000 01 05 07 00 42000000 00000000 00000000"
    )
    (info,) = _diag.parse_messages(msg + meminfo + bytes.fromhex("0800 0200 43000000"))[0]
    assert (info.type_name, info.peer) == ("seqpacket", 0x43)


def test_proc_net_unix_fallback() -> None:
    text = (
        b"Num       RefCount Protocol Flags    Type St Inode Path\n"
        b"0000000000000000: 00000002 00000000 00010000 0001 01 31337 /run/a.sock\n"
        b"0000000000000000: 00000003 00000000 00000000 0001 03 31338 @abs\n"
        b"0000000000000000: 00000002 00000000 00000000 0002 01 31339\n"
    )
    listener, conn, dgram = _diag.parse_proc_net_unix(text)
    assert (listener.inode, listener.state_name, listener.address) == (
        31337,
        "listening",
        "/run/a.sock",
    )
    assert (conn.state_name, conn.address, conn.name) == ("connected", "@abs", b"\0abs")
    assert (dgram.type_name, dgram.state_name, dgram.address) == ("dgram", "unconnected", None)


def test_kernel_dev_conversion() -> None:
    assert _diag.kernel_dev_to_user((259 << 20) | 300) == os.makedev(259, 300)
    assert _diag.kernel_dev_to_user(0x2A) == os.makedev(0, 0x2A)
