"""Build afunix's optional compiled core, ``afunix._ccore``; the metadata is in pyproject.toml.

Where the core cannot be built (no C compiler, no ``Python.h``), the install goes
on with the pure-Python core and says so in one line; ``AFUNIX_REQUIRE_CCORE=1``
turns that into an error. See "The compiled core" in docs/architecture.md.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

CORE = Extension(
    "afunix._ccore",
    sources=["src/afunix/_ccore.c"],
    define_macros=[("Py_LIMITED_API", "0x030B0000")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
    py_limited_api=True,
    # Optional: setuptools goes on without it (also in editable installs, which then
    # copy nothing back into src/).
    optional=os.environ.get("AFUNIX_REQUIRE_CCORE") != "1",
)


class SayWhyBuildExt(build_ext):
    """build_ext that says in one line why an optional extension was not built."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError) as exc:
            if ext.optional:
                # A UserWarning, not a print: recent pip shows a build backend's
                # warnings (26.3 does; 23.2 does not) and hides its output unless -v.
                warnings.warn(
                    f"afunix: compiled core not built ({self._why(exc)}); installed the "
                    "pure-Python core. To build it: install a C compiler and the Python "
                    "headers (gcc, python3-dev) and reinstall.",
                    stacklevel=1,
                )
            raise  # setuptools skips an optional extension that failed

    def _why(self, exc: BaseException) -> str:
        """The likely cause in a few words (the compiler's own output is in ``pip -v``)."""
        headers = sysconfig.get_path("include")
        compiler = getattr(self.compiler, "compiler_so", None) or [os.environ.get("CC", "cc")]
        if shutil.which(compiler[0]) is None:
            return f"no C compiler: {compiler[0]} not found"
        if not os.path.exists(os.path.join(headers, "Python.h")):
            return f"no Python headers: {headers}/Python.h missing"
        if isinstance(exc, CCompilerError):
            return f"{compiler[0]} failed on src/afunix/_ccore.c; pip install -v shows why"
        return " ".join(str(exc).split()) or type(exc).__name__


setup(
    ext_modules=[CORE],
    cmdclass={"build_ext": SayWhyBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
