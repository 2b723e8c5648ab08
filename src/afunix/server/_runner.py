"""What every runner is given: :class:`Runner`, the base of the four models' runners.

A runner serves one listener until a stop is requested: the thread and fork
runners (:mod:`._threads`) with a blocking accept loop, the asyncio runner
(:mod:`._async`) and the trio runner (:mod:`._trio`) in the caller's event
loop. Each gets the same parts from the server that builds it; this class
holds them, and a runner makes its own state in :meth:`Runner._setup`.
:class:`LoopRunner` is what the asyncio and trio runners share: one
connection's or datagram's task, the same under both event loops.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from .._address import Address
from .._creds import PeerCredentials
from .._limits import Limits
from ._admission import Admission
from ._connection import AsyncConnection, Datagram, Handler, log_handler_failure
from ._listener import ListeningSocket

__all__ = ["LoopRunner", "Runner"]

log = logging.getLogger("afunix.server")


class Runner:
    """The listener, admission, handler, limits, ``max_clients`` and ``shutdown_timeout``."""

    def __init__(
        self,
        listener: ListeningSocket,
        admission: Admission,
        handler: Handler,
        limits: Limits,
        *,
        max_clients: int | None,
        shutdown_timeout: float,
    ) -> None:
        self.listener = listener
        self.admission = admission
        self.handler = handler
        self.limits = limits
        self.max_clients = max_clients
        self.shutdown_timeout = shutdown_timeout
        self._setup()

    def _setup(self) -> None:
        """The runner's own state, made when it is constructed (override it)."""


class LoopRunner(Runner):
    """The tasks the asyncio and trio runners both run, for one client each.

    A runner gives ``_limit`` (its ``max_clients`` semaphore, or ``None``) and
    :meth:`_send_reply`, the event loop's way to send a datagram reply.
    """

    _limit: Any = None

    def _release(self) -> None:
        """A client's slot is free again (``max_clients``)."""
        if self._limit is not None:
            self._limit.release()

    async def _connection(
        self, conn: socket.socket, peer: Address, creds: PeerCredentials | None, uid: int | None
    ) -> None:
        """Serve one admitted client: the TLS handshake first over ``tls://``, then the
        handler; whatever happens, its socket, uid slot and client slot are freed."""
        try:
            connection = AsyncConnection(conn, peer, creds, self.limits)
        except BaseException:
            conn.close()
            self.admission.uid_release(uid)
            self._release()
            raise
        try:
            if self.admission.tls is not None:  # tls://: handshake and admission here
                secured = await self.admission.secure_async(conn, peer)
                if secured is None:
                    return
                connection = AsyncConnection(*secured, None, self.limits)
            await self.handler(connection)
        except Exception as exc:  # (a cancellation is no Exception: it goes on up)
            log_handler_failure(exc, connection.describe())
        finally:
            connection.close()
            self.admission.uid_release(uid)
            self._release()

    async def _datagram(self, dgram: Datagram) -> None:
        """Hand one admitted datagram to the handler, and send its reply, if any."""
        sender = dgram.sender
        try:
            reply = await self.handler(dgram)
            if reply is not None:
                if sender.kind.value == "unnamed":
                    log.warning("cannot reply to a datagram from an unbound socket")
                else:
                    await self._send_reply(reply, sender)
        except Exception:
            log.exception("datagram handler raised for sender %s", sender.describe())
        finally:
            self._release()

    async def _send_reply(self, reply: bytes, sender: Address) -> None:
        raise NotImplementedError
