"""``afunix bench``: Unix-domain IPC measured side by side with a C baseline.

The harness runs, in one invocation, a C program compiled at run time from
``baseline.c`` (one system call per message: the limit), plain standard
library code, :mod:`multiprocessing`, pyzmq ``ipc://``, asyncio streams and
afunix's own channels, over Unix stream/seqpacket/datagram sockets, TCP
loopback and pipes. See ``docs/benchmarks.md`` for the method and figures.

Use it from the shell (``afunix bench --quick``) or from Python::

    from afunix.bench import Options, run_bench, to_json
    run = run_bench(Options.quick(cases=("rtt",)))

What ``afunix bench`` itself uses is here too: the case and implementation
tables (:data:`CASES`, :data:`IMPLS`), the renderers and :func:`plot`
(matplotlib, imported when called).

``import afunix.bench`` is cheap: each name is imported from its module the
first time it is used (module ``__getattr__``), so neither the harness nor
its implementations are loaded until a benchmark is run or rendered.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # imported on first use: see __getattr__
    from ._harness import Cell as Cell
    from ._harness import Options as Options
    from ._harness import Run as Run
    from ._harness import run_bench as run_bench
    from ._plot import plot as plot
    from ._report import render_markdown as render_markdown
    from ._report import render_plain as render_plain
    from ._report import render_rich as render_rich
    from ._report import run_from_json as run_from_json
    from ._report import targets as targets
    from ._report import to_json as to_json
    from ._report import uds_vs_tcp as uds_vs_tcp
    from ._spec import CASES as CASES
    from ._spec import IMPLS as IMPLS

__all__ = [
    "CASES",
    "IMPLS",
    "Cell",
    "Options",
    "Run",
    "plot",
    "render_markdown",
    "render_plain",
    "render_rich",
    "run_bench",
    "run_from_json",
    "targets",
    "to_json",
    "uds_vs_tcp",
]

#: Each public name and the private module that defines it, imported on first use.
_LAZY: dict[str, str] = {
    "CASES": "_spec",
    "IMPLS": "_spec",
    "Cell": "_harness",
    "Options": "_harness",
    "Run": "_harness",
    "run_bench": "_harness",
    "plot": "_plot",
    "render_markdown": "_report",
    "render_plain": "_report",
    "render_rich": "_report",
    "run_from_json": "_report",
    "targets": "_report",
    "to_json": "_report",
    "uds_vs_tcp": "_report",
}


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (``import afunix.bench`` loads none)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'afunix.bench' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included before their first use."""
    return sorted(set(globals()) | set(__all__))
