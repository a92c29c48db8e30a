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
import os
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from callbacks.adaptation_monitor import AdaptationMonitor
from zoa_lightning.core.protocols import AdaptationModule, missing_members
from zoa_lightning.files import checksum_path, publish_verified
from zoa_lightning.loop import StreamCallback
from zoa_lightning.run_folder import claim_run_folder, release_run_folder

__all__ = ["StreamCheckpoint"]

log = logging.getLogger(__name__)


class StreamCheckpoint(StreamCallback):
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
        self._saved = False  # whether this run wrote its checkpoint yet
        self._claimed: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def run_folder(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """The folder the checkpoint goes into."""
        return self.checkpoint_path(trainer, pl_module).parent

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
        self._saved = False
        if stage == "test" and trainer.is_global_zero:  # writable, and no other run writing into it: before any work
            self._claimed = claim_run_folder(self.run_folder(trainer, pl_module))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._claimed is not None:
            release_run_folder(self._claimed)
            self._claimed = None

    @override
    def on_domain_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        self.save(trainer, pl_module, dataloader_idx)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int = 0) -> Path:
        """Write the checkpoint now (every process must call it under DDP); returns its path.

        The event history of every :class:`~callbacks.AdaptationMonitor` is brought up to date first, so the file
        holds the last batch's events whichever callback runs first. The file is written beside its final name, then
        renamed over it with its checksum written next to it (``<name>.sha256``), which a resume verifies. A fresh
        run's first checkpoint keeps an earlier run's file at that name as ``<stem>.previous.ckpt`` instead of
        overwriting it.
        """
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, AdaptationMonitor):
                callback.collect_events(pl_module, dataloader_idx)
        path = self.checkpoint_path(trainer, pl_module)
        written = path.with_name(f".{path.name}.writing")
        trainer.save_checkpoint(str(written), weights_only=False)  # only global rank zero writes
        if trainer.is_global_zero:
            if not self._saved and trainer.ckpt_path is None and path.is_file():
                previous = path.with_name(f"{path.stem}.previous{path.suffix}")
                for old, new in ((path, previous), (checksum_path(path), checksum_path(previous))):
                    if old.is_file():
                        os.replace(old, new)
                rank_zero_info(f"kept the earlier run's stream checkpoint {path} as {previous}")
            publish_verified(written, path)
        self._saved = True
        log.info("stream checkpoint written to %s", path)
        return path
