"""``tls://``: channels and servers over real mutual TLS (issue 18, second step).

A CA made by ``trustme`` in the test (``tests/remote_support.TlsCa``) signs a
server certificate (``localhost``, ``127.0.0.1``) and client certificates;
everything runs over real loopback TCP. Checked: messages, ``more=True``
batches and a payload above the (lowered) memfd threshold both ways;
descriptors, memfds and credentials refused naming the TLS transport; the
peer's certificate as ``tls_peer`` on both ends; a client without a
certificate, or one the server's CA did not sign, refused by a
``CERT_REQUIRED`` server (``EACCES``); ``PeerPolicy(tls_names=...)`` allowing
and denying; ``Server`` (thread, fork, asyncio) and ``AsyncServer`` (asyncio,
trio) serving TLS channels; ``AsyncChannel`` reading many small frames out of
one TLS record without waiting for a readiness that never comes; one sender
and one receiver thread on one TLS channel at once (a counted loop); the
non-loopback rule; ``afunix serve``/``afunix connect`` with ``--cert``,
``--key``, ``--ca``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import afunix
from afunix import AfunixError, AsyncChannel, Channel, PeerPolicy, TlsPeer, UnsupportedFeature
from afunix._protocol.machine import ChannelProtocol
from afunix.lowlevel import connect_tls
from afunix.server import AsyncConnection, AsyncServer, Connection

from ..conftest import afunix_cmd, open_fds, serving, wait_until
from ..remote_support import TlsCa

CLIENT = "client.afunix.test"
BATCH = 500
SWAPS = 2000  # messages each way while both threads of each end work at once


@pytest.fixture
def listener(tls_ca: TlsCa) -> Iterator[afunix.Listener]:
    with Channel.listen("tls://127.0.0.1:0", ssl=tls_ca.server_context()) as lst:
        yield lst


def accept_in_thread(lst: afunix.Listener) -> tuple[threading.Thread, list[Any]]:
    """``lst.accept()`` in a thread: its channel, or the error it raised, lands in the list."""
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(lst.accept())
        except OSError as exc:
            got.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


@pytest.fixture
def tls_pair(listener: afunix.Listener, tls_ca: TlsCa) -> Iterator[tuple[Channel, Channel]]:
    """A client and a server channel over mutual TLS on loopback."""
    thread, got = accept_in_thread(listener)
    client = Channel.connect(listener.address, ssl=tls_ca.client_context(), timeout=30)
    thread.join(30)
    [server] = got
    assert isinstance(server, Channel), server
    with client, server:
        yield client, server


def test_messages_batches_and_big_payloads_both_ways(tls_pair: tuple[Channel, Channel]) -> None:
    client, server = tls_pair
    client.send(b"hello over TLS")
    with server.recv() as msg:
        assert msg.data == b"hello over TLS" and not msg.fds and not msg.memfd
    for i in range(BATCH):
        server.send(b"m%d" % i, more=True)
    server.flush()
    for i in range(BATCH):
        with client.recv() as msg:
            assert msg.data == b"m%d" % i
    big = os.urandom(3 << 20)
    sender = threading.Thread(target=client.send, args=(big,))
    sender.start()  # 3 MiB each way: the reader must run while the writer writes
    try:
        with server.recv() as msg:
            assert bytes(msg.data) == big
    finally:
        sender.join(60)
    client.send(b"")
    with server.recv() as msg:
        assert msg.data == b""


def test_tls_peer_names_each_side(tls_pair: tuple[Channel, Channel]) -> None:
    client, server = tls_pair
    seen_by_server = server.tls_peer
    assert isinstance(seen_by_server, TlsPeer)
    assert CLIENT in seen_by_server.dns_names and CLIENT in seen_by_server.names
    assert seen_by_server.version.startswith("TLSv1.")
    assert seen_by_server.issuer  # trustme's CA
    assert client.tls_peer is not None
    assert "localhost" in client.tls_peer.dns_names
    assert "127.0.0.1" in client.tls_peer.ip_addresses
    assert "certificate" in seen_by_server.describe()


def test_descriptors_memfds_and_credentials_are_refused(
    tls_pair: tuple[Channel, Channel], listener: afunix.Listener, tls_ca: TlsCa
) -> None:
    client, server = tls_pair
    r, w = os.pipe()
    try:
        client.send(b"held", more=True)
        with pytest.raises(UnsupportedFeature, match=r"over TLS \(tls://") as info:
            client.send(b"with a pipe", fds=[r])
        assert info.value.errno == errno.EOPNOTSUPP
        with pytest.raises(UnsupportedFeature, match="memfd"):
            client.send(b"forced", memfd=True)
    finally:
        os.close(r)
        os.close(w)
    client.send(b"next")
    for want in (b"held", b"next"):
        with server.recv() as msg:
            assert msg.data == want and not msg.fds
    thread, got = accept_in_thread(listener)
    with pytest.raises(UnsupportedFeature, match="credentials=True"):
        Channel.connect(listener.address, ssl=tls_ca.client_context(), credentials=True)
    thread.join(30)
    for chan in got:
        if isinstance(chan, Channel):
            chan.close()


def test_a_client_without_a_certificate_is_refused(
    listener: afunix.Listener, tls_ca: TlsCa
) -> None:
    thread, got = accept_in_thread(listener)
    outcome: Any
    try:
        with Channel.connect(
            listener.address, ssl=tls_ca.client_context(with_cert=False), timeout=30
        ) as chan:
            chan.send(b"let me in")  # TLS 1.3: the client's handshake ends first ...
            outcome = chan.recv()  # ... it learns of the refusal on reading
    except (OSError, EOFError) as exc:
        outcome = exc
    thread.join(30)
    [refusal] = got
    assert isinstance(refusal, AfunixError) and refusal.errno == errno.EACCES
    assert "client certificate" in str(refusal)
    # the alert (EACCES), or the connection reset under it, or its end: never a reply
    assert isinstance(outcome, EOFError | OSError), outcome


def test_a_client_signed_by_another_ca_is_refused(listener: afunix.Listener, tls_ca: TlsCa) -> None:
    stranger = TlsCa()  # a CA the server does not trust
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls_ca.ca.configure_trust(ctx)
    stranger.client_cert.configure_cert(ctx)
    thread, got = accept_in_thread(listener)
    try:
        with Channel.connect(listener.address, ssl=ctx, timeout=30) as chan:
            chan.send(b"let me in")
            chan.recv()
    except (OSError, EOFError):
        pass
    thread.join(30)
    [refusal] = got
    assert isinstance(refusal, AfunixError) and refusal.errno == errno.EACCES


def test_a_client_that_does_not_trust_the_server_refuses_it(
    listener: afunix.Listener,
) -> None:
    thread, got = accept_in_thread(listener)
    with pytest.raises(AfunixError, match="not signed by a CA") as info:
        Channel.connect(listener.address, ssl=ssl.create_default_context(), timeout=30)
    assert info.value.errno == errno.EACCES
    thread.join(30)
    assert len(got) == 1 and isinstance(got[0], OSError)


def test_tls_needs_a_context_and_a_context_needs_tls(tls_ca: TlsCa) -> None:
    with pytest.raises(UnsupportedFeature, match="needs ssl="):
        Channel.listen("tls://127.0.0.1:0")
    with pytest.raises(AfunixError, match="write tls://"):
        Channel.listen("tcp://127.0.0.1:0", ssl=tls_ca.server_context())
    with pytest.raises(UnsupportedFeature, match="needs ssl="):
        Channel.connect("tls://127.0.0.1:1")
    with pytest.raises(UnsupportedFeature, match="SSLContext"):
        afunix.connect("tls://127.0.0.1:1")


def test_a_send_timeout_mid_message_closes_the_tls_channel(
    listener: afunix.Listener, tls_ca: TlsCa
) -> None:
    """The peer stops reading: the write of an 8 MiB message gives up after
    ``send_timeout`` with part of it encrypted and sent; the channel is closed (its
    framing is lost), never left to send the rest of that message later."""
    thread, got = accept_in_thread(listener)
    client = Channel.connect(
        listener.address, ssl=tls_ca.client_context(), timeout=30, send_timeout=0.5
    )
    thread.join(30)
    [server] = got
    with client, server:
        with pytest.raises(afunix.PeerTimeout, match="send_timeout"):
            client.send(os.urandom(8 << 20))
        assert client.closed


def test_one_sender_and_one_receiver_thread_at_once(tls_pair: tuple[Channel, Channel]) -> None:
    """Both ends send and receive at the same time, in two threads each: the TLS
    object is never used by two threads at once, no message is lost or torn."""
    client, server = tls_pair
    errors: list[BaseException] = []

    def pump(chan: Channel, tag: bytes) -> None:
        try:
            for i in range(SWAPS):
                chan.send(tag + b"%d" % i + b"." * (i % 3000))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def drain(chan: Channel, tag: bytes) -> None:
        try:
            for i in range(SWAPS):
                with chan.recv() as msg:
                    assert msg.data == tag + b"%d" % i + b"." * (i % 3000)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=pump, args=(client, b"c")),
        threading.Thread(target=pump, args=(server, b"s")),
        threading.Thread(target=drain, args=(server, b"c")),
        threading.Thread(target=drain, args=(client, b"s")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert not any(t.is_alive() for t in threads)


# ------------------------------------------------------------------- servers


def channel_echo(conn: Connection) -> None:
    """Thread and fork models: the client's certificate names, then an echo."""
    names = ",".join(conn.tls_peer.names if conn.tls_peer else ()).encode()
    with pytest.raises(UnsupportedFeature, match="tls_peer"):
        conn.credentials  # (the property is the test)
    with conn.channel() as chan:
        for msg in chan:
            with msg:
                chan.send(bytes(msg.data) + b"|" + names)


async def async_channel_echo(conn: AsyncConnection) -> None:
    names = ",".join(conn.tls_peer.names if conn.tls_peer else ()).encode()
    async with conn.channel() as chan:
        async for msg in chan:
            with msg:
                await chan.send(bytes(msg.data) + b"|" + names)


@pytest.mark.parametrize("model", ["thread", "fork", "asyncio"])
def test_server_serves_tls_channels_in_every_model(model: str, tls_ca: TlsCa) -> None:
    handler = async_channel_echo if model == "asyncio" else channel_echo
    policy = PeerPolicy(tls_names=[CLIENT])
    with afunix.Server(
        "tls://127.0.0.1:0", handler, model=model, ssl=tls_ca.server_context(), policy=policy
    ) as srv:
        assert srv.address.kind is afunix.AddressKind.TLS
        srv.start()
        for _ in range(2):
            with Channel.connect(srv.address, ssl=tls_ca.client_context(), timeout=30) as chan:
                for i in range(20):
                    chan.send(b"r%d" % i)
                    with chan.recv() as msg:
                        assert msg.data == b"r%d|%s" % (i, CLIENT.encode())


@pytest.mark.parametrize("model", ["thread", "fork"])
def test_a_policy_by_certificate_name_denies_other_names(
    model: str, tls_ca: TlsCa, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose certificate no rule allows is refused and counted in ``rejected``;
    in the fork model its child refuses it, and the parent counts it (exit status)."""
    caplog.set_level(logging.WARNING, logger="afunix.server")
    policy = PeerPolicy(tls_names=["billing.afunix.test"])
    with afunix.Server(
        "tls://127.0.0.1:0",
        channel_echo,
        model=model,
        ssl=tls_ca.server_context(),
        policy=policy,
    ) as srv:
        srv.start()
        with (
            Channel.connect(srv.address, ssl=tls_ca.client_context(), timeout=30) as chan,
            pytest.raises((EOFError, OSError)),
        ):
            chan.send(b"may I?")
            chan.recv()
        assert wait_until(lambda: srv.rejected == 1, 30)
        billing = tls_ca.ca.issue_cert("billing.afunix.test")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        tls_ca.ca.configure_trust(ctx)
        billing.configure_cert(ctx)
        with Channel.connect(srv.address, ssl=ctx, timeout=30) as chan:
            chan.send(b"billing")
            with chan.recv() as msg:
                assert msg.data == b"billing|billing.afunix.test"
        assert srv.rejected == 1 and "tls-handshake" not in srv.refused
    if model != "fork":  # (a child logs to its own copy of the capture)
        assert "no rule allows a TLS certificate with 'client.afunix.test'" in caplog.text


PLAIN_CLIENT = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as s:
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    while s.recv(100):
        pass
"""


def test_a_forked_childs_failed_handshake_is_counted_by_the_parent(tls_ca: TlsCa) -> None:
    """The fork model shakes hands in the child: a client speaking plain bytes (in a
    process of its own: a child forked from this one would hold its end open) is
    refused there, and the parent's ``refused``/``rejected`` count it."""
    with afunix.Server(
        "tls://127.0.0.1:0", channel_echo, model="fork", ssl=tls_ca.server_context()
    ) as srv:
        srv.start()
        port = str(srv.address.port)
        for _ in range(2):
            subprocess.run([sys.executable, "-c", PLAIN_CLIENT, port], timeout=60, check=True)
        assert wait_until(lambda: srv.refused.get("tls-handshake") == 2, 30)
        assert srv.rejected == 2
        with Channel.connect(srv.address, ssl=tls_ca.client_context(), timeout=30) as c:
            c.send(b"served")
            with c.recv() as msg:
                assert msg.data.startswith(b"served|")
        assert srv.refused.get("tls-handshake") == 2 and srv.rejected == 2


@pytest.mark.parametrize("model", ["thread", "asyncio"])
def test_handshakes_never_hold_up_the_accept_loop(model: str, tls_ca: TlsCa) -> None:
    """A client that connects and says nothing, and one that speaks plain bytes, do not
    delay a TLS client: the handshakes run in the connections' own threads or tasks
    (in the accept loop, the silent one would hold everyone up for the 60 s handshake
    timeout, past the TLS client's 30 s). Both are refused and counted under
    ``refused["tls-handshake"]`` (the silent one once it hangs up)."""
    handler = async_channel_echo if model == "asyncio" else channel_echo
    with afunix.Server(
        "tls://127.0.0.1:0",
        handler,
        model=model,
        ssl=tls_ca.server_context(),
        limits=afunix.Limits(idle_timeout=60.0),
    ) as srv:
        srv.start()
        where = ("127.0.0.1", srv.address.port)
        with socket.create_connection(where, timeout=30):  # the silent one
            with socket.create_connection(where, timeout=30) as plain:
                plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
                while plain.recv(100):  # perhaps an alert, then the end (within 30 s)
                    pass
            with Channel.connect(srv.address, ssl=tls_ca.client_context(), timeout=30) as c:
                c.send(b"served")
                with c.recv() as msg:
                    assert msg.data.startswith(b"served|")
        assert wait_until(lambda: srv.refused.get("tls-handshake") == 2, 30)
        assert srv.rejected == 2


def test_a_silent_client_is_dropped_after_the_handshake_timeout(tls_ca: TlsCa) -> None:
    limits = afunix.Limits(idle_timeout=0.5)  # the handshake timeout of a TLS server
    with afunix.Server(
        "tls://127.0.0.1:0",
        channel_echo,
        model="thread",
        ssl=tls_ca.server_context(),
        limits=limits,
    ) as srv:
        srv.start()
        with socket.create_connection(("127.0.0.1", srv.address.port), timeout=30) as silent:
            assert silent.recv(100) == b""  # the server hung up (a TimeoutError: 30 s)
        assert wait_until(lambda: srv.refused.get("tls-handshake") == 1, 30)


def test_a_uid_policy_on_a_tls_server_is_refused_at_once(tls_ca: TlsCa) -> None:
    with pytest.raises(UnsupportedFeature, match="tls_names"):
        afunix.Server(
            "tls://127.0.0.1:0",
            channel_echo,
            model="thread",
            ssl=tls_ca.server_context(),
            policy=PeerPolicy(uids=[0]),
        )


def test_tls_beyond_loopback_needs_client_certificates_or_allow_remote(tls_ca: TlsCa) -> None:
    open_ctx = tls_ca.server_context(require_client=False)
    with pytest.raises(AfunixError, match="does not require client certificates") as info:
        afunix.Server("tls://0.0.0.0:0", channel_echo, model="thread", ssl=open_ctx)
    assert info.value.errno == errno.EACCES
    with pytest.raises(AfunixError, match="does not require client certificates"):
        Channel.listen("tls://0.0.0.0:0", ssl=open_ctx)
    afunix.Server(
        "tls://0.0.0.0:0", channel_echo, model="thread", ssl=open_ctx, allow_remote=True
    ).close()
    with Channel.listen("tls://0.0.0.0:0", ssl=tls_ca.server_context()) as lst:
        assert lst.address.kind is afunix.AddressKind.TLS  # mutual TLS: no allow_remote


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_async_server_and_async_channel_over_tls(runtime: str, tls_ca: TlsCa) -> None:
    """``AsyncServer`` (its handshake in the loop) and ``AsyncChannel.connect``; a batch
    of small frames arrives in few TLS records, and each ``recv`` finds the next one
    although the socket will not become readable again for it."""

    async def main() -> None:
        server = AsyncServer(
            "tls://[::1]:0",
            async_channel_echo,
            ssl=tls_ca.server_context(),
            policy=PeerPolicy(tls_names=[CLIENT]),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_forever)
            ctx = tls_ca.client_context()
            async with await AsyncChannel.connect(
                server.address, ssl=ctx, timeout=30, server_hostname="localhost"
            ) as chan:
                assert chan.tls_peer is not None and "localhost" in chan.tls_peer.dns_names
                for i in range(BATCH):
                    await chan.send(b"b%d" % i, more=True)
                await chan.flush()
                for i in range(BATCH):
                    with await chan.recv() as msg:
                        assert msg.data == b"b%d|%s" % (i, CLIENT.encode())
            await server.aclose()

    before = open_fds()
    _run(runtime, main)
    assert open_fds() == before


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_a_channel_made_after_byte_reads_finds_what_tls_already_decrypted(
    runtime: str, tls_ca: TlsCa
) -> None:
    """The handler reads 4 bytes, then makes a channel: the frame that came in the same
    TLS record is decrypted already, and the socket will not signal it again. The
    channel must look there first instead of waiting for readiness (before the fix it
    waited forever: the client's idle_timeout below ended it)."""
    frame = ChannelProtocol(socket.SOCK_STREAM).send(b"after hello")
    assert isinstance(frame, bytes)

    async def handler(conn: AsyncConnection) -> None:
        assert await conn.recv(4) == b"HELO"
        async with conn.channel() as chan:
            with await chan.recv() as msg:
                await chan.send(b"got " + bytes(msg.data))

    async def main() -> None:
        server = AsyncServer("tls://127.0.0.1:0", handler, ssl=tls_ca.server_context())
        address = server.address

        def client() -> bytes:
            tls = connect_tls(address, tls_ca.client_context(), timeout=30)
            tls.sendall(b"HELO" + frame)  # one write: one TLS record
            with Channel(tls, idle_timeout=20) as chan, chan.recv() as msg:
                return bytes(msg.data)

        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_forever)
            assert await anyio.to_thread.run_sync(client) == b"got after hello"
            await server.aclose()

    _run(runtime, main)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_records_decrypted_ahead_are_received_without_waiting(runtime: str, tls_ca: TlsCa) -> None:
    """100 messages of 1 KB arrive in one burst before the channel reads: its first read
    takes all the TLS records from the socket but decrypts only what fits its first
    buffer (16 KiB). The rest is in the TLS object, and the socket will never be
    readable for it again: ``_io.receive_tls`` hands it to the protocol at once
    (before, the receiver waited for readiness forever after about 15 messages)."""
    count, size = 100, 1000
    flushed = threading.Event()  # the client wrote the whole burst (on loopback: it is here)

    async def handler(conn: AsyncConnection) -> None:
        with anyio.fail_after(30):
            while not flushed.is_set():
                await anyio.sleep(0.005)
        async with conn.channel() as chan:
            with anyio.fail_after(20):
                for i in range(count):
                    with await chan.recv() as msg:
                        assert bytes(msg.data[:5]) == b"%05d" % i
            await chan.send(b"all %d" % count)

    async def main() -> None:
        server = AsyncServer("tls://127.0.0.1:0", handler, ssl=tls_ca.server_context())
        address = server.address

        def client() -> bytes:
            with Channel.connect(address, ssl=tls_ca.client_context(), timeout=30) as chan:
                for i in range(count):
                    chan.send(b"%05d" % i + b"x" * size, more=True)
                chan.flush()
                flushed.set()
                with chan.recv() as msg:
                    return bytes(msg.data)

        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_forever)
            assert await anyio.to_thread.run_sync(client) == b"all %d" % count
            await server.aclose()

    _run(runtime, main)


def _run(runtime: str, main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(60):
            await main()

    anyio.run(bounded, backend=runtime)


# ------------------------------------------------------------------------ CLI


def test_cli_serve_and_connect_with_mutual_tls(tls_ca: TlsCa, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    tls_ca.ca.cert_pem.write_to_path(str(ca))
    srv = tmp_path / "server.pem"
    tls_ca.server_cert.private_key_and_cert_chain_pem.write_to_path(str(srv))
    cli = tmp_path / "client.pem"
    tls_ca.client_cert.private_key_and_cert_chain_pem.write_to_path(str(cli))
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    opts = ("--cert", str(srv), "--ca", str(ca), "--allow-tls-name", CLIENT, "--model", "thread")
    with serving(tmp_path, address, *opts):
        done = subprocess.run(
            afunix_cmd("connect", address, "--ca", str(ca), "--cert", str(cli), "--linger", "2"),
            input=b"hello over mutual TLS\n",
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"hello over mutual TLS\n"
        refused = subprocess.run(
            afunix_cmd("connect", address, "--ca", str(ca), "--linger", "2"),
            input=b"no certificate\n",
            capture_output=True,
            timeout=60,
        )
        assert refused.stdout == b""
        assert refused.returncode != 0, refused.stderr
    usage = subprocess.run(afunix_cmd("serve", address), capture_output=True, timeout=60)
    assert usage.returncode == 2 and b"--cert" in usage.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
