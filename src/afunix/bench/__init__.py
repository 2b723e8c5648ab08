"""``afunix bench``: Unix-domain IPC measured side by side with a C baseline.

The harness runs, in one invocation, a C program compiled at run time from
``baseline.c`` (one system call per message: the limit), plain standard
library code, :mod:`multiprocessing`, pyzmq ``ipc://``, asyncio streams and
afunix's own channels, over Unix stream/seqpacket/datagram sockets, TCP
loopback and pipes. See ``docs/benchmarks.md`` for the method and figures.

Use it from the shell (``afunix bench --quick``) or from Python::

    from afunix.bench import Options, run_bench, to_json
    run = run_bench(Options.quick(cases=("rtt",)))
"""

from ._harness import Cell as Cell
from ._harness import Options as Options
from ._harness import Run as Run
from ._harness import run_bench as run_bench
from ._report import render_plain as render_plain
from ._report import targets as targets
from ._report import to_json as to_json
from ._report import uds_vs_tcp as uds_vs_tcp

__all__ = [
    "Cell",
    "Options",
    "Run",
    "render_plain",
    "run_bench",
    "targets",
    "to_json",
    "uds_vs_tcp",
]
