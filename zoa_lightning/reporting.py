"""Results of a domain stream: the row and summary schema, rich tables, atomic CSV/JSON writers and the accuracy plot.

Pure Python, rich and matplotlib, no Lightning: :class:`callbacks.ResultsCallback` writes one run's files through
:func:`write_results`, ``zoa compare`` reads them back and writes the side-by-side report through
:func:`write_comparison`. The schema is two dataclasses: :class:`DomainRow` (one finished domain) and
:class:`RunSummary` (one run); the column tuples below are derived from their fields, so a column is named once.

Files of one run (:data:`RESULT_FILES`)::

    results.json   {"summary": RunSummary, "domains": [DomainRow, ...]}
    results.csv    one DomainRow per line plus the run-constant method, model, bits columns
    accuracy.png   per-domain top-1 across the stream, the mean dashed

Files of a comparison (:data:`COMPARISON_FILES`): ``comparison.md``, ``comparison.csv``, ``comparison.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from zoa_lightning.files import atomic_write

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "COMPARISON_COLUMNS",
    "COMPARISON_FILES",
    "RESULT_FILES",
    "ROW_COLUMNS",
    "RUN_COLUMNS",
    "SUMMARY_KEYS",
    "DomainRow",
    "RunSummary",
    "comparison_table",
    "mean_of",
    "plot_accuracy",
    "results_table",
    "summarize",
    "write_comparison",
    "write_results",
]

log = logging.getLogger(__name__)

_EXTRAS = "extras"


@dataclass(frozen=True, kw_only=True)
class DomainRow:
    """One finished domain of a stream: a line of ``results.csv`` and an entry of ``results.json["domains"]``.

    Args:
        index: position of the domain in the whole stream (0-based; a resumed run keeps counting).
        round: continual round, from 1.
        corruption: corruption name, e.g. ``"gaussian_noise"``.
        domain: ``"r<round>/<corruption>"``.
        acc1: top-1 accuracy in %.
        acc5: top-5 accuracy in %.
        n: images evaluated (all processes together).
        batches: batches run (global batches under DDP).
        forward_passes: network forward passes of one process.
        skipped_batches: batches whose adaptation was rolled back (0 in rows written before the column existed).
        seconds: wall time of the domain.
        extras: further entries of the producer's row, kept in ``results.json`` after the columns.
    """

    index: int
    round: int
    corruption: str
    domain: str
    acc1: float
    acc5: float
    n: int
    batches: int
    forward_passes: int
    skipped_batches: int = 0
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], position: int = 0) -> DomainRow:
        """Check that ``row`` has every column and cast it to plain ints, floats and strings.

        Args:
            row: a domain row as a module's ``stream_results()`` or ``results.json`` gives it; 0-d tensors and numpy
                scalars are accepted.
            position: the row's position, for the error message.

        Returns:
            The row; keys that are not columns go to :attr:`extras`.

        Raises:
            ValueError: naming the keys a row lacks.
        """
        missing = [f.name for f in _ROW_FIELDS if f.name not in row and _required(f)]
        if missing:
            raise ValueError(f"Domain row {position} ({row.get('domain', '?')!r}) lacks the keys {missing}.")
        values = {f.name: _cast(_ROW_TYPES[f.name], _plain(row[f.name])) for f in _ROW_FIELDS if f.name in row}
        extras = {key: _plain(value) for key, value in row.items() if key not in _ROW_NAMES}
        return cls(**values, extras=extras)

    def as_dict(self) -> dict[str, Any]:
        """The columns in :data:`ROW_COLUMNS` order, then the extras."""
        return {**{name: getattr(self, name) for name in ROW_COLUMNS}, **self.extras}


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One run of a stream: ``results.json["summary"]`` and a row of ``comparison.csv``.

    Args:
        method: method label (the run name, e.g. ``"zoa"`` or an ablation's config name).
        model: network name.
        bits: precision tag, e.g. ``"W8A8"`` or ``"float"``.
        mean_acc1: unweighted mean of the domains' top-1 accuracies, in %.
        mean_acc5: unweighted mean of the domains' top-5 accuracies, in %.
        domains: finished domains.
        samples: images evaluated.
        batches: batches run.
        forward_passes: network forward passes.
        forward_passes_per_batch: ``forward_passes / batches`` (``None`` without batches).
        skipped_batches: batches whose adaptation was rolled back.
        seconds: wall time of the run.
        seconds_per_batch: ``seconds / batches`` (``None`` without batches).
        peak_memory_mb: peak memory in MiB (``None`` when not measured).
        memory_kind: what ``peak_memory_mb`` measures (``"cuda_allocated"``, ``"cpu_max_rss"``) or ``None``.
        extras: further run information (hyperparameters, counts), after the computed keys.
    """

    method: str
    model: str
    bits: str
    mean_acc1: float
    mean_acc5: float
    domains: int
    samples: int
    batches: int
    forward_passes: int
    forward_passes_per_batch: float | None
    skipped_batches: int
    seconds: float
    seconds_per_batch: float | None
    peak_memory_mb: Any
    memory_kind: Any
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any] | DomainRow], info: Mapping[str, Any]) -> RunSummary:
        """Summarise a stream: unweighted means over domain entries, totals, per-batch costs, run info.

        Args:
            rows: domain rows (mappings with the :data:`ROW_COLUMNS`, or :class:`DomainRow`), in stream order.
            info: ``method``, ``model``, ``bits``; optionally the measurements ``seconds`` (total wall time; defaults
                to the sum of the rows' ``seconds``), ``peak_memory_mb`` and ``memory_kind``; any other entries become
                :attr:`extras`. Extras named like a computed key are dropped with a logged warning.

        Returns:
            The summary.

        Raises:
            ValueError: if ``rows`` is empty, a row lacks a column or ``info`` lacks ``method``, ``model`` or
                ``bits``.
        """
        if not rows:
            raise ValueError("No domain rows to summarise.")
        missing = [key for key in RUN_COLUMNS if key not in info]
        if missing:
            raise ValueError(f"Run info lacks the keys {missing}; `run_info()` must return method, model and bits.")
        table = _domain_rows(rows)
        batches = sum(row.batches for row in table)
        forward_passes = sum(row.forward_passes for row in table)
        seconds = (
            float(_plain(info["seconds"])) if info.get("seconds") is not None else math.fsum(r.seconds for r in table)
        )
        extras: dict[str, Any] = {}
        for key, value in info.items():
            if key in RUN_COLUMNS or key in _MEASURED_KEYS:
                continue
            if key in SUMMARY_KEYS:
                log.warning("Run info entry %r clashes with a computed summary key and is left out.", key)
                continue
            extras[key] = _plain(value)
        return cls(
            method=str(info["method"]),
            model=str(info["model"]),
            bits=str(info["bits"]),
            mean_acc1=_mean([row.acc1 for row in table]),
            mean_acc5=_mean([row.acc5 for row in table]),
            domains=len(table),
            samples=sum(row.n for row in table),
            batches=batches,
            forward_passes=forward_passes,
            forward_passes_per_batch=forward_passes / batches if batches else None,
            skipped_batches=sum(row.skipped_batches for row in table),
            seconds=seconds,
            seconds_per_batch=seconds / batches if batches else None,
            peak_memory_mb=_plain(info.get("peak_memory_mb")),
            memory_kind=info.get("memory_kind"),
            extras=extras,
        )

    def as_dict(self) -> dict[str, Any]:
        """The keys in :data:`SUMMARY_KEYS` order, then the extras."""
        return {**{name: getattr(self, name) for name in SUMMARY_KEYS}, **self.extras}


_ROW_FIELDS = tuple(f for f in dataclasses.fields(DomainRow) if f.name != _EXTRAS)
_ROW_TYPES: dict[str, Any] = get_type_hints(DomainRow)
_ROW_NAMES = frozenset(f.name for f in _ROW_FIELDS)

#: Columns of a domain row, in CSV order (the fields of :class:`DomainRow`).
ROW_COLUMNS: tuple[str, ...] = tuple(f.name for f in _ROW_FIELDS)
#: Run-constant columns appended to every CSV row, so CSVs of several runs can be concatenated.
RUN_COLUMNS: tuple[str, ...] = ("method", "model", "bits")
#: Keys of ``results.json["summary"]`` computed from rows and measurements (the fields of :class:`RunSummary`);
#: extras follow them.
SUMMARY_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunSummary) if f.name != _EXTRAS)
#: Columns of ``comparison.csv``, one row per method (a subset of :data:`SUMMARY_KEYS`).
COMPARISON_COLUMNS: tuple[str, ...] = (
    "method",
    "mean_acc1",
    "mean_acc5",
    "forward_passes_per_batch",
    "seconds_per_batch",
    "peak_memory_mb",
    "bits",
    "model",
)
#: Result files a run writes; a fresh run replaces all of them, so no file of an older run is left looking current.
RESULT_FILES: tuple[str, ...] = ("results.json", "results.csv", "accuracy.png")
#: Files ``zoa compare`` writes into its output folder.
COMPARISON_FILES: tuple[str, ...] = ("comparison.md", "comparison.csv", "comparison.png")

_MEASURED_KEYS = frozenset({"seconds", "peak_memory_mb", "memory_kind"})
#: Decimals kept in result files: accuracies are counts over at most millions of images (1e-4 % resolves one in a
#: million), seconds to the microsecond. Float32 metric noise (89.60000276565552) is cut off.
_DECIMALS = {"acc1": 4, "acc5": 4, "seconds": 6, "mean_acc1": 4, "mean_acc5": 4, "seconds_per_batch": 6}


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _cast(kind: Any, value: Any) -> Any:
    return int(value) if kind is int else float(value) if kind is float else str(value)


def _plain(value: Any) -> Any:
    """Turn 0-d tensors and numpy scalars into Python scalars; leave anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and (getattr(value, "shape", None) == () or _numel(value) == 1):
        return item()
    return value


def _numel(value: Any) -> int | None:
    numel = getattr(value, "numel", None)
    return int(numel()) if callable(numel) else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def mean_of(rows: Sequence[Mapping[str, Any] | DomainRow], column: str = "acc1") -> float:
    """The unweighted mean of a column over domain rows (the stream's mean top-1 by default; NaN without rows).

    Example:
        >>> rows = [{"acc1": 50.0}, {"acc1": 70.0}]
        >>> mean_of(rows)
        60.0
    """
    return _mean([float(row[column] if isinstance(row, Mapping) else getattr(row, column)) for row in rows])


def _domain_rows(rows: Sequence[Mapping[str, Any] | DomainRow]) -> list[DomainRow]:
    return [row if isinstance(row, DomainRow) else DomainRow.from_mapping(row, i) for i, row in enumerate(rows)]


def summarize(rows: Sequence[Mapping[str, Any] | DomainRow], info: Mapping[str, Any]) -> dict[str, Any]:
    """:meth:`RunSummary.from_rows` as a plain dict (keys in :data:`SUMMARY_KEYS` order, then the extras).

    Args:
        rows: domain rows, in stream order.
        info: run info and measurements (see :meth:`RunSummary.from_rows`).

    Returns:
        The ``summary`` dict of ``results.json``.

    Raises:
        ValueError: as :meth:`RunSummary.from_rows`.
    """
    return RunSummary.from_rows(rows, info).as_dict()


# ---------------------------------------------------------------------------------------------------------- tables


def results_table(rows: Sequence[Mapping[str, Any] | DomainRow], info: Mapping[str, Any]) -> Table:
    """A rich table of one run: a line per domain (top-1, top-5, samples, rolled-back batches if any) and the mean.

    Args:
        rows: domain rows, in stream order.
        info: ``method``, ``model`` and ``bits`` for the title.

    Returns:
        The table, for ``rich.console.Console().print``.
    """
    from rich.table import Table

    table_rows = _domain_rows(rows)
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
        f"{_mean([row.acc1 for row in table_rows]):.2f}",
        f"{_mean([row.acc5 for row in table_rows]):.2f}",
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
        table.add_row(str(s["method"]), *_comparison_cells(s))
    return table


def _comparison_cells(s: Mapping[str, Any]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------------- writers


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
    table = [_rounded(row.as_dict()) for row in _domain_rows(rows)]
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
    lines += [f"| {s['method']} | {' | '.join(_comparison_cells(s))} | {s['bits']} |" for s in summaries]
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
    import json

    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_csv(path: Path, columns: Sequence[str], records: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------- plot


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

    series = {method: _domain_rows(rows) for method, rows in rows_by_method.items() if rows}
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
        mean = _mean([row.acc1 for row in rows])
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
