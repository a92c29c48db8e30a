"""``DomainBankCallback``: the earlier single callback for bank events and stream checkpoints, kept for old configs.

New configs list the two callbacks it combined, each named for what it does: :class:`~callbacks.AdaptationMonitor`
(bank events and metrics) and :class:`~callbacks.StreamCheckpoint` (the resumable checkpoint after every domain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from callbacks.adaptation_monitor import AdaptationMonitor
from callbacks.stream_checkpoint import StreamCheckpoint
from zoa_lightning.loop import is_last_batch_of_domain

__all__ = ["DomainBankCallback"]


class DomainBankCallback(AdaptationMonitor):
    """:class:`~callbacks.AdaptationMonitor` and :class:`~callbacks.StreamCheckpoint` in one, as before the split.

    Kept so that configs and scripts naming ``callbacks.DomainBankCallback`` keep working, with the same arguments,
    the same files and the same checkpoint state key (``DomainBankCallback[dirpath=...,filename=...]``, the event
    history). A stream checkpoint written by either form resumes with either form. New configs list
    ``callbacks.AdaptationMonitor`` and ``callbacks.StreamCheckpoint`` instead.

    Args:
        dirpath: folder for the stream checkpoint (overwritten after every domain); ``None`` means
            ``<trainer.default_root_dir>/<method>``.
        filename: checkpoint file name.
        save: write the stream checkpoint at all.
        log_mixing_weights: print the mixing weights' entropy and largest weight after every domain.
        verbose: also report every event with ``rank_zero_info``.
        log_metrics: send the bank and adaptation metrics to the trainer's loggers (see ``AdaptationMonitor``).

    Raises:
        ValueError: if ``filename`` does not end with ``.ckpt``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "stream-last.ckpt",
        save: bool = True,
        log_mixing_weights: bool = True,
        verbose: bool = True,
        log_metrics: bool = True,
    ) -> None:
        super().__init__(log_metrics=log_metrics, log_mixing_weights=log_mixing_weights, verbose=verbose)
        self.checkpoint = StreamCheckpoint(dirpath, filename)
        self.save = save

    @property
    def dirpath(self) -> str | None:
        """Folder of the stream checkpoint (``None``: the run folder)."""
        return self.checkpoint.dirpath

    @property
    def filename(self) -> str:
        """File name of the stream checkpoint."""
        return self.checkpoint.filename

    @property
    @override
    def state_key(self) -> str:
        return f"DomainBankCallback[dirpath={self.dirpath},filename={self.filename}]"

    def checkpoint_path(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Where the stream checkpoint is written, or ``None`` if saving is off."""
        return self.checkpoint.checkpoint_path(trainer, pl_module) if self.save else None

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.save and is_last_batch_of_domain(trainer, batch_idx, dataloader_idx):
            self.checkpoint.save(trainer, pl_module, dataloader_idx)
