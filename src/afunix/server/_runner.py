"""What every runner is given: :class:`Runner`, the base of the four models' runners.

A runner serves one listener until a stop is requested: the thread and fork
runners (:mod:`._threads`) with a blocking accept loop, the asyncio runner
(:mod:`._async`) and the trio runner (:mod:`._trio`) in the caller's event
loop. Each gets the same parts from the server that builds it; this class
holds them, and a runner makes its own state in :meth:`Runner._setup`.
"""

from __future__ import annotations

from .._limits import Limits
from ._admission import Admission
from ._connection import Handler
from ._listener import ListeningSocket

__all__ = ["Runner"]


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
