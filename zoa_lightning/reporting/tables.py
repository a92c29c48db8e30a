"""Rich tables of one run (a line per domain and the mean) and of a comparison (a line per method)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from zoa_lightning.reporting.schema import DomainRow, domain_rows, mean_or_nan

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["comparison_cells", "comparison_table", "results_table"]


def results_table(rows: Sequence[Mapping[str, Any] | DomainRow], info: Mapping[str, Any]) -> Table:
    """A rich table of one run: a line per domain (top-1, top-5, samples, rolled-back batches if any) and the mean.

    Args:
        rows: domain rows, in stream order.
        info: ``method``, ``model`` and ``bits`` for the title.

    Returns:
        The table, for ``rich.console.Console().print``.
    """
    from rich.table import Table

    table_rows = domain_rows(rows)
    skipped = sum(row.skipped_batches for row in table_rows)
    table = Table(title=f"{info['method']} · {info['model']} · {info['bits']}")
    table.add_column("domain")
    columns = ("acc1", "acc5", "n", "skipped") if skipped else ("acc1", "acc5", "n")
    for name in columns:
        table.add_column(name, justify="right", style="bold red" if name == "skipped" else None)
    for i, row in enumerate(table_rows):
        cells = [row.domain, f"{row.acc1:.2f}", f"{row.acc5:.2f}", str(row.n)]
        table.add_row(*cells, *([str(row.skipped_batches)] if skipped else []), end_section=i == len(table_rows) - 1)
    total = [
        "mean",
        f"{mean_or_nan([row.acc1 for row in table_rows]):.2f}",
        f"{mean_or_nan([row.acc5 for row in table_rows]):.2f}",
        str(sum(row.n for row in table_rows)),
    ]
    table.add_row(*total, *([str(skipped)] if skipped else []), style="bold")
    if skipped:
        table.caption = f"{skipped} batch(es) rolled back: predicted, not adapted on (see skipped_batches)"
    return table


def comparison_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    """A rich table of several runs of one stream: a line per method with accuracy and cost.

    Args:
        summaries: one ``results.json`` summary per method (keys of :data:`SUMMARY_KEYS`), in display order.

    Returns:
        The table, titled with the first run's model and bits.
    """
    from rich.table import Table

    first = summaries[0]
    table = Table(title=f"zoa compare · {first['model']} · {first['bits']}")
    for column in ("method", "mean top-1 %", "mean top-5 %", "passes/batch", "s/batch", "peak MB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        table.add_row(str(s["method"]), *comparison_cells(s))
    return table


def comparison_cells(s: Mapping[str, Any]) -> list[str]:
    """Mean top-1, top-5, passes per batch, seconds per batch and peak MB of one summary, formatted."""
    return [
        _format(s["mean_acc1"], ".2f"),
        _format(s["mean_acc5"], ".2f"),
        _format(s["forward_passes_per_batch"], ".1f"),
        _format(s["seconds_per_batch"], ".3f"),
        _format(s["peak_memory_mb"], ".0f"),
    ]


def _format(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
