"""A connection flood against the broker (issue 15, item 4).

48 attacker processes as uid 65534 connect in a loop for 4 s, each waiting for the
broker's verdict on every connection and holding what the broker keeps (up to 16
each); meanwhile root asks for a file on a fresh connection each time, with a
2 s timeout. The broker's per-uid limit (connections_per_peer, 8) is enforced by
its Server right after accept (one SO_PEERCRED, no thread, no audit line), so the
attacker's 9th and later connections cost almost nothing and root is answered.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from afunix import AsyncChannel, Channel
from afunix.broker import AsyncClient, Broker, Client, parse_policy
from afunix.broker.client import BrokerError
from tests.conftest import NOBODY

ATTACKERS = 48
HOLD = 16
FLOOD_SECONDS = 4.0
ROOT_TIMEOUT = 2.0


@pytest.mark.parametrize(
    ("wait_ms", "hold"),
    [(1000, HOLD), (0, 256)],
    ids=["attackers-wait-for-the-verdict", "attackers-fill-the-queue"],
)
def test_root_is_answered_during_a_connection_flood_from_another_uid(
    sockdir: Path, cbuild: Callable[[str], Path], wait_ms: int, hold: int
) -> None:
    """With *wait_ms* 0 the attackers do not wait for the verdict: they keep the
    broker's listen queue full. Root's new connections then wait for room in the
    kernel (afunix.connect with a timeout blocks with SO_SNDTIMEO, woken in turn
    with the attackers' connects) behind a queue of 64 (the broker's backlog), not
    behind thousands: every request is still answered within its 2 s timeout."""
    flood = cbuild("flood_connect")
    data = sockdir / "data"
    data.mkdir()
    (data / "f.txt").write_text("f")
    policy = parse_policy(
        "[limits]\nrequests_per_second = 100000\nburst = 100000\n"
        f'[[rule]]\nroot = "{data}"\nanyone = true\nallow = ["read"]\n'
    )
    audit = sockdir / "audit.jsonl"
    broker = Broker(sockdir / "b.sock", policy, audit=audit, mode=0o666).start()
    path = str(broker.address.describe())
    ok, failed = 0, []
    try:
        attack = subprocess.Popen(
            [
                *NOBODY,
                str(flood),
                path,
                str(ATTACKERS),
                str(FLOOD_SECONDS),
                str(hold),
                str(wait_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while broker.server.served < 8:  # the attacker holds its 8: the flood is on
            assert attack.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        slowest = 0.0
        while attack.poll() is None:
            started = time.monotonic()
            try:
                with Client(path, timeout=ROOT_TIMEOUT) as c:
                    os.close(c.open_fd(str(data / "f.txt")))
                ok += 1
                slowest = max(slowest, time.monotonic() - started)
            except (BrokerError, OSError) as exc:
                failed.append(repr(exc))
        out, _ = attack.communicate(timeout=30)
    finally:
        broker.stop()
    tried, refused, connect_failed = (int(x) for x in out.split())
    print(
        f"attacker connects tried {tried}, refused {refused}, connect failed "
        f"{connect_failed}; root requests ok {ok}, failed {len(failed)}, slowest "
        f"{slowest:.3f} s"
    )
    assert not failed, failed[:5]
    assert ok >= 5
    assert refused > 1000, (tried, refused)
    assert broker.server.refused["uid-limit"] >= refused  # at accept, by the Server
    # refused at accept: no audit line for them, one per root request instead
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events.count("connection-refused") == 0
    assert events.count("open") == ok


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_refused_at_accept_hears_why(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The broker refuses a connection past connections_per_peer right after accept,
    often before the client has sent its request; the client's send then fails
    (EPIPE), and it must still report the broker's EAGAIN "too many connections"
    rather than "the broker closed the connection". The client's connect is made to
    wait until the broker has refused it, so the send always comes second."""
    data = sockdir / "data"
    data.mkdir()
    (data / "f.txt").write_text("f")
    policy = parse_policy(
        f'[limits]\nconnections_per_peer = 1\n[[rule]]\nroot = "{data}"\nanyone = true\n'
        'allow = ["read"]\n'
    )
    broker = Broker(sockdir / "b.sock", policy, audit=None).start()
    path = str(broker.address.describe())
    real_connect = Channel.connect.__func__  # type: ignore[attr-defined]
    real_aconnect = AsyncChannel.connect.__func__  # type: ignore[attr-defined]

    def wait_for_the_refusal(before: int) -> None:
        deadline = time.monotonic() + 10
        while broker.server.refused.get("uid-limit", 0) == before:
            assert time.monotonic() < deadline
            time.sleep(0.005)

    def connect_then_wait(cls: type[Channel], *args: Any, **kwargs: Any) -> Channel:
        before = broker.server.refused.get("uid-limit", 0)
        chan: Channel = real_connect(cls, *args, **kwargs)
        wait_for_the_refusal(before)
        return chan

    async def aconnect_then_wait(cls: type[AsyncChannel], *args: Any, **kwargs: Any) -> Any:
        before = broker.server.refused.get("uid-limit", 0)
        chan = await real_aconnect(cls, *args, **kwargs)
        wait_for_the_refusal(before)  # (blocks the loop: the broker runs on its own threads)
        return chan

    try:
        with Client(path) as first:
            os.close(first.open_fd(str(data / "f.txt")))  # holds root's one connection
            monkeypatch.setattr(Channel, "connect", classmethod(connect_then_wait))
            monkeypatch.setattr(AsyncChannel, "connect", classmethod(aconnect_then_wait))
            with pytest.raises(BrokerError, match="too many connections") as info:
                if kind == "sync":
                    with Client(path) as second:
                        second.open_fd(str(data / "f.txt"))
                else:

                    async def ask() -> None:
                        async with AsyncClient(path) as second:
                            await second.open_fd(str(data / "f.txt"))

                    asyncio.run(ask())
            assert info.value.errno == errno.EAGAIN
    finally:
        broker.stop()
