"""Report ZOA's domain knowledge bank and checkpoint the stream so it can be resumed.

After every batch the callback drains the module's adaptation events (knowledge stores, evictions, detections in a
perturbed pass) and reports them; at the end of every domain it logs the mixing weights and, if ``dirpath`` is set,
writes a stream checkpoint (``trainer.save_checkpoint``). That checkpoint holds the whole adaptation state (the bank's
stored deltas, logits, epsilons, detector and activation-shift statistics, the perturbation generator: they are
buffers of the module), the stream position and the finished domains' results, and this callback's event history.
``trainer.test(model, datamodule=dm, ckpt_path=".../stream-last.ckpt")`` (or ``zoa test ... --ckpt_path``) continues
the stream where it stopped, bit-identically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from zoa_lightning.core.protocols import AdaptationModule, missing_members
from zoa_lightning.stream import is_last_batch_of_domain

__all__ = ["DomainBankCallback"]

log = logging.getLogger(__name__)


class DomainBankCallback(Callback):
    """Log knowledge-bank events and save a resumable stream checkpoint after every domain.

    Args:
        dirpath: folder for the stream checkpoint (overwritten after every domain); ``None`` means
            ``<trainer.default_root_dir>/<method>``.
        save: write the stream checkpoint at all.
        filename: checkpoint file name.
        log_mixing_weights: log the mixing weights' entropy and largest weight after every domain.
        verbose: also report every event with ``rank_zero_info``.

    Example::

        trainer = Trainer(inference_mode=False, callbacks=[DomainBankCallback(dirpath="runs/demo")])
        trainer.test(module, datamodule=dm)                                  # interrupted after k domains
        trainer.test(module, datamodule=dm, ckpt_path="runs/demo/stream-last.ckpt")  # continues at domain k
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "stream-last.ckpt",
        save: bool = True,
        log_mixing_weights: bool = True,
        verbose: bool = True,
    ) -> None:
        if not filename.endswith(".ckpt"):
            raise ValueError(f"filename must end with .ckpt, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.save = save
        self.log_mixing_weights = log_mixing_weights
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        """Unique per checkpoint location, so several instances can coexist."""
        return f"DomainBankCallback[dirpath={self.dirpath},filename={self.filename}]"

    def checkpoint_path(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Where the stream checkpoint is written, or ``None`` if saving is off."""
        if not self.save:
            return None
        folder = self.dirpath or str(Path(trainer.default_root_dir) / getattr(pl_module, "run_name", "run"))
        return Path(folder) / self.filename

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test" and not isinstance(pl_module, AdaptationModule):
            raise TypeError(
                f"DomainBankCallback needs a stream module (e.g. ZOAModule); {type(pl_module).__name__} lacks "
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
        for event in pl_module.pop_adaptation_events():  # type: ignore[attr-defined]
            event = {**event, "domain_index": getattr(pl_module, "start_domain", 0) + dataloader_idx}
            self.history.append(event)
            if self.verbose:
                rank_zero_info(f"knowledge bank: {_describe(event)}")
        if is_last_batch_of_domain(trainer, batch_idx, dataloader_idx):
            self._end_domain(trainer, pl_module)

    def _end_domain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = pl_module.mixing_weights()  # type: ignore[attr-defined]
        if self.log_mixing_weights and weights is not None and weights.numel() > 0:
            entropy = max(0.0, float(-(weights * weights.clamp_min(1e-12).log()).sum()))  # no "-0.000"
            rank_zero_info(
                f"knowledge bank: {weights.numel() - 1} stored entries, largest mixing weight "
                f"{float(weights.max()):.3f}, mixing entropy {entropy:.3f}"
            )
        path = self.checkpoint_path(trainer, pl_module)
        if path is not None:
            trainer.save_checkpoint(str(path), weights_only=False)
            log.info("stream checkpoint written to %s", path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(e) for e in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict.get("history", [])]


def _describe(event: dict[str, Any]) -> str:
    kind = event.get("event", "?")
    if kind == "shift" and "entries" in event:
        evicted = f", evicted entry {event['evicted']}" if event.get("evicted") else ""
        return (
            f"domain shift at batch {event['batch']}: stored entry {event['entries'] - 1} "
            f"(scale factor {event['scale_factor']:.2f}, initial logit {event['alpha_new']:.3f}{evicted})"
        )
    if kind == "shift":
        return f"domain shift at batch {event['batch']} (bank disabled: nothing stored)"
    return f"{kind} at batch {event.get('batch')}"
