"""``ReceiveWait`` and ``timed_out``: the receive limits every shell waits by, as tables.

The clock is the caller's: each row gives the readings, so nothing here sleeps.
"""

from __future__ import annotations

import pytest

from afunix import PeerTimeout
from afunix._protocol.timeouts import ReceiveWait, check_timeouts, timed_out

# (idle, message, until, poll, [(receiving, now, limit, due)], then expired(receiving) ->)
ROWS = [
    # idle from the call's start; nothing began: the idle limit ran out
    (5.0, None, None, False, [(False, 100.0, 5.0, "idle"), (False, 103.0, 2.0, "idle")], "idle"),
    # a message began: its limit from the first wait that saw it, kept after
    (
        5.0,
        2.0,
        None,
        False,
        [(True, 101.0, 2.0, "message"), (True, 102.5, 0.5, "message")],
        "message",
    ),
    # the call's end comes first
    (5.0, 2.0, 101.0, False, [(False, 100.0, 1.0, "call")], "call"),
    (None, 2.0, 101.0, False, [(True, 100.5, 0.5, "call")], "call"),
    # nothing to wait by: no limit
    (None, None, None, False, [(False, 100.0, None, "none"), (True, 100.0, None, "none")], None),
    (None, 2.0, None, False, [(False, 100.0, None, "none")], None),
    # asyncio's shell cannot see a message begin: it looks again every message timeout
    (None, 2.0, None, True, [(False, 100.0, 2.0, "poll")], None),
    # past due: a wait of 0, never negative
    (1.0, None, None, False, [(False, 105.0, 0.0, "idle")], "idle"),
]


@pytest.mark.parametrize(("idle", "message", "until", "poll", "steps", "then"), ROWS)
def test_the_limit_of_each_wait_and_what_ran_out(
    idle: float | None,
    message: float | None,
    until: float | None,
    poll: bool,
    steps: list[tuple[bool, float, float | None, str]],
    then: str | None,
) -> None:
    wait = ReceiveWait(idle, message, 100.0, until, None if until is None else 1.0, poll=poll)
    for receiving, now, limit, due in steps:
        assert wait.limit(receiving, now) == limit
        assert wait.due == due
    error = wait.expired(steps[-1][0])
    assert (error.expired if error is not None else None) == then


def test_a_message_begun_while_the_idle_limit_ran_is_given_its_own_limit() -> None:
    wait = ReceiveWait(1.0, 3.0, 100.0)
    assert wait.limit(False, 100.0) == 1.0
    assert wait.expired(True) is None  # the idle wait ran out, but a message had begun
    assert wait.limit(True, 101.0) == 3.0
    assert wait.due == "message"


def test_the_message_deadline_goes_when_no_message_is_under_way() -> None:
    wait = ReceiveWait(None, 2.0, 100.0)
    assert wait.limit(True, 100.0) == 2.0
    assert wait.limit(True, 101.0) == 1.0
    assert wait.limit(False, 101.5) is None  # the message came whole
    assert wait.limit(True, 110.0) == 2.0  # the next one has its own


@pytest.mark.parametrize(
    ("due", "seconds", "begun", "words"),
    [
        ("idle", 5.0, False, "no message from the peer within idle_timeout=5 s"),
        ("message", 2.5, False, "did not finish it within message_timeout=2.5 s"),
        ("call", 1.0, False, "no whole message from the peer within recv(timeout=1) s"),
        ("call", 1.0, True, "a message had begun: close the channel"),
        ("send", 3.0, False, "did not read for send_timeout=3 s"),
    ],
)
def test_timed_out_says_which_limit_and_what_to_do(
    due: str, seconds: float, begun: bool, words: str
) -> None:
    error = timed_out(due, seconds, begun=begun)
    assert isinstance(error, PeerTimeout) and isinstance(error, TimeoutError)
    assert error.expired == due
    assert words in str(error)
    assert ("a message had begun" in str(error)) == begun


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("-inf")])
def test_check_timeouts_refuses_what_is_no_positive_number(bad: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        check_timeouts(None, 1.0, bad)


def test_a_message_done_gives_the_next_begun_one_its_own_limit() -> None:
    wait = ReceiveWait(None, 2.0, 100.0)
    assert wait.limit(True, 100.0) == 2.0  # A began
    wait.message_done(True, 101.5)  # A came whole; the same read began B
    assert wait.limit(True, 101.5) == 2.0  # B's own 2 s, not A's 0.5 left
    wait.message_done(False, 102.0)  # B whole, nothing after it
    assert wait.deadline is None
