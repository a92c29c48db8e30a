"""Write a resumable stream checkpoint after every domain.

:class:`StreamCheckpoint` calls ``trainer.save_checkpoint`` when a domain ends (``ModelCheckpoint`` is idle during
``trainer.test``). The file holds the whole adaptation state (the bank's stored deltas, logits, epsilons, detector and
activation-shift statistics, the perturbation generator: they are buffers of the module), the stream position and the
finished domains' results, and the callbacks' states (e.g. :class:`~callbacks.AdaptationMonitor`'s event history).
``trainer.test(model, datamodule=dm, ckpt_path=".../stream-last.ckpt")`` (or ``zoa test ... --ckpt_path``) continues
the stream where it stopped, bit-identically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.adaptation_monitor import AdaptationMonitor
from zoa_lightning.core.protocols import AdaptationModule, missing_members
from zoa_lightning.loop import is_last_batch_of_domain

__all__ = ["StreamCheckpoint"]

log = logging.getLogger(__name__)


class StreamCheckpoint(Callback):
    """Save a resumable stream checkpoint after every domain, overwriting the previous one.

    Args:
        dirpath: folder of the checkpoint; ``None`` means the run folder ``<trainer.default_root_dir>/<method>``
            (e.g. ``runs/demo/zoa``, next to the results).
        filename: checkpoint file name; must end with ``.ckpt``.

    Raises:
        ValueError: if ``filename`` does not end with ``.ckpt``.
        TypeError: in ``setup``, if the module is no stream module (it lacks the adaptation protocol).

    Example::

        trainer = Trainer(inference_mode=False, callbacks=[AdaptationMonitor(), StreamCheckpoint(dirpath="runs/demo")])
        trainer.test(module, datamodule=dm)                                  # interrupted after k domains
        trainer.test(module, datamodule=dm, ckpt_path="runs/demo/stream-last.ckpt")  # continues at domain k
    """

    def __init__(self, dirpath: str | None = None, filename: str = "stream-last.ckpt") -> None:
        if not filename.endswith(".ckpt"):
            raise ValueError(f"filename must end with .ckpt, got {filename!r}: e.g. filename='stream-last.ckpt'")
        self.dirpath = dirpath
        self.filename = filename

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def checkpoint_path(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Where the checkpoint is written: ``<dirpath>/<filename>``, by default in the run folder."""
        folder = self.dirpath or str(Path(trainer.default_root_dir) / cast(AdaptationModule, pl_module).run_name)
        return Path(folder) / self.filename

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test" and not isinstance(pl_module, AdaptationModule):
            raise TypeError(
                f"{type(self).__name__} needs a stream module (e.g. ZOAModule); {type(pl_module).__name__} lacks "
                f"{missing_members(pl_module, AdaptationModule)}"
            )

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
        if is_last_batch_of_domain(trainer, batch_idx, dataloader_idx):
            self.save(trainer, pl_module, dataloader_idx)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int = 0) -> Path:
        """Write the checkpoint now (every process must call it under DDP); returns its path.

        The event history of every :class:`~callbacks.AdaptationMonitor` is brought up to date first, so the file
        holds the last batch's events whichever callback runs first.
        """
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, AdaptationMonitor):
                callback.collect_events(pl_module, dataloader_idx)
        path = self.checkpoint_path(trainer, pl_module)
        trainer.save_checkpoint(str(path), weights_only=False)
        log.info("stream checkpoint written to %s", path)
        return path
