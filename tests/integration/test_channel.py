"""``Channel`` and ``AsyncChannel``: messages with descriptors, same semantics everywhere.

Every behaviour runs over stream, seqpacket and datagram socketpairs, with
the blocking channel and the asynchronous one under asyncio and under trio
(the ``api`` fixture), plus named
sockets through ``connect``/``listen``/``bind``. The seed's rules of 15.7
each have a test:

* step 3: a descriptor stays open in flight after the sender closes it
  (also when the sending *process* has exited);
* step 4: the received number differs, but it is the same open file: the
  offset is shared;
* a receiver without room for descriptors is told (``ControlTruncated``);
* ``MSG_PEEK`` is never used with descriptors;
* ``MSG_CTRUNC``: room for 1, the sender sends 3: a clear error, nothing leaked.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import afunix
import afunix.lowlevel
from afunix import (
    AsyncChannel,
    Channel,
    ControlTruncated,
    Listener,
    Message,
    ProtocolError,
    TooManyFds,
    UnsupportedFeature,
)
from afunix._memfd import MEMFD_THRESHOLD
from afunix._protocol import FLAG_MEMFD, encode_header
from afunix.lowlevel import PayloadError

from ..conftest import open_fds

TYPES = ["stream", "seqpacket", "dgram"]


# ------------------------------------------------------- one test, two APIs
class SyncAPI:
    """The blocking channel, behind the same awaitable interface as the asyncio one."""

    name = "sync"
    cls: Any = Channel

    def pair(self, kind: str, **kw: Any) -> tuple[Any, Any]:
        return Channel.pair(kind, **kw)

    async def send(self, ch: Any, *args: Any, **kw: Any) -> None:
        ch.send(*args, **kw)

    async def recv(self, ch: Any) -> Message:
        msg: Message = ch.recv()
        return msg

    async def both(self, send: Callable[[], Any], recv: Callable[[], Any]) -> Any:
        """Send from a thread while receiving here (a big stream message needs both)."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                send()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        try:
            return recv()
        finally:
            t.join(20)
            if errors:
                raise errors[0]


class AsyncAPI:
    name = "asyncio"
    cls: Any = AsyncChannel

    def pair(self, kind: str, **kw: Any) -> tuple[Any, Any]:
        return AsyncChannel.pair(kind, **kw)

    async def send(self, ch: Any, *args: Any, **kw: Any) -> None:
        await ch.send(*args, **kw)

    async def recv(self, ch: Any) -> Message:
        msg: Message = await ch.recv()
        return msg

    async def both(
        self, send: Callable[[], Awaitable[Any]], recv: Callable[[], Awaitable[Any]]
    ) -> Any:
        _, got = await asyncio.gather(send(), recv())
        return got


class TrioAPI(AsyncAPI):
    """The same AsyncChannel, run by trio (through anyio's task groups)."""

    name = "trio"

    async def both(
        self, send: Callable[[], Awaitable[Any]], recv: Callable[[], Awaitable[Any]]
    ) -> Any:
        got: list[Any] = []

        async def receive() -> None:
            got.append(await recv())

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            tg.start_soon(receive)
        return got[0]


API = SyncAPI | AsyncAPI

#: The runtime :func:`run` uses: the ``api`` fixture sets it for its test.
RUNTIME = ["asyncio"]


@pytest.fixture(params=[SyncAPI(), AsyncAPI(), TrioAPI()], ids=["sync", "asyncio", "trio"])
def api(request: pytest.FixtureRequest) -> Iterator[API]:
    RUNTIME[0] = "trio" if request.param.name == "trio" else "asyncio"
    yield request.param
    RUNTIME[0] = "asyncio"


@pytest.fixture(params=["asyncio", "trio"])
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """The event loop that runs the test's :func:`run` (and anyio's task groups in it)."""
    RUNTIME[0] = request.param
    yield request.param
    RUNTIME[0] = "asyncio"


async def _await(coro: Coroutine[Any, Any, None]) -> None:
    await coro


def run(coro: Coroutine[Any, Any, None]) -> None:
    anyio.run(_await, coro, backend=RUNTIME[0])


@pytest.fixture
def textfile(tmp_path: Path) -> Path:
    path = tmp_path / "alphabet.txt"
    path.write_bytes(b"0123456789abcdefghijklmnopqrstuvwxyz")
    return path


# --------------------------------------------------------------- the basics
@pytest.mark.parametrize("kind", TYPES)
def test_send_and_receive_descriptors(api: API, kind: str, textfile: Path) -> None:
    async def body() -> None:
        a, b = api.pair(kind)
        with a, b, open(textfile, "rb") as f:
            r, w = os.pipe()
            s1, s2 = socket.socketpair()
            with s1, s2:
                try:
                    await api.send(a, b"three kinds", [f, r, s1])
                finally:
                    os.close(r)
                await api.send(a, b"none")
                await api.send(a, b"")
                with await api.recv(b) as msg:
                    assert msg.data == b"three kinds"
                    assert len(msg.fds) == 3
                    fobj = msg.take_file(0)
                    sock = msg.take_socket(2)
                    with fobj, sock:
                        assert fobj.read(4) == b"0123"
                        sock.sendall(b"via passed socket")
                        assert s2.recv(100) == b"via passed socket"
                    os.write(w, b"pipe")
                    assert os.read(msg.fds[1], 4) == b"pipe"
                os.close(w)
                with await api.recv(b) as msg:
                    assert (msg.data, msg.fds) == (b"none", ())
                with await api.recv(b) as msg:
                    assert (msg.data, msg.fds) == (b"", ())

    run(body())


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_end_of_file(api: API, kind: str) -> None:
    async def body() -> None:
        a, b = api.pair(kind)
        with b:
            await api.send(a, b"last")
            a.close()
            with await api.recv(b) as msg:
                assert msg.data == b"last"
            with pytest.raises(EOFError):
                await api.recv(b)

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_iteration(kind: str) -> None:
    a, b = Channel.pair(kind)
    with b:
        for i in range(3):
            a.send(str(i).encode())
        if kind == "dgram":
            got = [next(iter(b)).data for _ in range(3)]
        else:
            a.close()
            got = [m.data for m in b]
        a.close()
        assert got == [b"0", b"1", b"2"]


def test_async_iteration(runtime: str) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair("stream")
        async with b:
            for i in range(3):
                await a.send(str(i).encode(), [0])
            await a.aclose()
            got = []
            async for msg in b:
                with msg:
                    got.append((msg.data, len(msg.fds)))
            assert got == [(b"0", 1), (b"1", 1), (b"2", 1)]

    run(body())


# ------------------------------------------------------------ 15.7, step 3
@pytest.mark.parametrize("kind", TYPES)
def test_descriptor_in_flight_outlives_the_senders_close(
    api: API, kind: str, textfile: Path
) -> None:
    async def body() -> None:
        a, b = api.pair(kind)
        with b:
            fd = os.open(textfile, os.O_RDONLY)
            await api.send(a, b"in flight", [fd])
            os.close(fd)  # the sender closes its descriptor at once...
            a.close()  # ...and its end of the channel
            with await api.recv(b) as msg:
                assert os.read(msg.fds[0], 4) == b"0123"  # still open for the receiver

    run(body())


def test_descriptor_in_flight_outlives_the_sending_process(textfile: Path) -> None:
    ours, theirs = afunix.pair("stream")
    code = textwrap.dedent(
        """
        import os, sys, afunix
        ch = afunix.Channel(afunix.Socket(fileno=int(sys.argv[1])))
        fd = os.open(sys.argv[2], os.O_RDONLY)
        ch.send(str(fd).encode(), [fd])
        os.close(fd)
        ch.close()
        """
    )
    with Channel(ours) as ch:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(theirs.fileno()), str(textfile)],
            pass_fds=(theirs.fileno(),),
            timeout=30,
            check=True,
        )
        theirs.close()
        assert proc.returncode == 0  # the sender is gone before we receive
        with ch.recv() as msg:
            assert os.read(msg.fds[0], 3) == b"012"


# ------------------------------------------------------------ 15.7, step 4
@pytest.mark.parametrize("kind", TYPES)
def test_received_number_differs_but_it_is_the_same_open_file(
    api: API, kind: str, textfile: Path
) -> None:
    async def body() -> None:
        a, b = api.pair(kind)
        with a, b:
            fd = os.open(textfile, os.O_RDONLY)
            try:
                os.read(fd, 3)
                await api.send(a, b"x", [fd])
                with await api.recv(b) as msg:
                    got = msg.fds[0]
                    assert got != fd
                    # Same open file description: the offset is shared both ways.
                    assert os.lseek(got, 0, os.SEEK_CUR) == 3
                    assert os.read(got, 2) == b"34"
                    assert os.lseek(fd, 0, os.SEEK_CUR) == 5
                    # A fresh open of the same path would have its own offset.
                    fresh = os.open(textfile, os.O_RDONLY)
                    assert os.lseek(fresh, 0, os.SEEK_CUR) == 0
                    os.close(fresh)
            finally:
                os.close(fd)

    run(body())


def test_shared_offset_across_processes(textfile: Path) -> None:
    ours, theirs = afunix.pair("stream")
    code = textwrap.dedent(
        """
        import os, sys, afunix
        ch = afunix.Channel(afunix.Socket(fileno=int(sys.argv[1])))
        fd = os.open(sys.argv[2], os.O_RDONLY)
        os.read(fd, 10)
        ch.send(str(fd).encode(), [fd])
        with ch.recv():
            pass
        ch.send(str(os.lseek(fd, 0, os.SEEK_CUR)).encode())
        """
    )
    with Channel(ours) as ch:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno()), str(textfile)],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        try:
            with ch.recv() as msg:
                assert os.lseek(msg.fds[0], 0, os.SEEK_CUR) == 10  # where the peer left it
                assert os.read(msg.fds[0], 5) == b"abcde"
                ch.send(b"done")
            with ch.recv() as offset:
                assert offset.data == b"15"  # our read moved the peer's offset
        finally:
            assert proc.wait(30) == 0


# ------------------------------------------------------ room for descriptors
@pytest.mark.parametrize("kind", TYPES)
def test_receiver_without_room_is_reported(api: API, kind: str) -> None:
    async def body() -> None:
        a, b = api.pair(kind, maxfds=0)
        b_fd = b.fileno()
        with a, b:
            before = open_fds()
            await api.send(a, b"x", [0])
            # A stream makes room for 253 per recvmsg (one sendmsg may carry several
            # messages' descriptors) and refuses the message by its header.
            refusal = (
                pytest.raises(ProtocolError, match="more than max_fds=0")
                if kind == "stream"
                else pytest.raises(ControlTruncated, match="made no room")
            )
            with refusal:
                await api.recv(b)
            after = open_fds()
            if kind == "stream":  # a lost message breaks the stream: closed
                assert b.closed
                after[b_fd] = before[b_fd]
            assert after == before

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_msg_ctrunc_room_for_one_sender_sends_three(api: API, kind: str) -> None:
    async def body() -> None:
        a, b = api.pair(kind, maxfds=1)
        with a, b:
            before = open_fds()
            await api.send(a, b"three", [0, 1, 2])
            if kind == "stream":  # refused by its header, see above
                with pytest.raises(ProtocolError, match="more than max_fds=1"):
                    await api.recv(b)
            else:
                with pytest.raises(ControlTruncated, match="room for 1 descriptor") as info:
                    await api.recv(b)
                assert "lost" in str(info.value)
            if kind == "stream":
                assert b.closed  # the stream lost a message: it cannot go on
            else:
                assert open_fds() == before  # nothing leaked
                await api.send(a, b"next", [0])  # and the channel still works
                with await api.recv(b) as msg:
                    assert msg.data == b"next"

    run(body())


def test_too_many_descriptors_leak_nothing_on_a_stream() -> None:
    before = open_fds()
    a, b = Channel.pair("stream", maxfds=1)
    a.send(b"three", [0, 1, 2])
    with pytest.raises(ProtocolError, match="more than max_fds=1"):
        b.recv()
    a.close()
    b.close()
    assert open_fds() == before


class _RecordingSocket(afunix.Socket):
    """A real socket that records the flags of every ``recvmsg``."""

    flags_seen: list[int]

    def recvmsg(self, *args: Any) -> Any:
        self.flags_seen.append(args[2] if len(args) > 2 else 0)
        return super().recvmsg(*args)

    def recvmsg_into(self, *args: Any) -> Any:
        self.flags_seen.append(args[2] if len(args) > 2 else 0)
        return super().recvmsg_into(*args)


@pytest.mark.parametrize("kind", TYPES)
def test_msg_peek_is_never_used(kind: str) -> None:
    sock_type = afunix._sockets.socket_type(kind)
    x, y = socket.socketpair(socket.AF_UNIX, sock_type)
    rec = _RecordingSocket(fileno=y.detach())
    rec.flags_seen = []
    y.close()
    with Channel(x) as a, Channel(rec, recv_bufsize=3) as b:
        a.send(b"several chunks", [0, 1])
        a.send(b"more", [2])
        for _ in range(2):
            with b.recv():
                pass
    assert rec.flags_seen
    assert not any(f & socket.MSG_PEEK for f in rec.flags_seen)
    assert all(f & socket.MSG_CMSG_CLOEXEC for f in rec.flags_seen)


# ------------------------------------------------------------- Message owns fds
def test_message_closes_what_is_not_taken(textfile: Path) -> None:
    a, b = Channel.pair()
    with a, b:
        fd = os.open(textfile, os.O_RDONLY)
        a.send(b"x", [fd, fd, fd])
        os.close(fd)
        with b.recv() as msg:
            kept = msg.take_fd(1)
            others = [msg.fds[0], msg.fds[2]]
            assert msg.fds[1] == -1
            with pytest.raises(ValueError, match="already taken"):
                msg.take_fd(1)
            with pytest.raises(IndexError):
                msg.take_fd(5)
        assert msg.closed
        for other in others:
            with pytest.raises(OSError) as info:
                os.fstat(other)
            assert info.value.errno == errno.EBADF
        assert os.read(kept, 2) == b"01"
        os.close(kept)


def test_take_fds_transfers_everything() -> None:
    a, b = Channel.pair()
    with a, b:
        a.send(b"x", [0, 1])
        with b.recv() as msg:
            taken = msg.take_fds()
        assert len(taken) == 2
        for fd in taken:
            os.fstat(fd)  # still open: ours now
            os.close(fd)


def test_forgotten_message_warns_and_closes() -> None:
    a, b = Channel.pair()
    with a, b:
        a.send(b"x", [0])
        msg = b.recv()
        fd = msg.fds[0]
        with pytest.warns(ResourceWarning, match="not taken"):
            del msg
            gc.collect()
        with pytest.raises(OSError):
            os.fstat(fd)


# --------------------------------------------------------------------- memfds
@pytest.mark.parametrize("kind", TYPES)
def test_large_payload_goes_as_sealed_memfd(api: API, kind: str) -> None:
    data = os.urandom(MEMFD_THRESHOLD + 12345)

    async def body() -> None:
        a, b = api.pair(kind)
        with a, b:
            await api.send(a, data, [0])
            with await api.recv(b) as msg:
                assert isinstance(msg.data, memoryview)
                assert msg.data.readonly
                assert msg.data == data
                assert len(msg.fds) == 1  # the memfd is not handed out as a descriptor
                assert "memfd" in repr(msg)
            assert msg.data == b""  # the mapping is gone with the message

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_memfd_on_request_and_refused_on_request(api: API, kind: str) -> None:
    async def body() -> None:
        a, b = api.pair(kind)
        with a, b:
            await api.send(a, b"small", memfd=True)
            with await api.recv(b) as msg:
                assert isinstance(msg.data, memoryview)
                assert msg.data == b"small"
            await api.send(a, b"small", memfd=False)
            with await api.recv(b) as msg:
                assert msg.data == b"small"
                assert isinstance(msg.data, bytes)

    run(body())


def test_big_inline_stream_message(api: API) -> None:
    data = os.urandom(3 * 1024 * 1024)

    async def body() -> None:
        a, b = api.pair("stream")
        with a, b:
            msg = await api.both(lambda: a.send(data, [0], memfd=False), lambda: b.recv())
            with msg:
                assert isinstance(msg.data, bytes)
                assert msg.data == data
                assert len(msg.fds) == 1

    run(body())


@pytest.mark.parametrize("kind", ["dgram", "seqpacket"])
def test_packet_too_big_falls_back_to_memfd(api: API, kind: str) -> None:
    data = os.urandom(1024 * 1024)

    async def body() -> None:
        a, b = api.pair(kind, memfd_threshold=None)
        with a, b:
            await api.send(a, data)  # EMSGSIZE inline: sent as a memfd instead
            with await api.recv(b) as msg:
                assert isinstance(msg.data, memoryview)
                assert msg.data == data
            with pytest.raises(OSError) as info:
                await api.send(a, data, memfd=False)  # told not to: the error stands
            assert info.value.errno == errno.EMSGSIZE

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_unsealed_memfd_from_a_peer_is_refused(kind: str) -> None:
    sock_type = afunix._sockets.socket_type(kind)
    raw, ours = socket.socketpair(socket.AF_UNIX, sock_type)
    with raw, Channel(ours) as ch:
        mfd = os.memfd_create("forged", os.MFD_CLOEXEC)
        os.write(mfd, b"mutable!")
        before = open_fds()
        raw.sendmsg(
            [encode_header(8, 2, FLAG_MEMFD)],
            [afunix._cmsg.rights([0, mfd])],
        )
        os.close(mfd)
        with pytest.raises(PayloadError, match="lacks the seal"):
            ch.recv()
        before.pop(mfd, None)
        assert open_fds() == before
        afunix.lowlevel.sendall_fds(raw, encode_header(2, 0) + b"ok")
        with ch.recv() as msg:  # the framing is intact: the channel goes on
            assert msg.data == b"ok"


# ------------------------------------------------------------ protocol errors
def test_garbage_on_a_stream_closes_the_channel() -> None:
    raw, ours = socket.socketpair()
    with raw, Channel(ours) as ch:
        afunix.lowlevel.sendall_fds(raw, b"GET / HTTP/1.0\r\n\r\n", [0, 1])
        before = open_fds()
        with pytest.raises(ProtocolError, match="not an afunix frame") as info:
            ch.recv()
        assert info.value.errno == errno.EPROTO
        assert ch.closed  # socket and the descriptors that came with the frame
        assert set(open_fds()) < set(before)


def test_oversized_frame_is_refused() -> None:
    a, b = Channel.pair("stream", max_size=1000)
    with a, b:
        with pytest.raises(OSError, match="exceeds this channel's max_size") as out:
            a.send(b"x" * 1001)
        assert out.value.errno == errno.EMSGSIZE
    raw, ours = socket.socketpair()
    with raw, Channel(ours, max_size=1000) as ch:
        raw.sendall(encode_header(1001, 0) + b"x" * 1001)
        with pytest.raises(ProtocolError, match="exceeds the maximum") as info:
            ch.recv()
        assert info.value.errno == errno.EMSGSIZE


def test_too_many_descriptors() -> None:
    a, b = Channel.pair()
    with a, b:
        with pytest.raises(TooManyFds):
            a.send(b"x", [0] * 254)
        with pytest.raises(TooManyFds):
            a.send(b"x" * 10, [0] * 253, memfd=True)  # the memfd is one more
        a.send(b"x", [0] * 253)
        with b.recv() as msg:
            assert len(msg.fds) == 253


def test_channel_needs_an_af_unix_or_tcp_socket() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, pytest.raises(UnsupportedFeature, match=r"AF_UNIX socket, or a TCP one.*SOCK_DGRAM"):
        Channel.from_socket(udp)
    with pytest.raises(ValueError, match="maxfds"):
        Channel.pair(maxfds=300)


# ------------------------------------------------------- named sockets, options
def test_listener_connect_and_datagram_replies(sockdir: Path) -> None:
    path = sockdir / "chan.sock"
    with Listener(path) as lst, Channel.connect(path) as client, lst.accept() as server:
        client.send(b"hi", [0])
        with server.recv() as msg:
            assert msg.data == b"hi"
            assert len(msg.fds) == 1
        server.send(b"back")
        assert client.recv().data == b"back"
    with (
        Channel.listen(sockdir / "seq.sock", "seqpacket") as lst,
        Channel.connect(sockdir / "seq.sock", "seqpacket") as client,
        lst.accept() as server,
    ):
        client.send(b"rec", [1])
        with server.recv() as msg:
            assert (msg.data, len(msg.fds)) == (b"rec", 1)
    with (
        Channel.bind(sockdir / "dg.sock") as server,
        Channel.connect(sockdir / "dg.sock", "dgram") as client,
    ):
        client.send(b"ping", [2])
        with server.recv() as msg:
            assert msg.data == b"ping"
            server.send(b"pong", [0], address=msg.address)
        with client.recv() as reply:
            assert (reply.data, len(reply.fds)) == (b"pong", 1)
    with pytest.raises(ValueError, match="bind"):
        Listener(sockdir / "x.sock", "dgram")


@pytest.mark.parametrize(
    ("kind", "sock_type"), [("stream", socket.SOCK_STREAM), ("seqpacket", socket.SOCK_SEQPACKET)]
)
def test_accepted_channels_are_blocking_sockets_of_the_listeners_type(
    sockdir: Path, kind: str, sock_type: int
) -> None:
    # Whatever the listener's timeout or socket.setdefaulttimeout() say, a channel
    # accepted is blocking (recv waits), an AF_UNIX socket of the listener's type.
    path = sockdir / "blk.sock"
    with Listener(path, kind) as lst:
        lst.sock.settimeout(5)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(3)
        try:
            with Channel.connect(path, kind), lst.accept() as server:
                sock = server.socket
                assert sock.gettimeout() is None
                assert os.get_blocking(sock.fileno())
                assert (sock.family, sock.type) == (socket.AF_UNIX, sock_type)
        finally:
            socket.setdefaulttimeout(old)


def test_async_connect_and_bind(sockdir: Path, runtime: str) -> None:
    async def body() -> None:
        with Channel.bind(sockdir / "dg.sock") as server:
            client = await AsyncChannel.connect(sockdir / "dg.sock", "dgram")
            async with client:
                await client.send(b"ping", [0])
                with server.recv() as msg:
                    server.send(b"pong", address=msg.address)
                with await client.recv() as reply:
                    assert reply.data == b"pong"
        server2 = AsyncChannel.bind(sockdir / "dg2.sock")
        with server2:
            pass
        assert server2.closed

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_credentials(api: API, kind: str) -> None:
    async def body() -> None:
        a, b = api.pair(kind, credentials=True)
        with a, b:
            await api.send(a, b"who", [0])
            with await api.recv(b) as msg:
                creds = msg.credentials
                assert creds is not None
                assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())

    run(body())


@pytest.mark.parametrize("kind", TYPES)
def test_credentials_with_a_pidfd_requested_by_someone_else(api: API, kind: str) -> None:
    """``SO_PASSPIDFD`` set on the receiving socket (by the program, or a library it
    uses): the kernel adds an ``SCM_PIDFD`` to each message. The channel takes the
    credentials as ``recv_credentials`` does and closes the pidfd (no message could
    own it on a stream); before, every receive failed with UnexpectedControl."""

    async def body() -> None:
        a, b = api.pair(kind, credentials=True)
        with a, b:
            try:
                afunix.lowlevel.enable_credentials(b.socket, pidfd=True)
            except afunix.UnsupportedFeature:
                pytest.fail("this kernel has no SO_PASSPIDFD (Linux 6.5+ is expected)")
            with open(os.devnull, "rb") as f:
                for i in range(3):
                    await api.send(a, b"who %d" % i, [f])
            for i in range(3):
                with await api.recv(b) as msg:
                    assert msg.data == b"who %d" % i and len(msg.fds) == 1
                    creds = msg.credentials
                    assert creds is not None and creds.pidfd is None
                    assert (creds.pid, creds.uid) == (os.getpid(), os.getuid())

    before = open_fds()
    run(body())
    assert open_fds() == before


def test_concurrent_senders_never_interleave() -> None:
    a, b = Channel.pair("stream", memfd_threshold=None)
    payloads = [bytes([i]) * 300_000 for i in range(4)]
    with a, b:
        threads = [threading.Thread(target=a.send, args=(p, [0])) for p in payloads]
        for t in threads:
            t.start()
        got = []
        for _ in payloads:
            with b.recv() as msg:
                got.append(bytes(msg.data))
                assert len(msg.fds) == 1
        for t in threads:
            t.join(10)
    assert sorted(got) == payloads


def test_async_concurrent_senders_never_interleave(runtime: str) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair("stream", memfd_threshold=None)
        payloads = [bytes([i]) * 300_000 for i in range(4)]
        out: list[bytes] = []
        async with a, b:

            async def receive() -> None:
                for _ in payloads:
                    with await b.recv() as msg:
                        out.append(bytes(msg.data))

            async with anyio.create_task_group() as tg:
                for p in payloads:
                    tg.start_soon(a.send, p)
                tg.start_soon(receive)
            assert sorted(out) == payloads

    run(body())


def test_async_concurrent_receivers_are_served_in_order(runtime: str) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair("stream")
        got: list[tuple[int, bytes]] = []
        async with a, b:

            async def receive(i: int) -> None:
                with await b.recv() as msg:
                    got.append((i, msg.data))

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(receive, i)
                    await anyio.wait_all_tasks_blocked()  # receiver i waits before i + 1
                for i in range(5):
                    await a.send(b"m%d" % i)
        assert got == [(i, b"m%d" % i) for i in range(5)]

    run(body())


def test_async_close_wakes_a_waiting_receiver(runtime: str) -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair("stream")
        errors: list[int | None] = []

        async def receive() -> None:
            with pytest.raises(OSError) as info:
                await b.recv()
            errors.append(info.value.errno)

        with a:
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                tg.start_soon(receive)  # one waits for the socket, one for its turn
                await anyio.wait_all_tasks_blocked()
                b.close()
        assert errors == [errno.EBADF, errno.EBADF]

    run(body())


def test_async_cancelled_receiver_loses_no_message(runtime: str) -> None:
    """A receiver cancelled as its message arrives either got it or left it for the
    next receive: 300 rounds, every message received exactly once."""

    async def body() -> None:
        a, b = AsyncChannel.pair("stream")
        taken = 0
        async with a, b:
            for round_ in range(300):
                got: list[Message] = []

                async def receive(got: list[Message] = got) -> None:
                    got.append(await b.recv())

                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(receive)
                        await anyio.wait_all_tasks_blocked()
                        await a.send(b"r%d" % round_)
                        scope.cancel()
                if got:
                    taken += 1
                else:
                    with anyio.fail_after(5):
                        got.append(await b.recv())
                assert [m.data for m in got] == [b"r%d" % round_]
                got[0].close()

    run(body())


# ------------------------------------------------------------- public names
def test_public_names_are_exported() -> None:
    """Channels and their errors in ``afunix``; the calls beneath them in ``afunix.lowlevel``."""
    faces = {
        afunix: ["AsyncChannel", "Channel", "ControlTruncated", "Listener", "Message"],
        afunix.lowlevel: [
            "ControlError",
            "HelperError",
            "MemfdBuffer",
            "MemfdPool",
            "PayloadError",
            "UnexpectedControl",
            "my_open",
            "recv_fds",
            "send_fds",
            "sendall_fds",
        ],
    }
    for module, names in faces.items():
        for name in names:
            assert name in module.__all__, name
            assert getattr(module, name) is not None
    assert "TooManyFds" in afunix.__all__


def test_send_buffer_zero_copy_path(api: API) -> None:
    async def body() -> None:
        a, b = api.pair("stream")
        with a, b, afunix.lowlevel.MemfdPool(1 << 16, spares=1) as pool:
            pool.fill()
            buf = pool.acquire(5)
            with buf.view as v:
                v[:5] = b"built"
            if isinstance(api, SyncAPI):
                a.send_buffer(buf, 5, [0])
            else:
                await a.send_buffer(buf, 5, [0])
            with await api.recv(b) as msg:
                assert msg.data == b"built"
                assert len(msg.fds) == 1

    run(body())
