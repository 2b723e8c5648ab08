"""``Server`` and ``AsyncServer`` over ``tcp://`` (issue 18, second step), on real sockets.

Every model (thread, fork, asyncio; ``AsyncServer`` under asyncio and trio)
serves a channel handler over loopback TCP: messages both ways, the handler's
``conn.credentials`` raising ``UnsupportedFeature`` (a TCP peer has no kernel
credentials) and its ``conn.channel()`` refusing a descriptor before anything
is sent, the channel going on. A listener other hosts can reach is refused
(``EACCES``) unless ``allow_remote=True``, for both server classes and for
``afunix serve`` (``--allow-remote``); ``afunix connect tcp://`` talks to
``afunix serve tcp://``. No socket file logic runs for TCP (nothing to
remove, nothing left behind). The conftest fixture checks for leaked descriptors.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import afunix
from afunix import AfunixError, AsyncChannel, Channel, UnsupportedFeature
from afunix.server import AsyncConnection, AsyncServer, Connection

from ..conftest import afunix_cmd, open_fds, run_under, serving
from .test_channel_tcp import this_hosts_address

ROUNDS = 20


def _report(conn: Connection | AsyncConnection) -> bytes:
    """What the handler learns of its peer: its credentials are refused over TCP."""
    try:
        conn.credentials  # (the property is the test)
    except UnsupportedFeature as exc:
        assert exc.errno == errno.EOPNOTSUPP
        return b"no credentials"
    return b"credentials!"


def _fd_refused(send: Callable[..., object]) -> bytes:
    r, w = os.pipe()
    try:
        send(b"never sent", fds=[r])
    except UnsupportedFeature as exc:
        assert "over TCP" in str(exc)
        return b"fds refused"
    finally:
        os.close(r)
        os.close(w)
    return b"fds sent!"


def channel_echo(conn: Connection) -> None:
    """Thread and fork models: who the peer is, then echo messages over a channel."""
    who = _report(conn)
    with conn.channel() as chan:
        for msg in chan:
            with msg:
                refused = _fd_refused(chan.send)
                chan.send(b"|".join([bytes(msg.data), who, refused]))


async def async_channel_echo(conn: AsyncConnection) -> None:
    """``AsyncServer`` (asyncio or trio): the same as :func:`channel_echo`."""
    who = _report(conn)
    async with conn.channel() as chan:
        async for msg in chan:
            with msg:
                r, w = os.pipe()
                try:
                    await chan.send(b"never sent", fds=[r])
                    refused = b"fds sent!"
                except UnsupportedFeature:
                    refused = b"fds refused"
                finally:
                    os.close(r)
                    os.close(w)
                await chan.send(b"|".join([bytes(msg.data), who, refused]))


def _talk(chan: Channel, rounds: int = ROUNDS) -> None:
    for i in range(rounds):
        chan.send(b"m%d" % i)
        with chan.recv() as msg:
            assert msg.data == b"m%d|no credentials|fds refused" % i


@pytest.mark.parametrize("model", ["thread", "fork", "asyncio"])
def test_every_model_serves_channels_over_tcp(model: str) -> None:
    handler = async_channel_echo if model == "asyncio" else channel_echo
    with afunix.Server("tcp://127.0.0.1:0", handler, model=model) as srv:
        assert srv.address.kind is afunix.AddressKind.TCP
        assert srv.sock.family == socket.AF_INET
        assert getattr(srv.sock, "bound_path", None) is None  # no file to remove
        srv.start()
        for _ in range(2):  # two clients, one after the other
            with Channel.connect(srv.address, timeout=10) as chan:
                _talk(chan)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_async_server_serves_channels_over_tcp(runtime: str) -> None:
    async def main() -> None:
        server = AsyncServer("tcp://[::1]:0", async_channel_echo)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_forever)
            for _ in range(2):
                async with await AsyncChannel.connect(server.address, timeout=10) as chan:
                    for i in range(ROUNDS):
                        await chan.send(b"a%d" % i)
                        with await chan.recv() as msg:
                            assert msg.data == b"a%d|no credentials|fds refused" % i
            await server.aclose()

    before = open_fds()
    run_under(runtime, main)
    assert open_fds() == before


def _exposed_hosts() -> list[str]:
    return [this_hosts_address(), "0.0.0.0", "[::]"]


def _reach(host: str, port: int) -> str:
    """Where a client on this host reaches a server listening on *host*."""
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host) + f":{port}"


@pytest.mark.parametrize("host", _exposed_hosts())
@pytest.mark.parametrize("cls", ["Server", "AsyncServer"])
def test_a_server_other_hosts_can_reach_needs_allow_remote(host: str, cls: str) -> None:
    make: Callable[..., afunix.Server | AsyncServer]
    if cls == "Server":
        make = lambda addr, **kw: afunix.Server(addr, channel_echo, model="thread", **kw)  # noqa: E731
    else:
        make = lambda addr, **kw: AsyncServer(addr, async_channel_echo, **kw)  # noqa: E731
    with pytest.raises(AfunixError, match="allow_remote=True") as info:
        make(f"tcp://{host}:0")
    assert info.value.errno == errno.EACCES
    assert "not a loopback address" in str(info.value)
    srv = make(f"tcp://{host}:0", allow_remote=True)
    if isinstance(srv, AsyncServer):
        srv.close()  # bound, never served: its refusal is the point
        return
    with srv:
        srv.start()
        with Channel.connect("tcp://" + _reach(host, srv.address.port or 0), timeout=10) as chan:
            _talk(chan, 3)


def test_loopback_names_need_no_allow_remote() -> None:
    for host in ("127.0.0.1", "127.9.9.9", "[::1]", "localhost"):
        with afunix.Server(f"tcp://{host}:0", channel_echo, model="thread") as srv:
            srv.start()
            with Channel.connect(srv.address, timeout=10) as chan:
                _talk(chan, 2)


def test_cli_serve_and_connect_over_tcp(tmp_path: Path) -> None:
    """``afunix serve tcp://...`` refuses an exposed address (no ``--allow-remote``),
    serves loopback, and ``afunix connect tcp://...`` gets its echo."""
    refused = subprocess.run(
        afunix_cmd("serve", "tcp://0.0.0.0:0"), capture_output=True, timeout=60
    )
    assert refused.returncode != 0 and refused.returncode != 2  # not a usage error
    assert b"not a loopback address" in refused.stderr
    assert b"allow_remote" in refused.stderr or b"--allow-remote" in refused.stderr
    port = _free_port()
    with serving(tmp_path, f"tcp://0.0.0.0:{port}", "--allow-remote", "--model", "thread"):
        done = subprocess.run(
            afunix_cmd("connect", f"tcp://127.0.0.1:{port}", "--linger", "2"),
            input=b"hello over tcp\n",
            capture_output=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello over tcp\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
