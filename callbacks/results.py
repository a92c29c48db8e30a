"""Report a test-time adaptation stream at the end of ``trainer.test``.

:class:`ResultsCallback` reads the finished (round, corruption) domains from a LightningModule implementing
:class:`StreamResults`, measures wall time and peak memory itself, and writes ``results.json``, ``results.csv`` and
``accuracy.png`` (rank zero only), then prints a rich table. The file writing is the public function
:func:`write_results`, the plot :func:`plot_accuracy`; both are reusable outside a Trainer, e.g. to compare methods.
"""

import csv
import io
import itertools
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

log = logging.getLogger(__name__)

#: Columns of a domain row, in CSV order.
ROW_COLUMNS: tuple[str, ...] = (
    "index",
    "round",
    "corruption",
    "domain",
    "acc1",
    "acc5",
    "n",
    "batches",
    "forward_passes",
    "skipped_batches",
    "seconds",
)
#: Run-constant columns appended to every CSV row, so CSVs of several runs can be concatenated.
RUN_COLUMNS: tuple[str, ...] = ("method", "model", "bits")
#: Keys of ``results.json["summary"]`` computed from rows and measurements; ``run_info`` extras follow them.
SUMMARY_KEYS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "mean_acc1",
    "mean_acc5",
    "domains",
    "samples",
    "batches",
    "forward_passes",
    "forward_passes_per_batch",
    "skipped_batches",
    "seconds",
    "seconds_per_batch",
    "peak_memory_mb",
    "memory_kind",
)

_INT_COLUMNS = frozenset({"index", "round", "n", "batches", "forward_passes", "skipped_batches"})
_FLOAT_COLUMNS = frozenset({"acc1", "acc5", "seconds"})
#: Columns that rows written before they existed lack, with the value such a row means.
_DEFAULTS: dict[str, Any] = {"skipped_batches": 0}
#: Decimals kept in result files: accuracies are counts over at most millions of images (1e-4 % resolves one in a
#: million), seconds to the microsecond. Float32 metric noise (89.60000276565552) is cut off.
_DECIMALS = {"acc1": 4, "acc5": 4, "seconds": 6, "mean_acc1": 4, "mean_acc5": 4, "seconds_per_batch": 6}
#: Result files a run writes; a fresh run replaces all of them, so no file of an older run is left looking current.
RESULT_FILES: tuple[str, ...] = ("results.json", "results.csv", "accuracy.png")
_MEASURED_KEYS = frozenset({"seconds", "peak_memory_mb", "memory_kind"})
_PROTOCOL_METHODS: tuple[str, ...] = ("stream_results", "run_info")


@runtime_checkable
class StreamResults(Protocol):
    """What :class:`ResultsCallback` needs from the LightningModule it observes."""

    def stream_results(self) -> list[dict[str, Any]]:
        """One dict per finished domain, in stream order, with the keys in :data:`ROW_COLUMNS`."""
        ...

    def run_info(self) -> dict[str, Any]:
        """``method``, ``model`` and ``bits`` strings, plus optional extra scalar entries."""
        ...


def _plain(value: Any) -> Any:
    """Turn 0-d tensors and numpy scalars into Python scalars; leave anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    return value


def _normalise_row(row: Mapping[str, Any], position: int) -> dict[str, Any]:
    """Check that a domain row has every column and cast it to plain ints, floats and strings."""
    row = {**_DEFAULTS, **row}
    missing = [key for key in ROW_COLUMNS if key not in row]
    if missing:
        raise ValueError(f"Domain row {position} ({row.get('domain', '?')!r}) lacks the keys {missing}.")
    out: dict[str, Any] = {}
    for key in ROW_COLUMNS:
        value = _plain(row[key])
        if key in _INT_COLUMNS:
            out[key] = int(value)
        elif key in _FLOAT_COLUMNS:
            out[key] = float(value)
        else:
            out[key] = str(value)
    out.update({key: _plain(value) for key, value in row.items() if key not in out})
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def summarize(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> dict[str, Any]:
    """Summarise a stream: unweighted means over domain entries, totals, per-batch costs, run info.

    Args:
        rows: Domain rows (see :data:`ROW_COLUMNS`), in stream order.
        info: ``method``, ``model``, ``bits``; optionally the measurements ``seconds`` (total wall time; defaults to
            the sum of the rows' ``seconds``), ``peak_memory_mb`` and ``memory_kind``; any other entries are copied
            after the computed keys. Extras named like a computed key are dropped with a logged warning.

    Returns:
        The ``summary`` dict of ``results.json``, keys in :data:`SUMMARY_KEYS` order, then the extras.

    Raises:
        ValueError: If ``rows`` is empty, a row lacks a column or ``info`` lacks ``method``, ``model`` or ``bits``.
    """
    if not rows:
        raise ValueError("No domain rows to summarise.")
    missing = [key for key in RUN_COLUMNS if key not in info]
    if missing:
        raise ValueError(f"Run info lacks the keys {missing}; `run_info()` must return method, model and bits.")
    table = [_normalise_row(row, i) for i, row in enumerate(rows)]
    batches = sum(row["batches"] for row in table)
    forward_passes = sum(row["forward_passes"] for row in table)
    seconds = (
        float(_plain(info["seconds"]))
        if info.get("seconds") is not None
        else math.fsum(row["seconds"] for row in table)
    )
    summary: dict[str, Any] = {key: str(info[key]) for key in RUN_COLUMNS}
    summary.update(
        mean_acc1=_mean([row["acc1"] for row in table]),
        mean_acc5=_mean([row["acc5"] for row in table]),
        domains=len(table),
        samples=sum(row["n"] for row in table),
        batches=batches,
        forward_passes=forward_passes,
        forward_passes_per_batch=forward_passes / batches if batches else None,
        skipped_batches=sum(row["skipped_batches"] for row in table),
        seconds=seconds,
        seconds_per_batch=seconds / batches if batches else None,
        peak_memory_mb=_plain(info.get("peak_memory_mb")),
        memory_kind=info.get("memory_kind"),
    )
    for key, value in info.items():
        if key in RUN_COLUMNS or key in _MEASURED_KEYS:
            continue
        if key in summary:
            log.warning("Run info entry %r clashes with a computed summary key and is left out.", key)
            continue
        summary[key] = _plain(value)
    return summary


def plot_accuracy(rows_by_method: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Plot per-domain top-1 accuracy across the stream, one line per method, with each method's mean dashed.

    Uses matplotlib's Agg canvas directly, so the user's pyplot backend is left alone. Domains are placed by their
    stream ``index``, so methods evaluated on the same stream line up; rounds are separated by dotted lines.

    Args:
        rows_by_method: Domain rows (keys ``index``, ``round``, ``corruption``, ``acc1``) per method label.
        path: The PNG to write (its folder must exist).
        title: Figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {method: [_normalise_row(r, i) for i, r in enumerate(rows)] for method, rows in rows_by_method.items()}
    series = {method: rows for method, rows in series.items() if rows}
    if not series:
        raise ValueError("No domain rows to plot.")
    labels: dict[int, tuple[int, str]] = {}
    for rows in series.values():
        for row in rows:
            labels.setdefault(row["index"], (row["round"], row["corruption"]))
    ticks = sorted(labels)
    width = min(max(6.0, 0.3 * len(ticks) + 2.5), 30.0)
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marker_size = 5.0 if len(ticks) <= 60 else 2.5
    for method, rows in series.items():
        mean = _mean([row["acc1"] for row in rows])
        (line,) = ax.plot(
            [row["index"] for row in rows],
            [row["acc1"] for row in rows],
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
    fig.savefig(path, dpi=120)
    return path


def write_results(
    rows: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
    out_dir: str | Path,
    *,
    plot: bool = True,
    prefix: str = "",
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and optionally ``accuracy.png`` for one run, overwriting them.

    Args:
        rows: Domain rows (see :data:`ROW_COLUMNS`), in stream order.
        info: Run info and measurements, as for :func:`summarize`.
        out_dir: Output folder, created if missing.
        plot: Whether to write the accuracy plot.
        prefix: Prepended verbatim to every file name (e.g. ``"zoa_w8a8_"``).

    Returns:
        The written paths under the keys ``"json"``, ``"csv"`` and, when plotting, ``"plot"``.

    Raises:
        ValueError: As for :func:`summarize`.
    """
    summary = _rounded(summarize(rows, info))
    table = [_rounded(_normalise_row(row, i)) for i, row in enumerate(rows)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{prefix}results.json", "csv": out / f"{prefix}results.csv"}
    _atomic_text(paths["json"], json.dumps({"summary": summary, "domains": table}, indent=2, default=str) + "\n")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*ROW_COLUMNS, *RUN_COLUMNS], extrasaction="ignore")
    writer.writeheader()
    run = {key: summary[key] for key in RUN_COLUMNS}
    writer.writerows({**row, **run} for row in table)
    _atomic_text(paths["csv"], buffer.getvalue())
    plot_path = out / f"{prefix}accuracy.png"
    if plot:
        title = f"{summary['method']} · {summary['model']} · {summary['bits']}"
        tmp = plot_path.with_name(f".{plot_path.name}.{os.getpid()}.tmp.png")
        try:
            plot_accuracy({summary["method"]: table}, tmp, title)
            os.replace(tmp, plot_path)
        finally:
            tmp.unlink(missing_ok=True)
        paths["plot"] = plot_path
    else:
        plot_path.unlink(missing_ok=True)  # an older run's plot must not pass for this run's
    return paths


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its float columns cut to the decimals of :data:`_DECIMALS`."""
    return {
        key: round(value, _DECIMALS[key]) if key in _DECIMALS and isinstance(value, float) else value
        for key, value in record.items()
    }


def _atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (never half-written)."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_results(out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Delete the result files of an earlier run in ``out_dir`` (see :data:`RESULT_FILES`); returns what it removed."""
    removed = []
    for name in RESULT_FILES:
        path = Path(out_dir) / f"{prefix}{name}"
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _observed(pl_module: "pl.LightningModule") -> StreamResults:
    """The module as a :class:`StreamResults` (checked in ``setup``)."""
    return cast(StreamResults, pl_module)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class ResultsCallback(Callback):
    """Report the domain stream of ``trainer.test``: JSON, CSV, accuracy plot and a rich table.

    The observed LightningModule must implement :class:`StreamResults`. At ``on_test_end`` the callback reads its
    finished domains and, on global rank zero, writes ``<prefix>results.json`` (summary and per-domain rows),
    ``<prefix>results.csv`` (one row per domain plus the run-constant ``method``, ``model``, ``bits`` columns) and
    ``<prefix>accuracy.png`` into ``out_dir``, overwriting earlier files. The mean is unweighted over domain
    entries. It measures the wall time from ``on_test_start`` to ``on_test_end`` (accumulated across a checkpoint
    resume through its state) and peak memory: ``torch.cuda.max_memory_allocated`` since ``on_test_start`` on CUDA
    (``memory_kind="cuda_allocated"``), otherwise the process's lifetime peak RSS (``"cpu_max_rss"``), in MiB.

    Args:
        out_dir: Folder for the result files; created if missing, files in it are overwritten. ``None`` means
            ``<trainer.default_root_dir>/<method>`` (e.g. ``runs/demo/zoa``), so runs of several methods with one
            config land side by side.
        filename_prefix: Prepended verbatim to each file name, e.g. ``"zoa_w8a8_"``; must not contain a path
            separator.
        plot: Whether to write ``accuracy.png`` (per-domain top-1 across the stream, mean dashed).
        table: Whether to print a rich table of the domains (top-1, top-5, samples) with a final ``mean`` row.

    Raises:
        ValueError: If ``out_dir`` is empty or ``filename_prefix`` contains a path separator.
        TypeError: In ``setup``, if the LightningModule does not implement :class:`StreamResults`.

    Example::

        trainer = Trainer(callbacks=[ResultsCallback(out_dir="runs/zoa_vit_w4a4", filename_prefix="zoa_")])
        trainer.test(model, datamodule=dm)
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        filename_prefix: str = "",
        plot: bool = True,
        table: bool = True,
    ) -> None:
        super().__init__()
        if out_dir is not None and not str(out_dir):
            raise ValueError("`out_dir` must be a non-empty path or None.")
        if "/" in filename_prefix or "\\" in filename_prefix:
            raise ValueError(
                f"`filename_prefix={filename_prefix!r}` contains a path separator; put folders into `out_dir`."
            )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.filename_prefix = filename_prefix
        self.plot = plot
        self.table = table
        self._elapsed: float = 0.0
        self._started_at: float | None = None
        self._cuda_device: torch.device | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=str(self.out_dir), filename_prefix=self.filename_prefix)

    @property
    def elapsed_seconds(self) -> float:
        """Wall seconds spent in test so far, including time restored from a checkpoint."""
        running = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        return self._elapsed + running

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not isinstance(pl_module, StreamResults):
            missing = [name for name in _PROTOCOL_METHODS if not callable(getattr(pl_module, name, None))]
            raise TypeError(
                f"{type(self).__name__} needs a LightningModule implementing `StreamResults`; "
                f"{type(pl_module).__name__} lacks {', '.join(f'`{name}()`' for name in missing)}."
            )
        if stage == "test":
            # A fresh test starts at zero; a checkpoint restore calls `load_state_dict` after this, before the start.
            self._elapsed = 0.0
            self._started_at = None

    @override
    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        info = _observed(pl_module).run_info()
        missing = [key for key in RUN_COLUMNS if key not in info]
        if missing:
            raise ValueError(f"{type(pl_module).__name__}.run_info() lacks the keys {missing}.")
        device = trainer.strategy.root_device
        self._cuda_device = device if device.type == "cuda" and torch.cuda.is_available() else None
        if self._cuda_device is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda_device)
        self._started_at = time.perf_counter()
        if trainer.is_global_zero and trainer.ckpt_path is None:
            # A fresh run replaces an earlier run's files at its end; until then none of them may pass for this run's.
            removed = remove_stale_results(self._out_dir(trainer, info), self.filename_prefix)
            if removed:
                rank_zero_info(f"{type(self).__name__}: removed an earlier run's {', '.join(str(p) for p in removed)}")

    def _out_dir(self, trainer: "pl.Trainer", info: Mapping[str, Any]) -> Path:
        return self.out_dir or Path(trainer.default_root_dir) / str(info["method"])

    @override
    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._elapsed = self.elapsed_seconds
        self._started_at = None
        if not trainer.is_global_zero:
            return
        module = _observed(pl_module)
        rows = module.stream_results()
        if not rows:
            rank_zero_warn(f"{type(self).__name__}: the stream has no finished domains; no results were written.")
            return
        info = dict(module.run_info())
        info.update(seconds=self._elapsed, **self._peak_memory())
        paths = write_results(rows, info, self._out_dir(trainer, info), plot=self.plot, prefix=self.filename_prefix)
        if self.table:
            self._print_table(rows, info)
        skipped = sum(_normalise_row(row, i)["skipped_batches"] for i, row in enumerate(rows))
        if skipped:
            rank_zero_warn(
                f"{info['method']} rolled back its adaptation on {skipped} batch(es) of this stream (column "
                "skipped_batches of the results): those batches were predicted but not adapted on"
            )
        rank_zero_info(f"{type(self).__name__}: wrote {', '.join(str(p) for p in paths.values())}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_seconds": self.elapsed_seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed = float(state_dict["elapsed_seconds"])
        self._started_at = None

    def _peak_memory(self) -> dict[str, Any]:
        if self._cuda_device is not None:
            peak = torch.cuda.max_memory_allocated(self._cuda_device) / 2**20
            return {"peak_memory_mb": peak, "memory_kind": "cuda_allocated"}
        return {"peak_memory_mb": _peak_rss_mb(), "memory_kind": "cpu_max_rss"}

    @staticmethod
    def _print_table(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        table_rows = [_normalise_row(row, i) for i, row in enumerate(rows)]
        skipped = sum(row["skipped_batches"] for row in table_rows)
        table = Table(title=f"{info['method']} · {info['model']} · {info['bits']}")
        table.add_column("domain")
        columns = ("acc1", "acc5", "n", "skipped") if skipped else ("acc1", "acc5", "n")
        for name in columns:
            table.add_column(name, justify="right", style="bold red" if name == "skipped" else None)
        for i, row in enumerate(table_rows):
            cells = [row["domain"], f"{row['acc1']:.2f}", f"{row['acc5']:.2f}", str(row["n"])]
            table.add_row(*cells, *([str(row["skipped_batches"])] if skipped else []), end_section=i == len(rows) - 1)
        total = [
            "mean",
            f"{_mean([row['acc1'] for row in table_rows]):.2f}",
            f"{_mean([row['acc5'] for row in table_rows]):.2f}",
            str(sum(row["n"] for row in table_rows)),
        ]
        table.add_row(*total, *([str(skipped)] if skipped else []), style="bold")
        if skipped:
            table.caption = f"{skipped} batch(es) rolled back: predicted, not adapted on (see skipped_batches)"
        Console().print(table)
