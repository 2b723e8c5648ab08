"""What leaves a channel: :class:`Write` (one ``sendmsg``'s worth), and the channel's
:class:`State` (sans-IO).

:class:`~afunix._protocol.machine.ChannelProtocol` makes the writes; the shells
hand them to :func:`afunix._io.write_some` and report back. Kept apart from the
state machine so that each module stays one reading's length.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from .._cmsg import Triple, rights

__all__ = ["BROKEN", "CLOSED_STATE", "OPEN", "State", "Write"]


class State(enum.Enum):
    """Where a channel is: OPEN; BROKEN (a stream lost its framing: close it); CLOSED."""

    OPEN = "open"
    BROKEN = "broken"
    CLOSED = "closed"


OPEN, BROKEN, CLOSED_STATE = State.OPEN, State.BROKEN, State.CLOSED


class Write:
    """One message, or a batch of held ones, on its way out by ``sendmsg``.

    The descriptors (:attr:`ancdata`) ride on the first byte: once any byte
    went, they are never attached again. :attr:`refs` are the caller's objects
    behind :attr:`fds` (files, sockets), kept alive until
    :meth:`ChannelProtocol.write_done`; :attr:`owned` are descriptors the
    protocol made (duplicates of held messages' descriptors, a memfd), closed
    then.
    """

    __slots__ = (
        "ancdata",
        "buffers",
        "fds",
        "inline_default",
        "owned",
        "payload",
        "refs",
        "sent",
        "to",
        "total",
    )

    def __init__(
        self,
        buffers: list[Any],
        fds: list[int] | tuple[()] = (),
        refs: Sequence[object] = (),
        *,
        to: tuple[Any, ...] = (),
        owned: list[int] | tuple[()] = (),
        sent: int = 0,
    ) -> None:
        #: What the next ``sendmsg`` writes (bytes, memoryviews), trimmed as bytes go.
        self.buffers = buffers
        #: The descriptor numbers this write carries (a memfd resend reuses them).
        self.fds = fds
        self.ancdata: list[Triple] = [rights(fds)] if fds else []
        self.refs = refs
        #: ``(address,)`` on an unconnected datagram channel, else ``()``.
        self.to = to
        self.owned = owned
        #: A packet sent inline only because it is below the memfd threshold: an
        #: ``EMSGSIZE`` makes it a memfd (:meth:`ChannelProtocol.write_failed`).
        self.inline_default = False
        self.payload: memoryview | None = None
        self.sent = total = sent
        for each in buffers:
            total += len(each)
        self.total = total

    def advance(self, n: int) -> bool:
        """*n* more bytes went; ``True`` when all did."""
        self.sent += n
        if n:
            self.ancdata = []  # the descriptors went with the first byte
        if self.sent >= self.total:
            return True
        buffers = self.buffers
        while n:
            first = buffers[0]
            if n >= len(first):
                n -= len(first)
                del buffers[0]
            else:
                buffers[0] = memoryview(first)[n:]
                n = 0
        return False
