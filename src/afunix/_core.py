"""Which core runs: the compiled ``afunix._ccore`` or the pure-Python reference.

Chosen once, at import: ``CORE`` is ``"compiled"`` when ``afunix._ccore`` imports and
``AFUNIX_PURE_PYTHON`` is not ``1``, else ``"pure-python"``; ``ccore`` is the module or
``None``; ``WHY`` says in one line why the pure core runs (empty when compiled).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ccore: ModuleType | None = None
WHY = ""
if os.environ.get("AFUNIX_PURE_PYTHON") == "1":
    WHY = "AFUNIX_PURE_PYTHON=1"
else:
    try:
        ccore = importlib.import_module("afunix._ccore")
    except ImportError as exc:
        WHY = f"not built: {exc}"
CORE = "pure-python" if ccore is None else "compiled"
