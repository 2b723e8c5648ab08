"""``Channel`` and ``AsyncChannel`` over ``ssh://``, through the real ``sshd`` of the fixture.

The far server is ``afunix serve`` (a byte echo) in a short temporary
directory, so every frame a channel sends comes back to it. What is checked:
messages and ``more=True`` batches; descriptors and ``memfd=True`` refused with
``UnsupportedFeature`` naming the ``ssh://`` address, before anything is sent
(``ssh`` reads the forward with ``read()``: a descriptor sent would be lost
without a word), the next message arriving intact; payloads above the memfd
threshold inline (a memfd would be lost the same way); ``credentials=True``
refused, the ``ssh`` process ended.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from afunix import AsyncChannel, Channel, UnsupportedFeature

from ..conftest import serving
from ..remote_support import Sshd

BATCH = 100


@pytest.fixture
def echo(sockdir: Path) -> Iterator[Path]:
    """An ``afunix serve`` echo server at ``sockdir/echo.sock``."""
    path = sockdir / "echo.sock"
    with serving(sockdir, str(path)):
        yield path


def test_messages_batches_and_descriptors_refused(ssh_env: Sshd, echo: Path) -> None:
    url = ssh_env.url(echo)
    with Channel.connect(url, timeout=30) as chan:
        chan.send(b"over ssh")
        with chan.recv() as msg:
            assert msg.data == b"over ssh"
        for i in range(BATCH):
            chan.send(b"m%d" % i, more=True)
        r, w = os.pipe()
        try:
            with pytest.raises(UnsupportedFeature, match=f"over {url}") as info:
                chan.send(b"with a pipe", fds=[r])
            assert info.value.errno == errno.EOPNOTSUPP
            with pytest.raises(UnsupportedFeature, match="memfd=True"):
                chan.send(b"forced", memfd=True)
        finally:
            os.close(r)
            os.close(w)
        chan.send(b"next")  # the held batch, then this: nothing of the refused ones
        for i in range(BATCH):
            with chan.recv() as msg:
                assert msg.data == b"m%d" % i and not msg.fds
        with chan.recv() as msg:
            assert msg.data == b"next"


def test_payloads_above_the_memfd_threshold_go_inline(ssh_env: Sshd, echo: Path) -> None:
    data = os.urandom(1 << 20)
    with Channel.connect(ssh_env.url(echo), timeout=30, memfd_threshold=64 * 1024) as chan:
        sender = threading.Thread(target=chan.send, args=(data,))
        sender.start()  # the echo comes back while the rest still goes out
        try:
            with chan.recv() as msg:
                assert not msg.memfd and msg.data == data
        finally:
            sender.join(30)


def test_credentials_are_refused(ssh_env: Sshd, echo: Path) -> None:
    with pytest.raises(UnsupportedFeature, match="credentials=True") as info:
        Channel.connect(ssh_env.url(echo), timeout=30, credentials=True)
    assert info.value.errno == errno.EOPNOTSUPP


def test_async_channel_over_ssh(ssh_env: Sshd, echo: Path) -> None:
    url = ssh_env.url(echo)

    async def body() -> None:
        async with await AsyncChannel.connect(url, timeout=30) as chan:
            await chan.send(b"async over ssh", more=True)
            with pytest.raises(UnsupportedFeature, match=f"over {url}"):
                await chan.send(b"fd", fds=[0])
            await chan.send(b"then this")
            for want in (b"async over ssh", b"then this"):
                with await chan.recv() as msg:
                    assert msg.data == want

    asyncio.run(body())
