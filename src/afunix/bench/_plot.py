"""The chart: one panel per case and size, a bar per row (needs matplotlib).

Bars are medians, whiskers the range over rounds; afunix rows are drawn
solid, the C baseline dark grey, the others in muted colours.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ._harness import Run
from ._report import fmt, transport_label
from ._spec import CASES, IMPLS, size_label

_COLOURS = {
    "c": "#444444",
    "stdlib": "#8fb3d9",
    "mp": "#b5a3d1",
    "zmq": "#e6b36e",
    "asyncio": "#9ccf9c",
    "afunix": "#d62728",
    "afunix-aio": "#ff7f0e",
}

_SCALE = {"us": (1.0, "us"), "B/s": (1e9, "GB/s"), "msg/s": (1e6, "M msg/s")}
_SCALE |= {"fd/s": (1e3, "k fd/s"), "conn/s": (1e3, "k conn/s")}


def plot(run: Run, path: str | Path) -> None:
    """Write the chart of ``run`` to ``path`` (PNG); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(c, s, cells) for c, s, cells in run.groups() if any(x.median for x in cells)]
    if not groups:
        raise ValueError("nothing was measured, so there is nothing to plot")
    ncols = 3
    nrows = math.ceil(len(groups) / ncols)
    heights = [
        max(len(cells) for _, _, cells in groups[r * ncols : (r + 1) * ncols]) for r in range(nrows)
    ]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(13, 0.22 * sum(heights) + 0.9 * nrows + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (case, size, cells) in zip(axes.flat, groups, strict=False):
        _panel(ax, run, case, size, cells)
    machine = run.machine
    fig.suptitle(
        f"afunix bench ({run.options.mode}, {run.options.rounds} rounds, pin={run.options.pin}) "
        f"- {machine.get('kernel', '')}, {machine.get('cpus', '?')} CPUs, "
        f"Python {machine.get('python', '')}; bars: median, whiskers: range",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    _save_small(buf, path)


def _save_small(buf: io.BytesIO, path: str | Path) -> None:
    """Write the PNG with a 64-colour palette: a third of the size, same look."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        Path(path).write_bytes(buf.getvalue())
        return
    buf.seek(0)
    with Image.open(buf) as img:
        small = img.convert("RGB").quantize(colors=64)
        small.save(path, format="PNG", optimize=True)


def _panel(ax: Any, run: Run, case: str, size: int, cells: list[Any]) -> None:
    spec = CASES[case]
    factor, unit = _SCALE[spec.unit]
    cells = [c for c in cells if c.median]
    labels = [f"{IMPLS[c.impl].label} · {transport_label(c.transport, short=True)}" for c in cells]
    medians = [c.median / factor for c in cells]
    lows = [(c.median - c.low) / factor for c in cells]
    highs = [(c.high - c.median) / factor for c in cells]
    ys = list(range(len(cells)))
    colours = [_COLOURS.get(c.impl, "#999999") for c in cells]
    ax.barh(ys, medians, xerr=[lows, highs], color=colours, error_kw={"lw": 0.8, "capsize": 1.5})
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    label = size_label(case, size)
    better = "lower is better" if spec.lower_is_better else "higher is better"
    where = {"same": " (one CPU)", "split": " (two CPUs)"}.get(cells[0].placement, "")
    title = f"{spec.title}{', ' + label if label else ''}{where}"
    if len(title) > 45:  # a long one would run past its panel: two lines
        title = title.replace(", ", ",\n", 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{unit} ({better})", fontsize=7)
    for y, cell in zip(ys, cells, strict=True):
        ax.text(
            cell.median / factor,
            y,
            " " + fmt(cell.median, spec.unit),
            va="center",
            fontsize=6,
        )
    ax.margins(x=0.25)
