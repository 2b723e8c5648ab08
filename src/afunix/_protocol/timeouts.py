"""A channel's receive and send timeouts, decided once for every shell (sans-IO).

A channel has three limits: ``idle_timeout`` (for a message to begin),
``message_timeout`` (for the rest of one, once begun) and ``send_timeout``; a
``recv(timeout=)`` call adds its own. How long a shell may wait right now, and
which limit ran out when the wait gave up, is the same question whether the
kernel waits (:class:`afunix.Channel`, through ``SO_RCVTIMEO``), asyncio does
(:class:`afunix.AsyncChannel`) or trio does: :class:`ReceiveWait` answers it from
the clock readings the shell passes in, and :func:`timed_out` words the
:class:`~afunix.PeerTimeout` for each. No clock, socket or loop here.
"""

from __future__ import annotations

from typing import Literal

from .._errors import PeerTimeout

__all__ = ["ReceiveWait", "check_timeouts", "timed_out"]

Due = Literal["idle", "message", "call", "poll", "none"]


def check_timeouts(*timeouts: float | None) -> None:
    """Refuse a timeout that is not ``None`` or a positive number of seconds."""
    for each in timeouts:
        if each is not None and not each > 0:
            raise ValueError(f"a timeout is None or a positive number of seconds, not {each!r}")


def timed_out(due: str, seconds: float | None, *, begun: bool = False) -> PeerTimeout:
    """The :class:`~afunix.PeerTimeout` for the limit *due* (``"idle"``, ``"message"``,
    ``"call"`` or ``"send"``) of *seconds*; *begun*: a message had begun (a call's)."""
    if due == "send":
        return PeerTimeout(
            f"the peer did not read for send_timeout={seconds:g} s: no room in the socket "
            "to write to (a stream message cut short closed the channel)",
            "send",
        )
    if due == "call":
        then = "; a message had begun: close the channel" if begun else ""
        return PeerTimeout(
            f"no whole message from the peer within recv(timeout={seconds:g}) s{then}", "call"
        )
    if due == "message":
        return PeerTimeout(
            f"the peer began a message and did not finish it within "
            f"message_timeout={seconds:g} s; close the channel",
            "message",
        )
    return PeerTimeout(
        f"no message from the peer within idle_timeout={seconds:g} s "
        "(the channel is still open: receive again or close it)",
        "idle",
    )


class ReceiveWait:
    """How long one receive may wait, and which limit ran out: one per timed ``recv``.

    The idle limit counts from *start* (the call), the message limit from the
    first :meth:`limit` that sees a message begun (*receiving*), and the call's
    *until* (a ``time.monotonic()`` reading, or ``None``) bounds both. A shell
    asks :meth:`limit` before each wait and, when the wait ran out, raises what
    :meth:`expired` says, or looks again when it says ``None``: a message began
    meanwhile, or :attr:`due` is ``"poll"`` (no limit applied yet; a shell that
    cannot see a message begin, such as asyncio's, is made with *poll* and waits
    at most the message timeout between looks). The message deadline outlives a
    call (a blocking channel keeps one of these) until a wait sees no message
    under way.
    """

    __slots__ = ("deadline", "due", "idle", "message", "poll", "start", "timeout", "until")

    def __init__(
        self,
        idle: float | None,
        message: float | None,
        start: float,
        until: float | None = None,
        timeout: float | None = None,
        *,
        poll: bool = False,
    ) -> None:
        self.idle, self.message, self.start = idle, message, start
        #: Whether to look again every message timeout while no limit applies.
        self.poll = poll
        #: The call's end (``start + timeout``), and its *timeout* for the message.
        self.until, self.timeout = until, timeout
        #: When the message under way must be whole (set once one has begun).
        self.deadline: float | None = None
        #: Which limit the last :meth:`limit` stands for (``"none"``: it gave none).
        self.due: Due = "none"

    def limit(self, receiving: bool, now: float) -> float | None:
        """Seconds the next wait may last (``None``: no limit); sets :attr:`due`."""
        want: float | None
        if receiving and self.message is not None:
            if self.deadline is None:
                self.deadline = now + self.message
            want, self.due = self.deadline - now, "message"
        else:
            self.deadline = None
            if not receiving and self.idle is not None:
                want, self.due = self.start + self.idle - now, "idle"
            elif not receiving and self.message is not None and self.poll:
                want, self.due = self.message, "poll"
            else:
                want, self.due = None, "none"
        if self.until is not None and (want is None or self.until - now < want):
            want, self.due = self.until - now, "call"
        return None if want is None else max(want, 0.0)

    def message_done(self, receiving: bool, now: float) -> None:
        """A message came whole; if the next one has begun (the same read brought its
        first bytes), its own limit runs from *now*, not the finished one's."""
        self.deadline = now + self.message if receiving and self.message is not None else None

    def expired(self, receiving: bool) -> PeerTimeout | None:
        """The error for a wait that ran out while :attr:`due` applied; ``None``: look
        again (a poll, or a message began while the idle limit ran: the message
        limit applies now)."""
        if self.due == "call":
            return timed_out("call", self.timeout, begun=receiving)
        if self.due == "message":
            return timed_out("message", self.message)
        if self.due == "idle" and not receiving:
            return timed_out("idle", self.idle)
        return None
