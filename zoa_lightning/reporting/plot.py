"""The accuracy plot: per-domain top-1 across the stream, one line per method, each mean dashed."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoa_lightning.files import atomic_write
from zoa_lightning.reporting.schema import DomainRow, domain_rows, mean_or_nan

__all__ = ["plot_accuracy"]


def plot_accuracy(
    rows_by_method: Mapping[str, Sequence[Mapping[str, Any] | DomainRow]], path: str | Path, title: str = ""
) -> Path:
    """Plot per-domain top-1 accuracy across the stream, one line per method, with each method's mean dashed.

    Uses matplotlib's Agg canvas directly, so the user's pyplot backend is left alone. Domains are placed by their
    stream ``index``, so methods evaluated on the same stream line up; rounds are separated by dotted lines. The file
    is replaced atomically (:func:`zoa_lightning.files.atomic_write`).

    Args:
        rows_by_method: domain rows per method label.
        path: the PNG to write (its folder must exist; another suffix that matplotlib knows, e.g. ``.pdf``, gives
            that format).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {method: domain_rows(rows) for method, rows in rows_by_method.items() if rows}
    if not series:
        raise ValueError("No domain rows to plot.")
    labels: dict[int, tuple[int, str]] = {}
    for rows in series.values():
        for row in rows:
            labels.setdefault(row.index, (row.round, row.corruption))
    ticks = sorted(labels)
    width = min(max(6.0, 0.3 * len(ticks) + 2.5), 30.0)
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marker_size = 5.0 if len(ticks) <= 60 else 2.5
    for method, rows in series.items():
        mean = mean_or_nan([row.acc1 for row in rows])
        (line,) = ax.plot(
            [row.index for row in rows],
            [row.acc1 for row in rows],
            marker="o",
            markersize=marker_size,
            linewidth=1.2,
            label=f"{method} (mean {mean:.2f}%)",
        )
        ax.axhline(mean, linestyle="--", linewidth=1.0, color=line.get_color(), alpha=0.8)

    step = max(1, math.ceil(len(ticks) / 75))
    shown = ticks[::step]
    ax.set_xticks(shown, [labels[i][1] for i in shown], rotation=60, ha="right", fontsize=8)
    rounds = sorted({r for r, _ in labels.values()})
    if len(rounds) > 1:
        for prev, cur in itertools.pairwise(ticks):
            if labels[cur][0] != labels[prev][0]:
                ax.axvline((prev + cur) / 2, color="0.6", linestyle=":", linewidth=1.0)
        for rnd in rounds:
            members = [i for i in ticks if labels[i][0] == rnd]
            ax.text(
                (members[0] + members[-1]) / 2,
                1.01,
                f"round {rnd}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.35",
            )
    ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("domain")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=path.suffix.lstrip(".") or None)
    return atomic_write(path, buffer.getvalue())
