"""afunix's low-level face: the calls beneath channels and servers.

What most programs need is in :mod:`afunix`; this module holds what programs
that manage descriptors or talk to a service manager themselves use (the
broker among them). It grows as the design guide's "public faces" step moves
names here; each is re-exported from the module that implements it.
"""

from __future__ import annotations

from ._cmsg import close_fds as close_fds
from ._notify import notify as notify

__all__ = ["close_fds", "notify"]
