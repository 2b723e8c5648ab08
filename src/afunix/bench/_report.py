"""Turn a :class:`~._harness.Run` into tables, ratios, targets and JSON.

Ratios against C ("x C") are ratios of the figures in the case's unit: for
latency a ratio of times (1.10 means 10% slower than C), for everything else
a ratio of rates (0.95 means 5% less throughput than C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._harness import Cell, Run
from ._spec import (
    CASES,
    IMPLS,
    TRANSPORT_SHORT,
    TRANSPORTS,
    MiB,
    reference_transport,
    size_label,
)

SCHEMA = "afunix-bench/1"
BOOK_CLAIM = "about twice as fast as TCP on the same host (UNP 15.1)"


def _scale(value: float, unit: str) -> tuple[float, str]:
    if unit == "us":
        return (1.0, "us") if value < 1000 else (1000.0, "ms")
    suffix = "B/s" if unit == "B/s" else "/s"
    for prefix, factor in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= factor:
            return factor, f"{prefix}{suffix}"
    return 1.0, suffix


def fmt(value: float | None, unit: str) -> str:
    """A figure with a readable prefix: ``12.3 us``, ``2.41 M/s``, ``9.62 GB/s``."""
    if value is None:
        return "-"
    factor, suffix = _scale(value, unit)
    return f"{value / factor:.3g} {suffix}"


def fmt_range(low: float | None, high: float | None, unit: str) -> str:
    """``8.1-9.7 us``: both ends in the unit of the higher one."""
    if low is None or high is None:
        return "-"
    factor, suffix = _scale(high, unit)
    return f"{low / factor:.3g}-{high / factor:.3g} {suffix}"


def row_label(cell: Cell) -> str:
    return IMPLS[cell.impl].label


def transport_label(transport: str, *, short: bool = False) -> str:
    if short:
        return TRANSPORT_SHORT.get(transport, transport)
    return TRANSPORTS.get(transport, transport)


def reference(run: Run, cell: Cell) -> Cell | None:
    """The C row to compare ``cell`` with: same transport if C has it, else the reference."""
    for transport in (cell.transport, reference_transport(cell.case)):
        ref = run.find(cell.case, cell.size, "c", transport)
        if ref is not None and ref.median:
            return ref
    return None


def ratio(a: Cell | None, b: Cell | None) -> float | None:
    if a is None or b is None or not a.median or not b.median:
        return None
    return a.median / b.median


def vs_c(run: Run, cell: Cell) -> float | None:
    return ratio(cell, reference(run, cell))


@dataclass
class Check:
    """One target of the issue, as measured in this run."""

    target: str
    measured: float | None
    goal: float
    at_least: bool  # True: measured >= goal; False: measured <= goal
    detail: str

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.goal if self.at_least else self.measured <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "measured": self.measured,
            "goal": self.goal,
            "at_least": self.at_least,
            "met": self.met,
            "detail": self.detail,
        }


def uds_vs_tcp(run: Run) -> list[dict[str, Any]]:
    """How much faster Unix stream sockets are than TCP loopback, per implementation."""
    rows = []
    for case, size in (("rtt", 64), ("rate", 64), ("bulk", 64 * 1024), ("bulk", MiB)):
        for impl in ("c", "stdlib", "asyncio"):
            unix = run.find(case, size, impl, "unix")
            tcp = run.find(case, size, impl, "tcp")
            r = ratio(tcp, unix) if CASES[case].lower_is_better else ratio(unix, tcp)
            if r is not None:
                rows.append(
                    {
                        "case": case,
                        "size": size,
                        "impl": impl,
                        "unix": unix.median if unix else None,
                        "tcp": tcp.median if tcp else None,
                        "uds_speedup": r,
                    }
                )
    return rows


def targets(run: Run) -> list[Check]:
    """The issue's speed targets for the afunix rows (empty if none ran)."""
    if not any(IMPLS[c.impl].is_afunix for c in run.cells):
        return []
    checks = []

    def c_row(case: str, size: int, transport: str = "unix") -> Cell | None:
        return run.find(case, size, "c", transport)

    af = run.find("rtt", 64, "afunix", "unix")
    checks.append(
        Check(
            "round-trip latency 64 B: afunix <= 1.1x C",
            ratio(af, c_row("rtt", 64)),
            1.1,
            False,
            "time ratio, afunix Channel vs C on a unix stream socketpair",
        )
    )
    for size in (64 * 1024, MiB):
        checks.append(
            Check(
                f"bulk throughput {size_label('bulk', size)}: afunix >= 0.95x C",
                ratio(run.find("bulk", size, "afunix", "unix"), c_row("bulk", size)),
                0.95,
                True,
                "throughput ratio, afunix Channel vs C, unix stream socketpair",
            )
        )
    rate = run.find("rate", 64, "afunix", "unix")
    checks.append(
        Check(
            "small-message rate 64 B: afunix >= 1.0x C",
            ratio(rate, c_row("rate", 64)),
            1.0,
            True,
            "messages/s ratio, afunix Channel vs C (one write and one read per message)",
        )
    )
    checks.append(
        Check(
            "small-message rate 64 B: afunix >= pyzmq ipc://",
            ratio(rate, run.find("rate", 64, "zmq", "ipc")),
            1.0,
            True,
            "messages/s ratio, afunix Channel vs pyzmq PAIR over ipc://",
        )
    )
    checks.append(
        Check(
            "descriptor passing, streaming: afunix >= 1.0x C",
            ratio(run.find("fdpass", 1, "afunix", "unix"), c_row("fdpass", 1)),
            1.0,
            True,
            "descriptors/s ratio, afunix Channel vs C (one sendmsg per descriptor)",
        )
    )
    large_sizes = sorted({c.size for c in run.cells if c.case == "large" and c.size >= 16 * MiB})
    for size in large_sizes:
        checks.append(
            Check(
                f"large payload {size_label('large', size)}: memfd path >= 3x C socket copy",
                ratio(run.find("large", size, "afunix", "memfd"), c_row("large", size)),
                3.0,
                True,
                "throughput ratio, afunix sealed-memfd path vs C write()/read() of the payload",
            )
        )
    behind = []
    compared = 0
    for cell in run.cells:
        if not IMPLS[cell.impl].is_afunix or not cell.median:
            continue
        for other_impl in ("stdlib", "mp"):
            for transport in (cell.transport, "unix", "unix-path"):
                other = run.find(cell.case, cell.size, other_impl, transport)
                if other is not None and other.median:
                    break
            else:
                continue
            compared += 1
            r = ratio(other, cell) if CASES[cell.case].lower_is_better else ratio(cell, other)
            if r is not None and r < 1.0:
                behind.append(
                    f"{IMPLS[cell.impl].label} {cell.case} {size_label(cell.case, cell.size)} "
                    f"behind {IMPLS[other_impl].label} ({r:.2f}x)"
                )
    checks.append(
        Check(
            "every afunix row ahead of plain stdlib and multiprocessing",
            float(compared - len(behind)) if compared else None,
            float(compared),
            True,
            "; ".join(behind) if behind else f"{compared} comparisons, all ahead",
        )
    )
    # Not a target of its own: the asyncio channel against the asyncio code most
    # people would write (streams), on the cases both measure.
    slower, pairs = [], 0
    for cell in run.cells:
        if cell.impl != "afunix-aio" or not cell.median:
            continue
        other = run.find(cell.case, cell.size, "asyncio", "unix")
        if other is None or not other.median:
            continue
        pairs += 1
        r = ratio(other, cell) if CASES[cell.case].lower_is_better else ratio(cell, other)
        if r is not None and r < 1.0:
            slower.append(f"{cell.case} {size_label(cell.case, cell.size)} ({r:.2f}x)")
    if pairs:
        checks.append(
            Check(
                "(information) every AsyncChannel row ahead of asyncio streams",
                float(pairs - len(slower)),
                float(pairs),
                True,
                "behind: " + "; ".join(slower) if slower else f"{pairs} comparisons, all ahead",
            )
        )
    return checks


def to_json(run: Run) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "machine": run.machine,
        "options": dict(run.options.__dict__),
        "elapsed_s": round(run.finished - run.started, 1),
        "notes": run.notes,
        "results": [c.to_json() for c in run.cells],
        "uds_vs_tcp": uds_vs_tcp(run),
        "book_claim": BOOK_CLAIM,
        "targets": [t.to_json() for t in targets(run)],
    }


# ---- text rendering -----------------------------------------------------------------


_WHERE = {"same": "; both ends on CPU 0", "split": "; ends on CPUs 0 and 1", "none": ""}


def group_title(case: str, size: int, rounds: int, placement: str = "none") -> str:
    spec = CASES[case]
    label = size_label(case, size)
    better = "lower is better" if spec.lower_is_better else "higher is better"
    where = _WHERE.get(placement, "")
    return (
        f"{spec.title}{', ' + label if label else ''} (median of {rounds} rounds; {better}{where})"
    )


def table_rows(run: Run, cells: list[Cell]) -> list[list[str]]:
    rows = []
    unit = CASES[cells[0].case].unit
    for cell in cells:
        if cell.error:
            rows.append(
                [row_label(cell), transport_label(cell.transport, short=True), "failed", cell.error]
            )
            continue
        low, high = cell.low, cell.high
        r = vs_c(run, cell)
        rows.append(
            [
                row_label(cell),
                transport_label(cell.transport, short=True),
                fmt(cell.median, unit),
                fmt_range(low, high, unit),
                fmt(cell.p99, unit) if cell.p99 is not None else "",
                f"{r:.2f}x" if r is not None else "",
            ]
        )
    return rows


HEADERS = ["implementation", "transport", "median", "range", "p99", "vs C"]


def placement_warning(run: Run) -> str | None:
    """A warning when unpinned latencies are bimodal (cross-CPU wake-ups dominate)."""
    ref = run.find("rtt", 64, "c", "unix")
    if (
        ref is None
        or ref.placement != "none"
        or not ref.low
        or not ref.high
        or ref.high < 2 * ref.low
    ):
        return None
    return (
        f"latency rows are bimodal here (C unix-pair 64 B rounds span {fmt(ref.low, 'us')} to "
        f"{fmt(ref.high, 'us')}): waking a process on the other, idle CPU dominates, not "
        "the IPC path; compare latencies with --pin auto or same"
    )


def core_line(run: Run) -> str:
    """Which afunix core the afunix rows ran (``afunix --version`` names it the same way)."""
    core = run.machine.get("afunix_core_detail") or run.machine.get("afunix_core")
    return f"afunix core: {core or 'not recorded'}"


def summary_lines(run: Run) -> list[str]:
    lines = [core_line(run)]
    warning = placement_warning(run)
    if warning:
        lines.append(f"Warning: {warning}")
    uds = uds_vs_tcp(run)
    if uds:
        lines.append(f"Unix stream vs TCP loopback (the book: {BOOK_CLAIM}):")
        for row in uds:
            what = "latency" if row["case"] == "rtt" else CASES[row["case"]].title
            lines.append(
                f"  {what}, {size_label(row['case'], row['size'])}, {IMPLS[row['impl']].label}: "
                f"UDS {row['uds_speedup']:.2f}x "
                + ("faster" if row["uds_speedup"] >= 1 else "(slower)")
            )
    checks = targets(run)
    if checks:
        lines.append("Targets (issue 6):")
        for check in checks:
            status = {True: "met", False: "NOT met", None: "not measured"}[check.met]
            measured = "-" if check.measured is None else f"{check.measured:.2f}"
            if check.target.startswith("every"):
                measured = (
                    f"{int(check.measured)}/{int(check.goal)}"
                    if check.measured is not None
                    else "-"
                )
            lines.append(f"  [{status}] {check.target}: {measured} ({check.detail})")
    return lines


def transport_legend() -> str:
    return "transports: " + "; ".join(
        f"{TRANSPORT_SHORT[k]} = {v}" for k, v in TRANSPORTS.items() if TRANSPORT_SHORT[k] != v
    )


def render_plain(run: Run) -> str:
    """The report as plain text (no rich): one table per case and size."""
    out = []
    for case, size, cells in run.groups():
        out.append("")
        out.append(group_title(case, size, run.options.rounds, cells[0].placement))
        rows = [HEADERS, *table_rows(run, cells)]
        widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(HEADERS))]
        for r in rows:
            out.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    out.append("")
    out.append(transport_legend())
    for note in run.notes:
        out.append(f"note: {note}")
    out.append("")
    out.extend(summary_lines(run))
    return "\n".join(out)


def render_rich(run: Run, console: Any) -> None:
    """The report on a rich console."""
    from rich.table import Table
    from rich.text import Text

    for case, size, cells in run.groups():
        table = Table(
            title=group_title(case, size, run.options.rounds, cells[0].placement),
            title_justify="left",
        )
        for i, header in enumerate(HEADERS):
            table.add_column(header, justify="right" if i >= 2 else "left", no_wrap=i < 2)
        for cell, row in zip(cells, table_rows(run, cells), strict=True):
            style = "bold" if IMPLS[cell.impl].is_afunix else ("dim" if cell.impl == "c" else "")
            if cell.error:
                style = "red"
            table.add_row(*(Text(v) for v in row), style=style)
        console.print(table)
    console.print(transport_legend(), markup=False, highlight=False)
    for note in run.notes:
        console.print(f"note: {note}", markup=False, highlight=False, style="yellow")
    for line in summary_lines(run):
        style = "red" if "[NOT met]" in line else "green" if "[met]" in line else ""
        console.print(line, markup=False, highlight=False, style=style)


# ---- Markdown, and runs read back from JSON ---------------------------------------------


def render_markdown(run: Run) -> str:
    """The tables, the UDS/TCP ratios and the targets as Markdown (for docs/benchmarks.md)."""
    out = []
    for case, size, cells in run.groups():
        out.append(f"**{group_title(case, size, run.options.rounds, cells[0].placement)}**")
        out.append("")
        out.append("| " + " | ".join(HEADERS) + " |")
        out.append("|" + "---|" * 2 + "---:|" * (len(HEADERS) - 2))
        for cell, values in zip(cells, table_rows(run, cells), strict=True):
            row = values + [""] * (len(HEADERS) - len(values))
            if IMPLS[cell.impl].is_afunix:
                row[0] = f"**{row[0]}**"
            out.append("| " + " | ".join(v.replace("|", "\\|") for v in row) + " |")
        out.append("")
    for note in run.notes:
        out.append(f"Note: {note}")
        out.append("")
    lines = summary_lines(run)
    if lines:
        out.append("```")
        out.extend(lines)
        out.append("```")
    return "\n".join(out) + "\n"


def run_from_json(data: dict[str, Any]) -> Run:
    """A :class:`Run` rebuilt from what :func:`to_json` wrote (to re-render without measuring)."""
    from ._harness import Options

    if data.get("schema") != SCHEMA:
        raise ValueError(f"not an afunix bench JSON file (schema {data.get('schema')!r})")
    opts = dict(data["options"])
    for key in ("cases", "impls"):
        opts[key] = tuple(opts[key])
    cells = []
    for r in data["results"]:
        cell = Cell(r["case"], r["size"], r["impl"], r["transport"], r["count"], r["warmup"])
        cell.placement = r.get("placement", "none")
        cell.runs = list(r["runs"])
        cell.error = r["error"] or ""
        cells.append(cell)
    run = Run(Options(**opts), cells, list(data["notes"]), dict(data["machine"]))
    run.finished = float(data.get("elapsed_s", 0.0))
    return run
