"""Report a test-time adaptation stream at the end of ``trainer.test``.

:class:`ResultsCallback` reads the finished (round, corruption) domains from a stream module (a LightningModule
implementing :class:`~zoa_lightning.core.protocols.ResultsModule`), measures wall time and peak memory itself, and
writes ``results.json``, ``results.csv`` and ``accuracy.png`` (rank zero only), then prints a rich table. The schema,
the writers, the table and the plot live in :mod:`zoa_lightning.reporting` (no Lightning), which ``zoa compare`` uses
too; this module only wires them to the test hooks.
"""

import json
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from zoa_lightning.core.protocols import FingerprintedModule, ResultsModule, missing_members
from zoa_lightning.reporting import RUN_COLUMNS, DomainRow, results_table, write_results
from zoa_lightning.run_folder import claim_run_folder, release_run_folder

__all__ = ["ResultsCallback"]


def _observed(pl_module: "pl.LightningModule") -> ResultsModule:
    """The module as an :class:`~zoa_lightning.core.protocols.ResultsModule` (checked in ``setup``)."""
    return cast(ResultsModule, pl_module)


def _recorded_fingerprint(path: Path) -> Any:
    """The ``fingerprint`` a ``results.json`` records (``None`` if none or unreadable)."""
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class ResultsCallback(Callback):
    """Report the domain stream of ``trainer.test``: JSON, CSV, accuracy plot and a rich table.

    The observed LightningModule must report its stream (:class:`~zoa_lightning.core.protocols.ResultsModule`). At
    ``on_test_end`` the callback reads its finished domains and, on global rank zero, writes ``<prefix>results.json``
    (summary and per-domain rows), ``<prefix>results.csv`` (one row per domain plus the run-constant ``method``,
    ``model``, ``bits`` columns) and ``<prefix>accuracy.png`` into ``out_dir``, overwriting earlier files. The mean is
    unweighted over domain entries. It measures the wall time from ``on_test_start`` to ``on_test_end`` (accumulated
    across a checkpoint resume through its state) and peak memory: ``torch.cuda.max_memory_allocated`` since
    ``on_test_start`` on CUDA (``memory_kind="cuda_allocated"``), otherwise the process's lifetime peak RSS
    (``"cpu_max_rss"``), in MiB.

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
        TypeError: In ``setup``, if the LightningModule is no stream module (it lacks
            :class:`~zoa_lightning.core.protocols.ResultsModule`).

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
        self._claimed: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=str(self.out_dir), filename_prefix=self.filename_prefix)

    @property
    def elapsed_seconds(self) -> float:
        """Wall seconds spent in test so far, including time restored from a checkpoint."""
        running = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        return self._elapsed + running

    def run_folder(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Path:
        """Where the result files go: ``out_dir``, or ``<trainer.default_root_dir>/<method>``."""
        return self._out_dir(trainer, _observed(pl_module).run_info())

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not isinstance(pl_module, ResultsModule):
            raise TypeError(
                f"{type(self).__name__} needs a stream module (e.g. ZOAModule); {type(pl_module).__name__} lacks "
                f"{missing_members(pl_module, ResultsModule)}"
            )
        if stage == "test":
            # A fresh test starts at zero; a checkpoint restore calls `load_state_dict` after this, before the start.
            self._elapsed = 0.0
            self._started_at = None
            if trainer.is_global_zero:  # writable, and no other run writing into it: checked before any work
                self._claimed = claim_run_folder(self.run_folder(trainer, pl_module))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "test" and trainer.is_global_zero and trainer.ckpt_path and sum(trainer.num_test_batches) == 0:
            self._write_finished_stream(trainer, pl_module)
        if self._claimed is not None:
            release_run_folder(self._claimed)
            self._claimed = None

    def _write_finished_stream(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A resumed stream that was already finished: write its results if the folder lacks them.

        Results already there that record this run's fingerprint are left as they are; missing ones, or another
        run's, are written from the checkpoint's finished domains (a run killed between its last checkpoint and its
        results, or an earlier run's results beside a later run's checkpoint).
        """
        module = _observed(pl_module)
        rows = module.stream_results()
        if not rows:
            return
        fingerprint = module.stream_fingerprint() if isinstance(module, FingerprintedModule) else None
        info = dict(module.run_info())
        path = self._out_dir(trainer, info) / f"{self.filename_prefix}results.json"
        if path.is_file() and _recorded_fingerprint(path) == fingerprint:
            return
        info.update(seconds=self._elapsed, **self._peak_memory())
        paths = write_results(
            rows, info, path.parent, plot=self.plot, prefix=self.filename_prefix, fingerprint=fingerprint
        )
        rank_zero_info(
            f"{type(self).__name__}: wrote the finished stream's {', '.join(str(p) for p in paths.values())}"
        )

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
        fingerprint = module.stream_fingerprint() if isinstance(module, FingerprintedModule) else None
        out_dir = self._out_dir(trainer, info)
        paths = write_results(rows, info, out_dir, plot=self.plot, prefix=self.filename_prefix, fingerprint=fingerprint)
        if self.table:
            from rich.console import Console

            Console().print(results_table(rows, info))
        skipped = sum(DomainRow.from_mapping(row, i).skipped_batches for i, row in enumerate(rows))
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
