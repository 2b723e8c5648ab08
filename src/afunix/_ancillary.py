"""Old name of :mod:`afunix._cmsg`, the control-message codec: a re-export only.

Kept for the modules that still import it (``afunix/__init__.py``,
``broker/protocol.py``, ``cli/_show_fds.py``, ``cli/tour_fds.py``); they move to
:mod:`afunix._cmsg` or the public face (design guide, Phase 2 step 3), and
this module goes with the last of them. Add nothing here.
"""

from __future__ import annotations

from ._cmsg import ControlError as ControlError
from ._cmsg import ControlTruncated as ControlTruncated
from ._cmsg import UnexpectedControl as UnexpectedControl
from ._cmsg import close_fds as close_fds

__all__ = ["ControlError", "ControlTruncated", "UnexpectedControl", "close_fds"]
