"""``afunix bench``: measure Unix-domain IPC against a C baseline, TCP and friends."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..bench import (
    CASES,
    IMPLS,
    Options,
    render_markdown,
    render_plain,
    render_rich,
    run_bench,
    run_from_json,
    to_json,
)
from ._common import count_arg, progress_console, seconds_arg, strict_json


def size_arg(text: str) -> int:
    """argparse type: ``4096``, ``64K``, ``1M`` (binary multiples)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if t[-1:] in units else t) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 4096, 64K or 1M, not {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("size must be at least 1 byte")
    return value


def _names(known: dict[str, Any], what: str) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
            )
        return names

    return parse


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="benchmark Unix-domain IPC against a C baseline, TCP, pipes, zmq, asyncio",
        description=(
            "Measure round-trip latency, message rate, bulk throughput, descriptor passing, "
            "large payloads (socket copy vs sealed memfd) and connection setup, for a C "
            "baseline compiled now (one syscall per message), plain stdlib Python, "
            "multiprocessing, pyzmq ipc://, asyncio streams and afunix, over Unix "
            "stream/seqpacket/datagram sockets, TCP loopback and pipes. Rows of one case "
            "are interleaved round by round; the table shows medians, ranges and p99."
        ),
        epilog=(
            f"cases: {', '.join(CASES)}. implementations: {', '.join(IMPLS)}. "
            "The full run takes several minutes; --quick well under one."
        ),
    )
    p.add_argument("--quick", action="store_true", help="short rounds and smaller large payloads")
    p.add_argument(
        "--rounds", type=count_arg(), metavar="N", help="rounds per row (quick 3, full 5)"
    )
    p.add_argument(
        "--seconds",
        type=seconds_arg(),
        metavar="S",
        help="target length of one measurement (quick 0.03, full 0.25)",
    )
    p.add_argument("--cases", type=_names(CASES, "case"), metavar="LIST", help="comma-separated")
    p.add_argument("--impls", type=_names(IMPLS, "implementation"), metavar="LIST")
    p.add_argument(
        "--max-size",
        type=size_arg,
        metavar="SIZE",
        help="cap every message size at SIZE (e.g. 64K), for a fast smoke run",
    )
    p.add_argument(
        "--pin",
        choices=["auto", "none", "same", "split"],
        default="auto",
        help="CPU placement of the two ends: auto (default: round trips and connection "
        "setup on CPU 0, throughput one end per CPU), none (the scheduler decides), same "
        "(both on CPU 0), split (CPU 0 and 1)",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw a chart (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown to FILE")
    p.add_argument(
        "--from-json",
        metavar="FILE",
        help="measure nothing: show (and --plot, --markdown) a run saved with --json",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"pin": args.pin}
    for name in ("rounds", "seconds", "cases", "impls", "max_size"):
        value = getattr(args, name)
        if value is not None:
            extra[name] = value
    options = Options.quick(**extra) if args.quick else Options.full(**extra)
    if args.plot and not args.from_json:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(
                "--plot needs matplotlib: pip install 'afunix[plot]' (nothing was run)"
            ) from None
    saved = None
    if args.from_json:
        with open(args.from_json) as f:
            saved = run_from_json(json.load(f))
    try:
        from rich.console import Console
    except ImportError:  # the cli extra is not installed: plain text
        run = saved or run_bench(options, None if args.no_progress else _plain_progress())
        print(render_plain(run))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # a file or pipe: don't wrap the tables
        run = saved or _run_with_rich(options, show=not args.no_progress)
        render_rich(run, console)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(run))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.json and saved is None:
        with open(args.json, "w") as f:
            json.dump(strict_json(to_json(run)), f, indent=1, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from ..bench import plot

        plot(run, args.plot)
        print(f"wrote {args.plot} ({os.path.getsize(args.plot) // 1024} KiB)", file=sys.stderr)
    failed = [c for c in run.cells if c.error]
    return 1 if failed and len(failed) == len(run.cells) else 0


def _plain_progress() -> Any:
    last = [""]

    def progress(label: str, done: int, total: int) -> None:
        head = label.split(":", maxsplit=1)[0]
        if head != last[0] and not label.startswith("calibrat"):
            last[0] = head
            print(f"[{done}/{total}] {head}", file=sys.stderr, flush=True)

    return progress


def _run_with_rich(options: Options, *, show: bool) -> Any:
    """Run the benchmark; a progress bar on standard error only when it is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = progress_console() if show else None
    if console is None:
        return run_bench(options)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        refresh_per_second=4,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        return run_bench(options, progress)
