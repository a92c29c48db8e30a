"""The schema of a stream's results: one finished domain (:class:`DomainRow`), one run (:class:`RunSummary`).

The column tuples are derived from the dataclasses' fields, so a column is named once. Pure Python.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

__all__ = [
    "COMPARISON_COLUMNS",
    "ROW_COLUMNS",
    "RUN_COLUMNS",
    "SUMMARY_KEYS",
    "DomainRow",
    "RunSummary",
    "domain_rows",
    "mean_of",
    "mean_or_nan",
    "plain",
    "summarize",
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
        values = {f.name: _cast(_ROW_TYPES[f.name], plain(row[f.name])) for f in _ROW_FIELDS if f.name in row}
        extras = {key: plain(value) for key, value in row.items() if key not in _ROW_NAMES}
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
        table = domain_rows(rows)
        batches = sum(row.batches for row in table)
        forward_passes = sum(row.forward_passes for row in table)
        seconds = (
            float(plain(info["seconds"])) if info.get("seconds") is not None else math.fsum(r.seconds for r in table)
        )
        extras: dict[str, Any] = {}
        for key, value in info.items():
            if key in RUN_COLUMNS or key in _MEASURED_KEYS:
                continue
            if key in SUMMARY_KEYS:
                log.warning("Run info entry %r clashes with a computed summary key and is left out.", key)
                continue
            extras[key] = plain(value)
        return cls(
            method=str(info["method"]),
            model=str(info["model"]),
            bits=str(info["bits"]),
            mean_acc1=mean_or_nan([row.acc1 for row in table]),
            mean_acc5=mean_or_nan([row.acc5 for row in table]),
            domains=len(table),
            samples=sum(row.n for row in table),
            batches=batches,
            forward_passes=forward_passes,
            forward_passes_per_batch=forward_passes / batches if batches else None,
            skipped_batches=sum(row.skipped_batches for row in table),
            seconds=seconds,
            seconds_per_batch=seconds / batches if batches else None,
            peak_memory_mb=plain(info.get("peak_memory_mb")),
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

_MEASURED_KEYS = frozenset({"seconds", "peak_memory_mb", "memory_kind"})


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _cast(kind: Any, value: Any) -> Any:
    return int(value) if kind is int else float(value) if kind is float else str(value)


def plain(value: Any) -> Any:
    """Turn 0-d tensors and numpy scalars into Python scalars; leave anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and (getattr(value, "shape", None) == () or _numel(value) == 1):
        return item()
    return value


def _numel(value: Any) -> int | None:
    numel = getattr(value, "numel", None)
    return int(numel()) if callable(numel) else None


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean of ``values`` (``math.fsum``), or NaN for none."""
    return math.fsum(values) / len(values) if values else math.nan


def mean_of(rows: Sequence[Mapping[str, Any] | DomainRow], column: str = "acc1") -> float:
    """The unweighted mean of a column over domain rows (the stream's mean top-1 by default; NaN without rows).

    Example:
        >>> rows = [{"acc1": 50.0}, {"acc1": 70.0}]
        >>> mean_of(rows)
        60.0
    """
    return mean_or_nan([float(row[column] if isinstance(row, Mapping) else getattr(row, column)) for row in rows])


def domain_rows(rows: Sequence[Mapping[str, Any] | DomainRow]) -> list[DomainRow]:
    """``rows`` as :class:`DomainRow` objects (mappings checked and cast by :meth:`DomainRow.from_mapping`)."""
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
