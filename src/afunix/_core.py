"""Which channel core runs: the compiled one (:mod:`afunix._ccore`) or the pure-Python one.

Chosen once, at import. The compiled core is a C extension built by ``pip install``
where a C compiler and the Python headers exist (``docs/architecture.md``, "The
compiled core"); it makes the receive of one simple frame, the decoding of a run of
plain frames and the send of one small frame, and hands anything else to the
pure-Python code, which stays the reference: its twins are
:func:`afunix._io.recv_frame`, :func:`afunix._io.send_frame` and
:func:`afunix._protocol.message.scan_plain`, and tests run both on the same input.

``AFUNIX_PURE_PYTHON=1`` in the environment forces the pure-Python core.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

__all__ = ["CORE", "WHY", "MessageBase", "PureMessageBase", "ccore"]


class PureMessageBase:
    """The five slots of :class:`afunix.Message` (the compiled core has its own, in C)."""

    __slots__ = ("_fds", "_payload", "address", "credentials", "data")

    _fds: list[int]
    _payload: Any
    address: Any
    credentials: Any
    data: bytes | memoryview


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("AFUNIX_PURE_PYTHON", "") == "1":
        return None, "AFUNIX_PURE_PYTHON=1"
    try:  # (the C extension is no module of the layering: imported by name)
        return importlib.import_module("afunix._ccore"), ""
    except ImportError as exc:
        return None, f"not built: {exc}"


ccore, WHY = _load()
#: ``"compiled"`` or ``"pure-python"``: what ``afunix --version`` prints.
CORE: Literal["compiled", "pure-python"] = "compiled" if ccore is not None else "pure-python"

if TYPE_CHECKING:
    MessageBase = PureMessageBase
else:
    MessageBase = ccore.MessageBase if ccore is not None else PureMessageBase
