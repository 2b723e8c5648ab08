"""``Channel`` and ``AsyncChannel`` over ``tcp://`` (issue 18, first step), on real sockets.

Messages and ``more=True`` batches both ways, over IPv4 and IPv6 loopback; a
40 MiB payload (above the 32 MiB memfd threshold) arriving intact, inline;
descriptors, ``memfd=True`` and ``send_buffer`` refused with
``UnsupportedFeature`` before anything is sent, the next message arriving as
if nothing happened; ``credentials=True`` refused; ``TCP_NODELAY`` set; a
listener on an address other hosts can reach refused unless
``allow_remote=True``. The autouse fixture of conftest checks that no
descriptor leaks (refused channels close their sockets).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from afunix import AfunixError, AsyncChannel, Channel, UnsupportedFeature
from afunix._memfd import MEMFD_THRESHOLD, MemfdBuffer

BIG = 40 << 20
assert BIG > MEMFD_THRESHOLD  # a local channel would send it as a memfd
BATCH = 500
ROUNDS = 1000


def big_payload() -> bytes:
    """40 MiB that differ from place to place (a shifted or lost chunk shows)."""
    block = os.urandom(1 << 20)
    return b"".join(bytes([i]) + block[1:] for i in range(BIG >> 20))


@pytest.fixture(params=["127.0.0.1", "[::1]"], ids=["ipv4", "ipv6"])
def tcp_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel]]:
    """A client and a server channel over loopback TCP."""
    with Channel.listen(f"tcp://{request.param}:0") as lst:
        client = Channel.connect(lst.address, timeout=10)
        with client, lst.accept() as server:
            yield client, server


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_messages_both_ways_and_tcp_nodelay(tcp_pair: tuple[Channel, Channel]) -> None:
    client, server = tcp_pair
    assert client.socket.family in (socket.AF_INET, socket.AF_INET6)
    assert nodelay(client.socket) and nodelay(server.socket)
    client.send(b"ping")
    with server.recv() as msg:
        assert msg.data == b"ping" and not msg.fds and not msg.memfd
    server.send(b"pong" * 3000)  # two buffers (header, payload), one sendmsg
    with client.recv() as msg:
        assert msg.data == b"pong" * 3000
    client.send(b"")
    with server.recv() as msg:
        assert msg.data == b""


def test_more_batches_arrive_message_by_message(tcp_pair: tuple[Channel, Channel]) -> None:
    client, server = tcp_pair
    for i in range(BATCH):
        client.send(b"m%d" % i, more=True)
    client.flush()
    for i in range(BATCH):
        with server.recv() as msg:
            assert msg.data == b"m%d" % i
    # small held frames, a large message queued behind them, a last small one
    server.send(b"s", more=True)
    server.send(b"L" * 20000, more=True)
    server.send(b"t")
    got = []
    for _ in range(3):
        with client.recv() as msg:
            got.append(bytes(msg.data))
    assert got == [b"s", b"L" * 20000, b"t"]


def test_a_40_mib_payload_arrives_inline(tcp_pair: tuple[Channel, Channel]) -> None:
    client, server = tcp_pair
    data = big_payload()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            client.send(data)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        with server.recv() as msg:
            assert not msg.memfd  # inline: no memfd crosses TCP
            assert len(msg.data) == BIG and msg.data == data
    finally:
        sender.join(30)
    assert not errors
    client.send(b"after")  # the stream is still framed
    with server.recv() as msg:
        assert msg.data == b"after"


def test_descriptors_are_refused_and_the_channel_goes_on(
    tcp_pair: tuple[Channel, Channel],
) -> None:
    client, server = tcp_pair
    r, w = os.pipe()
    try:
        client.send(b"first", more=True)  # a batch begun before the refusals
        for call in (
            lambda: client.send(b"with a pipe", fds=[r, w]),
            lambda: client.send(b"iterated", fds=iter([r])),
            lambda: client.send(b"big" * 10000, fds=[r]),
            lambda: client.send(b"forced", memfd=True),
        ):
            with pytest.raises(UnsupportedFeature, match=r"over TCP \(tcp://") as info:
                call()
            assert info.value.errno == errno.EOPNOTSUPP
            assert "nothing was sent and the channel is still usable" in str(info.value)
        with MemfdBuffer(16) as buf, pytest.raises(UnsupportedFeature, match="send_buffer"):
            client.send_buffer(buf, 1)
        assert not client.closed
        client.send(b"second")
        for want in (b"first", b"second"):  # exactly these, nothing half-written between
            with server.recv() as msg:
                assert msg.data == want and not msg.fds
        os.fstat(r), os.fstat(w)  # the caller's descriptors are untouched
    finally:
        os.close(r)
        os.close(w)


def test_refusals_mixed_into_batches_never_leave_a_byte(
    tcp_pair: tuple[Channel, Channel],
) -> None:
    """1,000 rounds of a held message, a refused one and a sent one: the receiver
    gets exactly the held and the sent ones, in order."""
    client, server = tcp_pair

    got: list[bytes] = []

    def receive() -> None:
        for _ in range(2 * ROUNDS):
            with server.recv() as msg:
                got.append(bytes(msg.data) + b"+fds" * bool(msg.fds))

    receiver = threading.Thread(target=receive)
    receiver.start()
    refused = 0
    try:
        for i in range(ROUNDS):
            client.send(b"held %d" % i, more=True)
            try:
                client.send(b"refused %d" % i, fds=[0], more=i % 2 == 0)
            except UnsupportedFeature:
                refused += 1
            client.send(b"sent %d" % i)
    finally:
        receiver.join(30)
    assert not receiver.is_alive() and refused == ROUNDS
    assert got == [b"%s %d" % (kind, i) for i in range(ROUNDS) for kind in (b"held", b"sent")]


def test_credentials_are_refused_on_both_ends() -> None:
    with Channel.listen("tcp://127.0.0.1:0", credentials=True) as lst:
        with Channel.connect(lst.address) as client:
            with pytest.raises(UnsupportedFeature, match=r"credentials=True\) over TCP") as info:
                lst.accept()  # the accepted socket is closed (the leak check sees it)
            assert info.value.errno == errno.EOPNOTSUPP
            with pytest.raises(EOFError):
                client.recv()  # ... so the client sees its end of file
        with pytest.raises(UnsupportedFeature, match="credentials=True"):
            Channel.connect(lst.address, credentials=True)  # its socket closed too


def this_hosts_address() -> str:
    """This machine's IPv4 address on its route out, else 0.0.0.0 (every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1; a UDP connect sends nothing
            ip = str(probe.getsockname()[0])
        except OSError:
            return "0.0.0.0"
    return "0.0.0.0" if ipaddress.ip_address(ip).is_loopback else ip


@pytest.mark.parametrize("host", [this_hosts_address(), "0.0.0.0", "[::]"])
def test_a_listener_other_hosts_can_reach_needs_allow_remote(host: str) -> None:
    with pytest.raises(AfunixError, match="allow_remote=True") as info:
        Channel.listen(f"tcp://{host}:0")
    assert info.value.errno == errno.EACCES
    assert "not a loopback address" in str(info.value)
    with Channel.listen(f"tcp://{host}:0", allow_remote=True) as lst:
        port = lst.address.port
        target = host if host not in ("0.0.0.0", "[::]") else "127.0.0.1"
        if host == "[::]":
            target = "[::1]"
        with Channel.connect(f"tcp://{target}:{port}", timeout=10) as client, lst.accept() as srv:
            client.send(b"over the exposed port")
            with srv.recv() as msg:
                assert msg.data == b"over the exposed port"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "[::1]", "localhost"])
def test_loopback_listeners_need_no_allow_remote(host: str) -> None:
    with (
        Channel.listen(f"tcp://{host}:0") as lst,
        Channel.connect(lst.address, timeout=10) as client,
        lst.accept() as srv,
    ):
        srv.send(b"hi")
        with client.recv() as msg:
            assert msg.data == b"hi"


# ------------------------------------------------------------------- asyncio


async def async_pair(lst: socket.socket, address: object) -> tuple[AsyncChannel, AsyncChannel]:
    client = await AsyncChannel.connect(address, timeout=10)  # type: ignore[arg-type]
    conn, _ = await asyncio.get_running_loop().sock_accept(lst)
    return client, AsyncChannel.from_socket(conn)


def test_async_messages_batches_and_a_40_mib_payload() -> None:
    data = big_payload()

    async def body() -> None:
        with Channel.listen("tcp://127.0.0.1:0") as lst:
            lst.sock.setblocking(False)
            client, server = await async_pair(lst.sock, lst.address)
            async with client, server:
                assert nodelay(client.socket) and nodelay(server.socket)
                await client.send(b"ping")
                with await server.recv() as msg:
                    assert msg.data == b"ping"
                for i in range(BATCH):
                    await server.send(b"b%d" % i, more=True)
                await server.flush()
                for i in range(BATCH):
                    with await client.recv() as msg:
                        assert msg.data == b"b%d" % i
                _, msg = await asyncio.gather(client.send(data), server.recv())
                with msg:
                    assert not msg.memfd and len(msg.data) == BIG and msg.data == data
                await client.send(b"after")
                with await server.recv() as msg:
                    assert msg.data == b"after"

    asyncio.run(body())


def test_async_descriptors_and_credentials_are_refused() -> None:
    async def body() -> None:
        with Channel.listen("tcp://127.0.0.1:0") as lst:
            with pytest.raises(UnsupportedFeature, match="credentials=True"):
                await AsyncChannel.connect(lst.address, timeout=10, credentials=True)
            lst.sock.accept()[0].close()  # the refused client's connection
            lst.sock.setblocking(False)
            client, server = await async_pair(lst.sock, lst.address)
            async with client, server:
                await client.send(b"one", more=True)
                with pytest.raises(UnsupportedFeature, match=r"over TCP") as info:
                    await client.send(b"fd", fds=[0])
                assert info.value.errno == errno.EOPNOTSUPP
                with pytest.raises(UnsupportedFeature, match="memfd=True"):
                    await client.send(b"m", memfd=True)
                await client.send(b"two")
                for want in (b"one", b"two"):
                    with await server.recv() as msg:
                        assert msg.data == want

    asyncio.run(body())
