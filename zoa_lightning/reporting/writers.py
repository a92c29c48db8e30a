"""The files of a run (results.json, results.csv, accuracy.png) and of a comparison, each written atomically."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoa_lightning.files import atomic_write
from zoa_lightning.reporting.plot import plot_accuracy
from zoa_lightning.reporting.schema import (
    COMPARISON_COLUMNS,
    ROW_COLUMNS,
    RUN_COLUMNS,
    DomainRow,
    domain_rows,
    summarize,
)
from zoa_lightning.reporting.tables import comparison_cells, comparison_table

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["COMPARISON_FILES", "RESULT_FILES", "write_comparison", "write_results"]

#: Files ``zoa compare`` writes into its output folder.
COMPARISON_FILES: tuple[str, ...] = ("comparison.md", "comparison.csv", "comparison.png")
#: Result files a run writes; a fresh run replaces all of them, so no file of an older run is left looking current.
RESULT_FILES: tuple[str, ...] = ("results.json", "results.csv", "accuracy.png")
#: Decimals kept in result files: accuracies are counts over at most millions of images (1e-4 % resolves one in a
#: million), seconds to the microsecond. Float32 metric noise (89.60000276565552) is cut off.
_DECIMALS = {"acc1": 4, "acc5": 4, "seconds": 6, "mean_acc1": 4, "mean_acc5": 4, "seconds_per_batch": 6}


def write_results(
    rows: Sequence[Mapping[str, Any] | DomainRow],
    info: Mapping[str, Any],
    out_dir: str | Path,
    *,
    plot: bool = True,
    prefix: str = "",
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and optionally ``accuracy.png`` for one run, replacing them atomically.

    Args:
        rows: domain rows (see :class:`DomainRow`), in stream order.
        info: run info and measurements, as for :meth:`RunSummary.from_rows`.
        out_dir: output folder, created if missing.
        plot: whether to write the accuracy plot (without it an older run's plot is removed).
        prefix: prepended verbatim to every file name (e.g. ``"zoa_w8a8_"``).
        fingerprint: what identifies the run's stream, method and precision (``results.json["fingerprint"]``, for
            a later ``zoa compare --resume`` to tell whether the results are this setting's).

    Returns:
        The written paths under the keys ``"json"``, ``"csv"`` and, when plotting, ``"plot"``.

    Raises:
        ValueError: as :meth:`RunSummary.from_rows`.
    """
    summary = _rounded(summarize(rows, info))
    table = [_rounded(row.as_dict()) for row in domain_rows(rows)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{prefix}results.json", "csv": out / f"{prefix}results.csv"}
    record = {"summary": summary, "domains": table}
    if fingerprint is not None:
        record["fingerprint"] = dict(fingerprint)
    _write_json(paths["json"], record)
    run = {key: summary[key] for key in RUN_COLUMNS}
    _write_csv(paths["csv"], [*ROW_COLUMNS, *RUN_COLUMNS], [{**row, **run} for row in table])
    plot_path = out / f"{prefix}accuracy.png"
    if plot:
        title = f"{summary['method']} · {summary['model']} · {summary['bits']}"
        plot_accuracy({summary["method"]: table}, plot_path, title)
        paths["plot"] = plot_path
    else:
        plot_path.unlink(missing_ok=True)  # an older run's plot must not pass for this run's
    return paths


def write_comparison(
    summaries: Sequence[Mapping[str, Any]],
    rows_by_method: Mapping[str, Sequence[Mapping[str, Any] | DomainRow]],
    out_dir: str | Path,
    console: Console | None = None,
) -> dict[str, Path]:
    """Write ``comparison.md`` (markdown table), ``comparison.csv`` and ``comparison.png``, and print the table.

    Args:
        summaries: one ``results.json`` summary per method, in display order.
        rows_by_method: each method's domain rows, for the plot (one line per method).
        out_dir: output folder, created if missing.
        console: where the table goes (default: a new ``rich.console.Console()`` on stdout).

    Returns:
        The written paths under the keys ``"md"``, ``"csv"`` and ``"plot"``.

    Raises:
        ValueError: if ``summaries`` is empty.
    """
    if not summaries:
        raise ValueError("No run summaries to compare.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "plot": out / "comparison.png"}
    _write_csv(paths["csv"], list(COMPARISON_COLUMNS), summaries)
    lines = [
        "| method | mean top-1 % | mean top-5 % | passes/batch | s/batch | peak MB | bits |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {s['method']} | {' | '.join(comparison_cells(s))} | {s['bits']} |" for s in summaries]
    atomic_write(paths["md"], "\n".join(lines) + "\n")
    first = summaries[0]
    plot_accuracy(rows_by_method, paths["plot"], f"{first['model']} · {first['bits']}")
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(comparison_table(summaries))
    console.print(f"wrote {paths['md']}, {paths['csv']}, {paths['plot']}")
    return paths


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its float columns cut to the decimals of :data:`_DECIMALS`."""
    return {
        key: round(value, _DECIMALS[key]) if key in _DECIMALS and isinstance(value, float) else value
        for key, value in record.items()
    }


def _write_json(path: Path, data: Any) -> None:

    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_csv(path: Path, columns: Sequence[str], records: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, buffer.getvalue())
