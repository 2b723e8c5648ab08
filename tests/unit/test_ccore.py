"""The compiled core against its pure-Python reference (issue 16), on real sockets.

:mod:`afunix._ccore` has three functions, each the twin of a pure-Python one with
the same contract: ``recv_frame`` (:func:`afunix._io.py_recv_frame`),
``scan_plain`` (:func:`afunix._protocol.message.py_scan_plain`) and
``send_frame`` (:func:`afunix._io.py_send_frame`). Here both run on the same
bytes and descriptors, through real socket pairs:

* tables of frames (plain, with descriptors, every way a frame is not simple)
  for ``recv_frame``, compared answer by answer;
* a differential fuzz test: random message streams (sizes, descriptors,
  batches, corruption, chunking, buffer sizes) written identically to two
  socket pairs and received by two channels, one on each core; the same
  messages (payload and each descriptor's inode), the same error (type, errno,
  text) and the same descriptor table must come out;
* ``scan_plain`` on random bytes, ``send_frame`` on random arguments (what
  arrives at the peer is compared);
* the system-call edges: ``EINTR`` with a signal handler that raises, a closed
  socket, a socket with a timeout (non-blocking mode), a forgotten message
  with descriptors.

With ``AFUNIX_PURE_PYTHON=1`` there is no compiled core to compare: the
comparisons are skipped (the CI run on the compiled core makes them; its
``AFUNIX_EXPECT_CORE`` check fails if that core is missing), the reference's
own checks still run.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afunix._io as io_mod
import afunix._protocol.decoder as decoder_mod
import afunix.channel as channel_mod
from afunix._core import CORE, ccore
from afunix._io import py_recv_frame, py_send_frame
from afunix._protocol.message import Message, plain_message, py_scan_plain
from afunix.channel import Channel

from ..conftest import open_fds

compiled = pytest.mark.skipif(ccore is None, reason=f"the compiled core does not run ({CORE})")

MAGIC = 0xAF
PLAIN = MAGIC << 24
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def header(length: int, nfds: int = 0, flags: int = 0, magic: int = MAGIC) -> bytes:
    return struct.pack("!BBHI", magic, flags, nfds, length)


def inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


@contextlib.contextmanager
def pure_core() -> Iterator[None]:
    """Channels made inside use the pure-Python twins of the core's functions."""
    with (
        patch.object(io_mod, "recv_frame", py_recv_frame),
        patch.object(decoder_mod, "scan_plain", py_scan_plain),
        patch.object(channel_mod, "send_frame", py_send_frame),
    ):
        yield


@pytest.fixture
def files(tmp_path: Any) -> Iterator[list[int]]:
    """Four open files, each its own inode, to send."""
    fds = []
    for i in range(4):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * i)
        fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    yield fds
    for fd in fds:
        os.close(fd)


def write_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    view = memoryview(data)
    sent = sock.sendmsg([view], anc)
    while sent < len(view):  # descriptors went with the first byte
        sent += sock.send(view[sent:])


# ---- recv_frame: a table of frames ------------------------------------------------------


def describe(got: Any) -> Any:
    """A receive's answer with descriptor numbers turned into inodes (and closed)."""
    if isinstance(got, Message):
        with got:
            return ("message", bytes(got.data), [inode(fd) for fd in got.fds])
    if got is None:
        return None
    n, anc, flags = got
    items = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = list(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
            items.append((level, kind, [inode(fd) for fd in fds]))
            for fd in fds:
                os.close(fd)
        else:
            items.append((level, kind, len(data)))
    return ("raw", n, items, flags & ~socket.MSG_CMSG_CLOEXEC)


CASES: dict[str, tuple[bytes, int, dict[str, int]]] = {
    # name: (bytes written, descriptors attached, recv_frame options)
    "plain": (header(5) + b"hello", 0, {}),
    "empty plain": (header(0), 0, {}),
    "one fd": (header(2, 1) + b"fd", 1, {}),
    "three fds": (header(3, 3) + b"fds", 3, {}),
    "fds, no payload": (header(0, 2), 2, {}),
    "two frames": (header(1) + b"a" + header(1) + b"b", 0, {}),
    "half a frame": ((header(10) + b"0123456789")[:12], 0, {}),
    "header only": (header(10), 0, {}),
    "fills the buffer": (header(56) + b"z" * 56, 0, {"size": 64}),
    "over the buffer": (header(100) + b"z" * 100, 0, {"size": 64}),
    "over max_size": (header(10) + b"0123456789", 0, {"max_size": 9}),
    "at max_size": (header(10) + b"0123456789", 0, {"max_size": 10}),
    "more fds than maxfds": (header(1, 3) + b"x", 3, {"maxfds": 2}),
    "fds on a plain header": (header(1) + b"x", 1, {}),
    "fewer fds than announced": (header(1, 2) + b"x", 1, {}),
    "more fds than announced": (header(1, 1) + b"x", 2, {}),
    "announced, none came": (header(1, 1) + b"x", 0, {}),
    "bad magic": (header(1, magic=0xAE) + b"x", 0, {}),
    "memfd flag": (header(1, 1, flags=1) + b"", 1, {}),
    "unknown flag": (header(1, flags=0x80) + b"x", 0, {}),
    "control cut (MSG_CTRUNC)": (header(1, 3) + b"x", 3, {"ancbufsize": 24}),
    "no control room": (header(1, 1) + b"x", 1, {"ancbufsize": 0}),
    "one byte": (b"\xaf", 0, {}),
    "end of file": (b"", 0, {}),
}


def run_case(
    recv: Any, data: bytes, nfds: int, files: list[int], opts: dict[str, int], *, creds: bool
) -> Any:
    a, b = socket.socketpair()
    try:
        if creds:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if data:
            write_raw(a, data, files[:nfds])
        else:
            a.shutdown(socket.SHUT_WR)
        buf = bytearray(opts.get("size", 4096))
        room = socket.CMSG_SPACE(4 * 253) + (socket.CMSG_SPACE(12) if creds else 0)
        got = recv(
            b,
            memoryview(buf),
            opts.get("ancbufsize", room),
            opts.get("max_size", 1 << 20),
            opts.get("maxfds", 253),
        )
        return describe(got), bytes(buf)
    finally:
        a.close()
        b.close()


@compiled
@pytest.mark.parametrize("creds", [False, True], ids=["", "SO_PASSCRED"])
@pytest.mark.parametrize("name", list(CASES))
def test_recv_frame_answers_as_its_reference(name: str, creds: bool, files: list[int]) -> None:
    assert ccore is not None
    data, nfds, opts = CASES[name]
    before = open_fds()
    expected = run_case(py_recv_frame, data, nfds, files, opts, creds=creds)
    got = run_case(ccore.recv_frame, data, nfds, files, opts, creds=creds)
    assert got == expected
    assert open_fds() == before


def test_the_reference_makes_the_simple_cases_messages(files: list[int]) -> None:
    """The table's simple frames are messages (so the comparison above compares them)."""
    for name in ("plain", "empty plain", "one fd", "three fds", "fds, no payload", "at max_size"):
        data, nfds, opts = CASES[name]
        (kind, *_), _ = run_case(py_recv_frame, data, nfds, files, opts, creds=False)
        assert kind == "message", name
    for name in (
        "two frames",
        "over max_size",
        "fds on a plain header",
        "control cut (MSG_CTRUNC)",
    ):
        data, nfds, opts = CASES[name]
        (kind, *_), _ = run_case(py_recv_frame, data, nfds, files, opts, creds=False)
        assert kind == "raw", name


# ---- the differential fuzz test: two channels, one per core ----------------------------

CORRUPTIONS = [None, None, None, "magic", "flags", "length", "more fds", "fewer fds", "cut"]


@st.composite
def streams(draw: Any) -> tuple[list[tuple[bytes, int]], dict[str, int]]:
    """Writes ``(bytes, number of descriptors)``: frames alone or batched, some corrupt."""
    writes: list[tuple[bytes, int]] = []
    for _ in range(draw(st.integers(1, 8))):
        batch = draw(st.integers(1, 4))
        data, fds = b"", 0
        for _ in range(batch):
            size = draw(st.sampled_from([0, 1, 7, 64, 300, 4096, 9000]))
            nfds = draw(st.integers(0, 3))
            payload = bytes([draw(st.integers(0, 255))]) * size
            frame = header(size, nfds) + payload
            bad = draw(st.sampled_from(CORRUPTIONS))
            if bad == "magic":
                frame = b"\x00" + frame[1:]
            elif bad == "flags":
                frame = frame[:1] + b"\x80" + frame[2:]
            elif bad == "length":
                frame = frame[:4] + struct.pack("!I", size + 5) + frame[8:]
            elif bad == "more fds":
                fds += 1
            elif bad == "fewer fds" and nfds:
                fds -= 1
            elif bad == "cut":
                frame = frame[: draw(st.integers(0, len(frame)))]
            data += frame
            fds += nfds
        writes.append((data, max(fds, 0)))
    options = {
        "recv_bufsize": draw(st.sampled_from([16, 100, 4096, 256 * 1024])),
        "maxfds": draw(st.sampled_from([1, 2, 3, 253])),
        "max_size": draw(st.sampled_from([64, 5000, 1 << 20])),
    }
    return writes, options


def receive_all(chan: Channel) -> list[Any]:
    """Everything the channel gives until end of file or an error."""
    out: list[Any] = []
    while True:
        try:
            msg = chan.recv()
        except EOFError:
            out.append("eof")
            return out
        except OSError as exc:
            out.append(("error", type(exc).__name__, exc.errno, str(exc)))
            return out
        with msg:
            out.append((bytes(msg.data), [inode(fd) for fd in msg.fds]))


def through(
    writes: list[tuple[bytes, int]], options: dict[str, int], files: list[int], *, pure: bool
) -> list[Any]:
    a, b = socket.socketpair()
    with contextlib.ExitStack() as stack:
        stack.callback(a.close)
        if pure:
            stack.enter_context(pure_core())
        for data, nfds in writes:
            if data:
                write_raw(a, data, (files * 64)[:nfds])
        a.shutdown(socket.SHUT_WR)
        chan = Channel(b, **options)
        stack.callback(chan.close)
        return receive_all(chan)


@compiled
@SETTINGS
@given(stream=streams())
def test_random_streams_give_the_same_outcome_on_both_cores(
    stream: tuple[list[tuple[bytes, int]], dict[str, int]], tmp_path_factory: Any
) -> None:
    writes, options = stream
    if sum(len(d) for d, _ in writes) > 150_000:  # all of it waits in the socket buffer
        return
    folder = tmp_path_factory.mktemp("inodes")
    files = []
    for i in range(4):
        (folder / str(i)).write_bytes(b"")
        files.append(os.open(folder / str(i), os.O_RDONLY | os.O_CLOEXEC))
    try:
        before = open_fds()
        expected = through(writes, options, files, pure=True)
        middle = open_fds()
        got = through(writes, options, files, pure=False)
        after = open_fds()
    finally:
        for fd in files:
            os.close(fd)
    assert got == expected
    assert before == middle == after


# ---- scan_plain --------------------------------------------------------------------------


def frames_strategy() -> Any:
    plain = st.binary(max_size=40).map(lambda p: header(len(p)) + p)
    other = st.sampled_from(
        [header(3, 1) + b"abc", header(2, flags=1), b"\xaf\x00", header(100), b"junkjunk"]
    )
    return st.lists(st.one_of(plain, plain, other), max_size=12).map(b"".join)


@compiled
@SETTINGS
@given(src=frames_strategy(), pos=st.integers(0, 20), max_size=st.sampled_from([0, 5, 40, 1000]))
def test_scan_plain_decodes_as_its_reference(src: bytes, pos: int, max_size: int) -> None:
    assert ccore is not None
    pos = min(pos, len(src))
    for kind in (bytes, bytearray, memoryview):
        mine: list[Message] = []
        ref: list[Message] = []
        assert ccore.scan_plain(kind(src), pos, max_size, mine) == py_scan_plain(
            kind(src), pos, max_size, ref
        )
        assert [m.data for m in mine] == [m.data for m in ref]
        assert all(type(m) is Message and m.fds == () and m.address is None for m in mine)


@compiled
def test_scan_plain_refuses_bad_arguments() -> None:
    assert ccore is not None
    with pytest.raises(ValueError, match="pos"):
        ccore.scan_plain(b"abc", 4, 10, [])
    with pytest.raises(TypeError, match="list"):
        ccore.scan_plain(b"abc", 0, 10, ())


# ---- send_frame ----------------------------------------------------------------------------

DATAS = [b"", b"x", b"y" * 100, bytearray(b"ba"), memoryview(b"mv"), "text", b"z" * 9000]


def fds_variants(files: list[int]) -> list[Any]:
    return [(), [], (files[0],), [files[0], files[1]], (-1,), (True,), (files[0], "x"), iter(())]


def sent_through(send: Any, data: Any, fds: Any, limit: int) -> tuple[Any, Any]:
    a, b = socket.socketpair()
    try:
        try:
            n: Any = send(a, data, fds, limit)
        except (TypeError, OSError) as exc:  # (neither raises for these arguments)
            n = type(exc).__name__
        a.shutdown(socket.SHUT_WR)
        raw, anc, _, _ = b.recvmsg(20000, socket.CMSG_SPACE(4 * 253))
        fds_in = [fd for _, _, d in anc for fd in struct.unpack(f"{len(d) // 4}i", d)]
        got = (raw, [inode(fd) for fd in fds_in])
        for fd in fds_in:
            os.close(fd)
        return n, got
    finally:
        a.close()
        b.close()


@compiled
@pytest.mark.parametrize("limit", [-1, 0, 100, 8192])
def test_send_frame_sends_as_its_reference(limit: int, files: list[int]) -> None:
    assert ccore is not None
    before = open_fds()
    for data in DATAS:
        for fds in fds_variants(files):
            ref = sent_through(py_send_frame, data, fds, limit)
            mine = sent_through(ccore.send_frame, data, fds, limit)
            assert mine == ref, (data[:10], fds, limit)
    assert open_fds() == before


def test_send_frame_takes_only_its_case(files: list[int]) -> None:
    """-1 (nothing sent) for anything but bytes/bytearray within the limit and plain ints."""
    n, (raw, fds) = sent_through(py_send_frame, b"abc", (files[0],), 10)
    assert n == 11 and raw == header(3, 1) + b"abc" and fds == [inode(files[0])]
    for data, fds_, limit in [
        (memoryview(b"a"), (), 10),
        (b"abc", (), 2),
        (b"a", (True,), 10),
        (b"a", (-1,), 10),
        (b"a", iter(()), 10),
    ]:
        assert sent_through(py_send_frame, data, fds_, limit) == (-1, (b"", []))


# ---- the edges of the system calls -----------------------------------------------------------


def both_cores() -> list[Any]:
    return [py_recv_frame] + ([ccore.recv_frame] if ccore is not None else [])


@pytest.mark.timeout(20)
def test_a_signal_handler_that_raises_interrupts_a_waiting_receive() -> None:
    """EINTR: handlers run (PEP 475); one that raises ends the receive with its exception."""

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        for recv in both_cores():
            a, b = socket.socketpair()
            main = threading.get_ident()
            stop = threading.Event()

            def poke(stop: threading.Event = stop, main: int = main) -> None:
                while not stop.wait(0.05):
                    signal.pthread_kill(main, signal.SIGUSR1)

            t = threading.Thread(target=poke)
            t.start()
            try:
                with pytest.raises(Interrupted):
                    recv(b, memoryview(bytearray(64)), 1024, 100, 4)
            finally:
                stop.set()
                t.join()
                a.close()
                b.close()
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.timeout(20)
def test_a_signal_whose_handler_returns_does_not_end_the_receive() -> None:
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    try:
        for recv in both_cores():
            a, b = socket.socketpair()
            main = threading.get_ident()

            def later(main: int = main, a: socket.socket = a) -> None:
                signal.pthread_kill(main, signal.SIGUSR1)
                signal.pthread_kill(main, signal.SIGUSR1)
                a.send(header(2) + b"ok")

            t = threading.Timer(0.05, later)
            t.start()
            try:
                got = recv(b, memoryview(bytearray(64)), 1024, 100, 4)
                assert isinstance(got, Message) and got.data == b"ok"
            finally:
                t.join()
                a.close()
                b.close()
        assert hits
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_closed_socket_is_ebadf_on_both_cores() -> None:
    for recv in both_cores():
        a, b = socket.socketpair()
        a.close()
        b.close()
        with pytest.raises(OSError) as caught:
            recv(b, memoryview(bytearray(64)), 1024, 100, 4)
        assert caught.value.errno == errno.EBADF
    for send in [py_send_frame] + ([ccore.send_frame] if ccore is not None else []):
        a, b = socket.socketpair()
        a.close()
        b.close()
        with pytest.raises(OSError) as caught:
            send(a, b"x", (), 10)
        assert caught.value.errno == errno.EBADF


@compiled
def test_a_socket_in_nonblocking_mode_is_left_to_the_python_socket() -> None:
    """Nothing to read / no room, on a socket with a timeout (non-blocking mode): the core
    answers None / -1 having done nothing, and the Python socket's call waits its way."""
    assert ccore is not None
    a, b = socket.socketpair()
    try:
        b.settimeout(0.05)
        assert ccore.recv_frame(b, bytearray(64), 1024, 100, 4) is None
        a.setblocking(False)
        while True:  # fill a's buffer
            try:
                a.send(b"\0" * 65536)
            except BlockingIOError:
                break
        assert ccore.send_frame(a, b"x", (), 10) == -1
        assert py_send_frame(a, b"x", (), 10) == -1  # (the reference: non-blocking, full)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(20)
def test_a_channel_on_a_socket_with_a_timeout_waits_as_the_socket_says() -> None:
    """``Connection.channel()`` sets a timeout on its socket after making the channel: a
    receive waits that long and raises ``TimeoutError``, on both cores."""
    a, b = socket.socketpair()
    chan = Channel(b)
    try:
        b.settimeout(0.2)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            chan.recv()
        assert time.monotonic() - start >= 0.15
        a.send(header(2) + b"hi")
        assert chan.recv().data == b"hi"
        chan.send(b"back")
        assert a.recv(100) == header(4) + b"back"
    finally:
        chan.close()
        a.close()


def test_a_forgotten_message_closes_its_descriptors_with_a_warning(files: list[int]) -> None:
    for recv in both_cores():
        a, b = socket.socketpair()
        try:
            write_raw(a, header(1, 1) + b"x", [files[0]])
            got = recv(b, memoryview(bytearray(64)), 1024, 100, 4)
            assert isinstance(got, Message)
            fd = got.fds[0]
            with pytest.warns(ResourceWarning, match="not taken"):
                del got
                gc.collect()
            with pytest.raises(OSError):
                os.fstat(fd)
        finally:
            a.close()
            b.close()


@compiled
def test_messages_of_the_compiled_core_behave_as_any_message(files: list[int]) -> None:
    assert ccore is not None
    a, b = socket.socketpair()
    try:
        write_raw(a, header(2, 2) + b"hi", files[:2])
        msg = ccore.recv_frame(b, bytearray(64), 1024, 100, 4)
        assert isinstance(msg, Message) and len(msg) == 2 and msg.address is None
        assert msg.credentials is None and not msg.memfd and not msg.closed
        fd = msg.take_fd(1)
        assert msg.fds[1] == -1 and inode(fd) == inode(files[1])
        os.close(fd)
        msg.close()
        assert msg.closed and msg.fds == (-1, -1)
        with pytest.raises(TypeError):
            ccore.recv_frame(b, bytearray(64), 1024, 100)
        with pytest.raises(BufferError, match="not writable"):
            ccore.recv_frame(b, b"read-only", 1024, 100, 4)
    finally:
        a.close()
        b.close()


def _plain_messages() -> list[tuple[str, Message]]:
    """One plain message from each place that builds one, on the core that runs and pure."""
    made = [("Message()", Message(b"ab")), ("plain_message()", plain_message(b"ab"))]
    run: list[Any] = []
    py_scan_plain(header(2) + b"ab" + header(2) + b"ab", 0, 100, run)
    made += [("py_scan_plain", m) for m in run]
    for name, recv in [("py_recv_frame", py_recv_frame)] + (
        [("recv_frame", ccore.recv_frame)] if ccore is not None else []
    ):
        a, b = socket.socketpair()
        with a, b:
            a.send(header(2) + b"ab")
            got = recv(b, memoryview(bytearray(64)), 1024, 100, 4)
            assert isinstance(got, Message)
            made.append((name, got))
    x, y = Channel.pair()
    with x, y:
        x.send(b"ab", more=True)
        x.send(b"ab")
        made += [("Channel.recv, batch", y.recv()), ("Channel.recv", y.recv())]
    return made


def test_plain_messages_behave_alike_and_share_nothing_writable() -> None:
    """A plain message's descriptor list may be one shared empty sequence: nothing to
    take, closing changes nothing, and no message can change another's."""
    made = _plain_messages()
    assert len(made) >= 6
    for name, msg in made:
        assert (msg.data, msg.fds, len(msg)) == (b"ab", (), 2), name
        assert (msg.address, msg.credentials, msg.memfd) == (None, None, False), name
        assert msg.take_fds() == [], name
        with pytest.raises(IndexError, match="has 0 descriptor"):
            msg.take_fd(0)
        with pytest.raises(IndexError):
            msg.take_file(0)
        msg.close()
        msg.close()
        assert msg.closed and msg.data == b"ab", name
    for _, msg in made:
        assert msg.fds == (), "a message's descriptors changed another's"
