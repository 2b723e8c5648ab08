"""``AsyncChannel`` and the event loop: how a channel waits for its socket.

A channel keeps its reader registered with the loop from the first wait on
(instead of an ``add_reader``/``remove_reader`` per wait), so these tests
pin down what must stay true around that registration:

* ``close()`` wakes waiting tasks with ``EBADF`` and leaves nothing behind
  in the loop's selector (a selector that kept a closed descriptor number
  would mistake the next socket given that number for this one);
* a channel nobody reads does not stay registered (readiness is
  level-triggered: it would fire at every turn of the loop);
* a cancelled ``recv`` leaves the channel usable;
* a channel used from one event loop after another works in each;
* no wake-up is lost when the peer answers at once, again and again;
* a channel dropped without ``close()`` does not leave its descriptor
  registered either.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import selectors
import threading
import warnings
from collections.abc import Coroutine
from typing import Any

import pytest

import afunix
from afunix import AsyncChannel, Channel


def watched(loop: asyncio.AbstractEventLoop, fd: int) -> int:
    """The events *loop*'s selector watches on *fd* (0: it does not know *fd*)."""
    # No public API looks without changing (remove_reader() would unregister).
    selector: selectors.BaseSelector = loop._selector  # type: ignore[attr-defined]
    key = selector.get_map().get(fd)
    return 0 if key is None else key.events


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def turns(n: int = 5) -> None:
    """Let the loop go round *n* times (each poll, each callback)."""
    for _ in range(n):
        await asyncio.sleep(0)


# ------------------------------------------------------------------ close


def test_close_wakes_a_waiting_receiver_and_unregisters() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair()
        with a:
            fd = b.fileno()
            task = asyncio.ensure_future(b.recv())
            await turns()
            assert watched(loop, fd) & selectors.EVENT_READ  # it is waiting
            b.close()
            with pytest.raises(OSError) as info:
                await task
            assert info.value.errno == errno.EBADF
            assert info.value.__context__ is None  # not "during handling of BlockingIOError"
            assert watched(loop, fd) == 0

    run(body())


def test_close_after_a_wait_leaves_nothing_in_the_selector() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair()
        fd = b.fileno()
        with a:
            for i in range(3):  # each recv waits: the peer sends only after a turn
                task = asyncio.ensure_future(b.recv())
                await turns()
                await a.send(b"%d" % i)
                assert (await task).data == b"%d" % i
            b.close()
            assert watched(loop, fd) == 0
            assert not loop.remove_reader(fd)
            assert not loop.remove_writer(fd)

    run(body())


def test_close_wakes_a_blocked_sender_and_unregisters() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair()
        with b:
            fd = a.fileno()
            receiving = asyncio.ensure_future(a.recv())  # reader registered as well
            sending = asyncio.ensure_future(a.send(b"x" * (4 << 20), memfd=False))
            await turns(20)
            assert not sending.done()  # more than the socket buffers hold
            assert watched(loop, fd) == selectors.EVENT_READ | selectors.EVENT_WRITE
            a.close()
            for task in (sending, receiving):
                with pytest.raises(OSError) as info:
                    await task
                assert info.value.errno == errno.EBADF
            assert watched(loop, fd) == 0

    run(body())


async def exchange(a: AsyncChannel, b: AsyncChannel, word: bytes) -> None:
    """*b* waits to receive (its reader registered with the running loop), then *a* sends."""
    task = asyncio.ensure_future(b.recv())
    await turns()
    await a.send(word)
    assert (await asyncio.wait_for(task, 5)).data == word


def test_close_after_the_loop_is_gone() -> None:
    a, b = AsyncChannel.pair()
    run(exchange(a, b, b"hi"))  # b's reader was registered with that loop, now closed
    b.close()
    a.close()


# ---------------------------------------------- waiting, and not waiting


def test_a_channel_nobody_reads_does_not_stay_registered() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair()
        with a, b:
            fd = b.fileno()
            task = asyncio.ensure_future(b.recv())
            await turns()
            await a.send(b"one")
            assert (await task).data == b"one"
            await a.send(b"two")  # nobody waits for it
            await turns()
            assert watched(loop, fd) == 0  # or the loop would wake at every turn
            assert (await b.recv()).data == b"two"

    run(body())


def test_a_cancelled_recv_leaves_the_channel_usable() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            for i in range(3):
                task = asyncio.ensure_future(b.recv())
                await turns()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await a.send(b"after %d" % i)
                await turns()
                assert (await b.recv()).data == b"after %d" % i
            # and a recv that waits after a cancelled one is woken
            task = asyncio.ensure_future(b.recv())
            await turns()
            await a.send(b"woken")
            assert (await asyncio.wait_for(task, 5)).data == b"woken"

    run(body())


def test_concurrent_receivers_each_get_a_message() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            tasks = [asyncio.ensure_future(b.recv()) for _ in range(3)]
            await turns()
            for i in range(3):
                await a.send(b"%d" % i)
                await turns()
            got = [bytes((await t).data) for t in tasks]
            assert sorted(got) == [b"0", b"1", b"2"]

    run(body())


def test_receivers_are_served_in_the_order_they_came() -> None:
    """recv()'s lock-free fast path never jumps a task already waiting: with two
    messages buffered at once, the waiting task gets the first, a newcomer the second."""

    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            first = asyncio.ensure_future(b.recv())
            await turns()  # first is waiting for data now
            await a.send(b"one", more=True)
            await a.send(b"two")  # both in one write: decoded together
            second = asyncio.ensure_future(b.recv())
            assert bytes((await first).data) == b"one"
            assert bytes((await second).data) == b"two"
            # And nobody waiting: buffered messages come straight from the fast path.
            await a.send(b"x", more=True)
            await a.send(b"y")
            assert bytes((await b.recv()).data) == b"x"
            assert not b._waiter.receivers
            assert bytes((await b.recv()).data) == b"y"

    run(body())


def test_a_writer_and_a_reader_waiting_together() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair()
        with a, b:
            big = os.urandom(1 << 20)
            receiving = asyncio.ensure_future(a.recv())
            sending = asyncio.ensure_future(a.send(big, memfd=False))
            await turns(10)
            assert not sending.done()
            assert (await b.recv()).data == big
            await sending
            await b.send(b"done")
            assert (await receiving).data == b"done"

    run(body())


# ------------------------------------------------------------- wake-ups


def test_no_wake_up_is_lost_with_a_peer_that_answers_at_once() -> None:
    a, b = afunix.pair()
    peer = Channel(b)

    def echo() -> None:  # a thread: its answers race with the loop's polls
        with peer:
            for msg in peer:
                peer.send(msg.data)

    thread = threading.Thread(target=echo)
    thread.start()

    async def body() -> None:
        async with AsyncChannel(a) as chan:
            for i in range(1500):
                await chan.send(b"%d" % i)
                assert (await asyncio.wait_for(chan.recv(), 5)).data == b"%d" % i

    try:
        run(body())
    finally:
        thread.join(10)
    assert not thread.is_alive()


def test_ping_pong_in_one_loop_with_descriptors() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair(max_fds_in_flight=1)

        async def echo() -> None:
            async for msg in b:
                with msg:
                    await b.send(msg.data, fds=msg.fds)

        with open("/dev/null", "rb") as f:
            async with a, b:
                server = asyncio.ensure_future(echo())
                for i in range(300):
                    await a.send(b"%d" % i, fds=[f])
                    with await asyncio.wait_for(a.recv(), 5) as msg:
                        assert msg.data == b"%d" % i
                        assert len(msg.fds) == 1
                a.close()
                await server

    run(body())


def test_descriptors_in_flight_are_counted_on_the_fast_path() -> None:
    async def body() -> None:
        a, b = AsyncChannel.pair(max_fds_in_flight=1)
        with a, b, open("/dev/null", "rb") as f:
            await a.send(b"one", fds=[f])
            await a.send(b"two", fds=[f])
            first = await b.recv()
            with pytest.raises(afunix.ProtocolError) as info:
                await b.recv()
            assert info.value.errno == errno.ETOOMANYREFS
            first.close()

    run(body())


# ---------------------------------------------------------------- loops


def test_used_from_one_loop_after_another() -> None:
    a, b = AsyncChannel.pair()
    with a, b:
        run(exchange(a, b, b"first"))  # that loop is closed afterwards
        run(exchange(a, b, b"second"))


def test_moving_between_open_loops_unregisters_from_the_earlier() -> None:
    a, b = AsyncChannel.pair()
    fd = b.fileno()
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        with a, b:
            first.run_until_complete(exchange(a, b, b"one"))
            assert watched(first, fd) & selectors.EVENT_READ  # kept for the next wait
            second.run_until_complete(exchange(a, b, b"two"))
            assert watched(first, fd) == 0
            first.run_until_complete(exchange(a, b, b"three"))
            assert watched(second, fd) == 0
        assert watched(first, fd) == 0
    finally:
        first.close()
        second.close()


# ----------------------------------------------------- dropped unclosed


def test_a_channel_dropped_without_close_leaves_no_registration() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair()
        fd = b.fileno()
        with a:
            task = asyncio.ensure_future(b.recv())
            await turns()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
            await turns()  # the loop's handle that woke us held the task (and b) until now
            assert watched(loop, fd) & selectors.EVENT_READ
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)  # "unclosed socket"
                del b
                gc.collect()
            assert watched(loop, fd) == 0

    run(body())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_every_socket_type_waits_and_closes_cleanly(kind: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = AsyncChannel.pair(kind)
        fd = b.fileno()
        with a:
            for i in range(3):
                task = asyncio.ensure_future(b.recv())
                await turns()
                await a.send(b"%d" % i)
                assert (await task).data == b"%d" % i
            b.close()
            assert watched(loop, fd) == 0

    run(body())
