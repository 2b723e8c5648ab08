"""The sans-IO control-message codec (``afunix._cmsg``), on tables of bytes.

Two levels: items <-> ``(level, type, data)`` triples (what CPython's
``sendmsg``/``recvmsg`` use) and triples <-> raw ``msg_control`` buffers
(``struct cmsghdr`` layouts of Linux/x86-64 and of a 32-bit ``socklen_t``
system). Every error case checks that the descriptors inside were closed.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Iterator

import pytest

from afunix import _cmsg as anc
from afunix._cmsg import (
    ControlTruncated,
    Credentials,
    Layout,
    Rights,
    UnexpectedControl,
)

assert sys.byteorder == "little", "the byte tables below are little-endian"

LINUX64 = Layout("Q", 8, "<")
SOCKLEN32 = Layout("I", 4, "<")  # macOS-style: socklen_t cmsg_len, 4-byte alignment


def i32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little", signed=True) for v in values)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Four real descriptors (dups of /dev/null) that a test may hand to the codec."""
    base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    made = [os.dup(base) for _ in range(4)]
    os.close(base)
    try:
        yield made
    finally:
        for fd in made:
            if is_open(fd):
                os.close(fd)


# ------------------------------------------------------------------- sizes
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 12, 100, 1012, 1016])
def test_native_layout_matches_the_c_library(n: int) -> None:
    assert anc.NATIVE_LAYOUT.length(n) == socket.CMSG_LEN(n)
    assert anc.NATIVE_LAYOUT.space(n) == socket.CMSG_SPACE(n)


@pytest.mark.parametrize("nfds", [1, 2, 3, 253])
def test_rights_space_is_cmsg_space(nfds: int) -> None:
    assert anc.rights_space(nfds) == socket.CMSG_SPACE(nfds * 4)
    assert anc.control_space(nfds) == socket.CMSG_SPACE(nfds * 4)
    assert anc.control_space(nfds, credentials=True) == socket.CMSG_SPACE(
        nfds * 4
    ) + socket.CMSG_SPACE(12)


def test_no_room_is_zero() -> None:
    assert anc.rights_space(0) == 0
    assert anc.control_space(0) == 0
    with pytest.raises(ValueError):
        anc.rights_space(-1)


# ----------------------------------------------------------- items -> triples
ENCODE_TABLE = [
    ([Rights((3,))], [(1, 1, i32(3))]),
    ([Rights((3, 4, 250))], [(1, 1, i32(3, 4, 250))]),
    ([Rights(())], []),
    ([Credentials(1234, 1000, 100)], [(1, 2, i32(1234, 1000, 100))]),
    (
        [Credentials(1, 0, 0), Rights((7, 8))],
        [(1, 2, i32(1, 0, 0)), (1, 1, i32(7, 8))],
    ),
    ([Credentials(5, 0xFFFFFFFE, 65534)], [(1, 2, i32(5) + b"\xfe\xff\xff\xff" + i32(65534))]),
]


@pytest.mark.parametrize(("items", "triples"), ENCODE_TABLE)
def test_encode(items: list[anc.ControlItem], triples: list[anc.Triple]) -> None:
    assert anc.encode(items) == triples


@pytest.mark.parametrize(("items", "triples"), [t for t in ENCODE_TABLE if t[0] != [Rights(())]])
def test_decode_is_the_inverse(items: list[anc.ControlItem], triples: list[anc.Triple]) -> None:
    # The fd numbers here are not ours: decode must not close anything on success.
    assert anc.decode(triples) == items


@pytest.mark.parametrize("bad", [-1, "3", 3.0, True])
def test_encode_refuses_non_descriptors(bad: object) -> None:
    with pytest.raises(ValueError):
        anc.encode([Rights((bad,))])  # type: ignore[arg-type]


def test_encode_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        anc.encode([("not", "an item")])  # type: ignore[list-item]


# ------------------------------------------------------- triples -> items, errors
def test_decode_rights_keeps_descriptors_open(fds: list[int]) -> None:
    items = anc.decode([(1, 1, i32(*fds[:2]))])
    assert items == [Rights(tuple(fds[:2]))]
    assert all(is_open(fd) for fd in fds)


def test_decode_credentials_only_when_accepted() -> None:
    triple = (1, 2, i32(42, 0, 0))
    assert anc.decode([triple]) == [Credentials(42, 0, 0)]
    with pytest.raises(UnexpectedControl, match="SCM_CREDENTIALS"):
        anc.decode([triple], accept_credentials=False)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        # MSG_CTRUNC: the receiver had too little room
        (lambda f: ([(1, 1, i32(f[0]))], socket.MSG_CTRUNC), ControlTruncated, "MSG_CTRUNC"),
        # an unexpected level (IPPROTO_IP) after good rights
        (lambda f: ([(1, 1, i32(f[0])), (0, 1, b"")], 0), UnexpectedControl, "level 0"),
        # an unknown SOL_SOCKET type
        (lambda f: ([(1, 1, i32(f[0])), (1, 99, b"x")], 0), UnexpectedControl, "type 99"),
        # SCM_RIGHTS whose length is not whole descriptors
        (lambda f: ([(1, 1, i32(f[0]) + b"\x05")], 0), UnexpectedControl, "5 bytes"),
        # an empty SCM_RIGHTS
        (lambda f: ([(1, 1, i32(f[0])), (1, 1, b"")], 0), UnexpectedControl, "0 bytes"),
        # credentials of the wrong size
        (lambda f: ([(1, 1, i32(f[0])), (1, 2, b"\0" * 8)], 0), UnexpectedControl, "8 bytes"),
        # an unasked-for SCM_PIDFD carries a descriptor of its own
        (lambda f: ([(1, 4, i32(f[0]))], 0), UnexpectedControl, "SCM_PIDFD"),
    ],
)
def test_decode_errors_close_every_descriptor(
    fds: list[int], make: object, error: type[Exception], match: str
) -> None:
    triples, flags = make(fds)  # type: ignore[operator]
    with pytest.raises(error, match=match) as info:
        anc.decode(triples, flags)
    assert not is_open(fds[0])
    assert isinstance(info.value, anc.ControlError)
    assert info.value.fds_closed == 1
    assert "were closed" in str(info.value)
    assert all(is_open(fd) for fd in fds[1:])


def test_truncation_error_says_how_much_room(fds: list[int]) -> None:
    with pytest.raises(ControlTruncated, match="room for 1 descriptor") as info:
        anc.decode([(1, 1, i32(fds[0]))], socket.MSG_CTRUNC, room=1)
    assert info.value.errno == errno.EMSGSIZE
    with pytest.raises(ControlTruncated, match="made no room"):
        anc.decode([], socket.MSG_CTRUNC, room=0)


def test_more_than_room_is_an_error_even_without_ctrunc(fds: list[int]) -> None:
    # CMSG_SPACE(4) has room for two ints on 64-bit systems: the limit still holds.
    with pytest.raises(ControlTruncated, match="2 arrived"):
        anc.decode([(1, 1, i32(*fds[:2]))], 0, room=1)
    assert not is_open(fds[0])
    assert not is_open(fds[1])


def test_fds_in_ignores_credentials_and_fragments() -> None:
    assert anc.fds_in([(1, 2, i32(1, 2, 3)), (1, 1, i32(7, 8) + b"\x01\x02")]) == [7, 8]


# ------------------------------------------------------ triples <-> raw buffers
PACK_TABLE = [
    (
        LINUX64,
        [(1, 1, i32(5))],
        # cmsg_len=20 (8 bytes), level=1, type=1, data, 4 bytes of padding
        struct.pack("<Qii", 20, 1, 1) + i32(5) + b"\0" * 4,
    ),
    (
        LINUX64,
        [(1, 1, i32(5, 6))],
        struct.pack("<Qii", 24, 1, 1) + i32(5, 6),
    ),
    (
        LINUX64,
        [(1, 2, i32(9, 0, 0)), (1, 1, i32(3))],
        struct.pack("<Qii", 28, 1, 2)
        + i32(9, 0, 0)
        + b"\0" * 4
        + struct.pack("<Qii", 20, 1, 1)
        + i32(3)
        + b"\0" * 4,
    ),
    (
        SOCKLEN32,
        [(0xFFFF, 1, i32(5))],
        struct.pack("<Iii", 16, 0xFFFF, 1) + i32(5),
    ),
    (
        SOCKLEN32,
        [(1, 1, i32(5, 6, 7)), (1, 1, b"\x01")],
        struct.pack("<Iii", 24, 1, 1)
        + i32(5, 6, 7)
        + struct.pack("<Iii", 13, 1, 1)
        + b"\x01\0\0\0",
    ),
]


@pytest.mark.parametrize(("layout", "triples", "raw"), PACK_TABLE)
def test_pack_buffer(layout: Layout, triples: list[anc.Triple], raw: bytes) -> None:
    assert anc.pack_buffer(triples, layout) == raw
    assert len(raw) == sum(layout.space(len(d)) for _, _, d in triples)


@pytest.mark.parametrize(("layout", "triples", "raw"), PACK_TABLE)
def test_unpack_buffer(layout: Layout, triples: list[anc.Triple], raw: bytes) -> None:
    assert anc.unpack_buffer(raw, 0, layout) == triples


def test_unpack_accepts_a_last_message_without_padding() -> None:
    raw = struct.pack("<Qii", 20, 1, 1) + i32(5)  # the kernel may stop at CMSG_LEN
    assert anc.unpack_buffer(raw, 0, LINUX64) == [(1, 1, i32(5))]


def test_native_buffers_round_trip() -> None:
    triples = [(1, 2, i32(1, 2, 3)), (1, 1, i32(4, 5, 6))]
    raw = anc.pack_buffer(triples)
    assert len(raw) == socket.CMSG_SPACE(12) * 2
    assert anc.unpack_buffer(raw) == triples


def test_unpack_short_cmsg_len_is_an_error(fds: list[int]) -> None:
    raw = anc.pack_buffer([(1, 1, i32(fds[0]))], LINUX64) + struct.pack("<Qii", 8, 1, 1)
    with pytest.raises(UnexpectedControl, match="shorter than its 16-byte header"):
        anc.unpack_buffer(raw, 0, LINUX64)
    assert not is_open(fds[0])


def test_unpack_overlong_cmsg_len_without_ctrunc_is_an_error(fds: list[int]) -> None:
    raw = struct.pack("<Qii", 28, 1, 1) + i32(fds[0], fds[1])
    with pytest.raises(UnexpectedControl, match="runs past"):
        anc.unpack_buffer(raw, 0, LINUX64)
    assert not is_open(fds[0])
    assert not is_open(fds[1])


def test_unpack_truncated_with_ctrunc_returns_what_is_there(fds: list[int]) -> None:
    # A BSD kernel may leave cmsg_len as sent and cut the buffer: the whole
    # descriptors present are returned, so that decode() closes them.
    raw = struct.pack("<Qii", 28, 1, 1) + i32(fds[0], fds[1])
    triples = anc.unpack_buffer(raw, socket.MSG_CTRUNC, LINUX64)
    assert triples == [(1, 1, i32(fds[0], fds[1]))]
    with pytest.raises(ControlTruncated):
        anc.decode(triples, socket.MSG_CTRUNC)
    assert not is_open(fds[0])
    assert not is_open(fds[1])


def test_raw_buffer_from_the_kernel_decodes(fds: list[int]) -> None:
    """Our raw layout is the kernel's: a buffer we pack is one the kernel accepts.

    ``socket.sendmsg`` builds its own control buffer, so this sends the packed
    bytes through ``ctypes``-free means: the fds come back, counted, from a
    real ``recvmsg`` of what ``encode`` built, and re-packing what the kernel
    returned gives the same bytes as packing what we sent.
    """
    a, b = socket.socketpair()
    with a, b:
        sent = anc.encode([Rights((fds[0], fds[1]))])
        a.sendmsg([b"x"], sent)
        _, got, flags, _ = b.recvmsg(1, anc.control_space(2))
        items = anc.decode(got, flags, room=2)
        received = [fd for item in items if isinstance(item, Rights) for fd in item.fds]
        try:
            assert len(received) == 2
            assert len(anc.pack_buffer(got)) == len(anc.pack_buffer(sent)) == anc.rights_space(2)
        finally:
            anc.close_fds(received)


# ---------------------------------------------------- sending: numbers and builders


def test_fd_numbers_of_ints_files_and_sockets(fds: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b, open(os.devnull, "rb") as f:
        assert anc.fd_numbers((fds[0],)) == [fds[0]]
        assert anc.fd_numbers([fds[0], f, a]) == [fds[0], f.fileno(), a.fileno()]
        assert anc.fd_numbers(iter([b])) == [b.fileno()]  # any iterable, read once
        assert anc.fd_numbers(()) == []


def test_fd_numbers_refuses_what_is_no_descriptor(fds: list[int]) -> None:
    with pytest.raises(TypeError, match="bool"):
        anc.fd_numbers([True])
    f = open(os.devnull, "rb")  # noqa: SIM115
    f.close()
    with pytest.raises(ValueError, match="closed"):
        anc.fd_numbers([f])
    with pytest.raises(ValueError, match="no open descriptor"):
        anc.fd_numbers([-1])
    with pytest.raises(anc.TooManyFds) as info:
        anc.fd_numbers([fds[0]] * (anc.SCM_MAX_FD + 1))
    assert (info.value.count, info.value.errno) == (254, errno.EINVAL)
    assert len(anc.fd_numbers([fds[0]] * anc.SCM_MAX_FD)) == 253


@pytest.mark.parametrize(
    ("numbers", "data"),
    [([7], i32(7)), ([3, 4, 5], i32(3, 4, 5)), (list(range(253)), i32(*range(253)))],
)
def test_rights_builds_scm_rights(numbers: list[int], data: bytes) -> None:
    assert anc.rights(numbers) == (socket.SOL_SOCKET, socket.SCM_RIGHTS, data)
    assert anc.encode([Rights(tuple(numbers))]) == [anc.rights(numbers)]


def test_credentials_builds_this_systems_item() -> None:
    own = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, i32(os.getpid(), os.getuid(), os.getgid()))
    assert anc.credentials() == own
    claimed = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, i32(1, 2, 3))
    assert anc.credentials(1, 2, 3) == claimed


def test_control_space_is_cached() -> None:
    anc.control_space(253, True)
    hits = anc.control_space.cache_info().hits
    assert anc.control_space(253, True) == socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12)
    assert anc.control_space.cache_info().hits == hits + 1
    assert anc.control_space(1) == socket.CMSG_SPACE(4)


def test_split_credentials_takes_credentials_and_pidfd(fds: list[int]) -> None:
    ucred = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, i32(42, 1000, 100))
    other = (socket.SOL_SOCKET, socket.SCM_RIGHTS, i32(fds[0]))
    pidfd = os.pidfd_open(os.getpid())
    try:
        decoded, got, rest = anc.split_credentials([other, ucred, (1, 4, i32(pidfd))])
        assert decoded is not None
        assert (decoded.pid, decoded.uid, decoded.gid) == (42, 1000, 100)
        assert (got, rest) == (pidfd, [other])
    finally:
        os.close(pidfd)


def test_split_credentials_closes_a_pidfd_without_credentials() -> None:
    pidfd = os.pidfd_open(os.getpid())
    decoded, got, rest = anc.split_credentials([(1, 4, i32(pidfd))])
    assert (decoded, got, rest) == (None, None, [])
    assert not is_open(pidfd)


def _ints(*fds: int) -> bytes:
    return struct.pack(f"{len(fds)}i", *fds)


@pytest.mark.parametrize(
    ("triples", "nfds", "expected"),
    [
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7))], 1, [7]),
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7, 8, 9))], 3, [7, 8, 9]),
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7, 8))], 1, None),  # more than said
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7))], 2, None),  # fewer than said
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7)[:3])], 1, None),  # a fragment
        ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, _ints(7))] * 2, 2, None),  # two items
        ([(socket.SOL_SOCKET, 2, _ints(7))], 1, None),  # SCM_CREDENTIALS, not rights
        ([(socket.IPPROTO_TCP, socket.SCM_RIGHTS, _ints(7))], 1, None),  # another level
        ([], 1, None),
    ],
)
def test_exact_rights_takes_one_well_formed_item_of_exactly_nfds(
    triples: list[tuple[int, int, bytes]], nfds: int, expected: list[int] | None
) -> None:
    """The lean receive's test: anything else is left to decode(), which explains it."""
    assert anc.exact_rights(triples, nfds) == expected
