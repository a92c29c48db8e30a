"""Report and log what the adaptation does: knowledge-bank events, mixing weights, rolled-back batches, losses.

:class:`AdaptationMonitor` drains the module's adaptation events after every batch (knowledge stores, evictions,
detections in a perturbed pass), keeps them as its checkpointed history and reports them, and sends the bank and
adaptation metrics to the trainer's loggers (``CSVLogger``, ``TensorBoardLogger``, ...) with the stream's global batch
index as the step, so the curves continue across domains and across a resume. Without a logger it only reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from zoa_lightning.core.protocols import AdaptationModule, missing_members
from zoa_lightning.loop import StreamCallback

__all__ = ["METRIC_NAMES", "AdaptationMonitor"]

log = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "stream/domain",
    "bank/entries",
    "bank/mixing_entropy",
    "bank/largest_weight",
    "bank/shifts",
    "bank/stores",
    "bank/evictions",
    "bank/perturbed_detections",
    "adapt/skipped_batches",
)
"""Metrics logged after every batch (the bank's only for a method with a knowledge bank), plus ``adapt/<loss>`` for
every loss value the adapter reports in ``last_losses`` (e.g. ``adapt/loss_0`` and ``adapt/loss_1``: ZOA's L0, L+)."""


class AdaptationMonitor(StreamCallback):
    """Report knowledge-bank events and log the bank and adaptation metrics after every batch.

    After every test batch the callback takes the module's new adaptation events (a stream module implementing
    :class:`~zoa_lightning.core.protocols.AdaptationModule`) into its history, which a stream checkpoint stores, and
    logs to every logger of the trainer, at step = the batch's index in the whole stream:

    * ``stream/domain``: the domain index;
    * ``bank/entries``, ``bank/mixing_entropy``, ``bank/largest_weight``: the knowledge bank's stored entries and its
      current mixing weights (methods with a bank only);
    * ``bank/shifts``, ``bank/stores``, ``bank/evictions``, ``bank/perturbed_detections``: cumulative event counts;
    * ``adapt/skipped_batches``: batches whose adaptation was rolled back so far;
    * ``adapt/loss_<i>``: the last batch's loss values, if the method reports any (ZOA's ``(L0, L+)`` as
      ``adapt/loss_0``, ``adapt/loss_1``).

    At the end of every domain it prints the bank's size, largest mixing weight and mixing entropy.

    Args:
        log_metrics: send the metrics above to the trainer's loggers (nothing is sent without a logger).
        log_mixing_weights: print the bank's size, largest mixing weight and mixing entropy after every domain.
        verbose: also report every event with ``rank_zero_info``.

    Raises:
        TypeError: in ``setup``, if the module does not implement ``AdaptationModule``.

    Example::

        trainer = Trainer(
            inference_mode=False,
            logger=CSVLogger("runs/demo", name="logs"),
            callbacks=[AdaptationMonitor(), StreamCheckpoint()],  # the monitor first: its history goes into the file
        )
        trainer.test(ZOAModule(network="demo_vit"), datamodule=CorruptionStreamDataModule())
    """

    def __init__(self, log_metrics: bool = True, log_mixing_weights: bool = True, verbose: bool = True) -> None:
        self.log_metrics = log_metrics
        self.log_mixing_weights = log_mixing_weights
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []
        self._batch = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        if not isinstance(pl_module, AdaptationModule):
            raise TypeError(
                f"{type(self).__name__} needs a stream module (e.g. ZOAModule); {type(pl_module).__name__} lacks "
                f"{missing_members(pl_module, AdaptationModule)}"
            )

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Batches of the domains a resumed run already finished: the steps continue where the checkpoint stopped.
        self._batch = sum(int(row["batches"]) for row in _observed(pl_module).stream_results())

    @override
    def on_stream_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        self.collect_events(pl_module, dataloader_idx)
        if self.log_metrics and trainer.loggers:
            metrics = self.metrics(pl_module, dataloader_idx)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self._batch)
        self._batch += 1

    @override
    def on_domain_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        if self.log_mixing_weights:
            self._report_mixing_weights(pl_module)

    def collect_events(self, pl_module: pl.LightningModule, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Move the module's new adaptation events into :attr:`history`, reporting each if :attr:`verbose`.

        Called after every batch; :class:`~callbacks.StreamCheckpoint` calls it too before it writes the checkpoint,
        so the file holds every event whatever the order of the callbacks. Calling it twice for a batch is harmless.

        Args:
            pl_module: the stream module.
            dataloader_idx: the test loader of the batch (its domain, counted from the run's first domain).

        Returns:
            The new events, each with its ``domain_index``.
        """
        new = []
        module = _observed(pl_module)
        for event in module.pop_adaptation_events():
            event = {**event, "domain_index": module.start_domain + dataloader_idx}
            self.history.append(event)
            new.append(event)
            if self.verbose:
                rank_zero_info(f"knowledge bank: {_describe(event)}")
        return new

    def metrics(self, pl_module: pl.LightningModule, dataloader_idx: int = 0) -> dict[str, float]:
        """The metrics logged after a batch (see the class docstring), as plain floats.

        Args:
            pl_module: the stream module.
            dataloader_idx: the test loader of the batch.

        Returns:
            ``{name: value}``; bank metrics only for a method with a bank, losses only if the adapter reports them.
        """
        module = _observed(pl_module)
        metrics: dict[str, float] = {"stream/domain": float(module.start_domain + dataloader_idx)}
        weights = module.mixing_weights()
        if weights is not None and weights.numel() > 0:
            entropy, largest = self.mixing_statistics(weights)
            metrics.update(
                {
                    "bank/entries": float(weights.numel() - 1),
                    "bank/mixing_entropy": entropy,
                    "bank/largest_weight": largest,
                }
            )
        if weights is not None:
            shifts = [e for e in self.history if e.get("event") == "shift"]
            metrics.update(
                {
                    "bank/shifts": float(len(shifts)),
                    "bank/stores": float(sum("entries" in e for e in shifts)),
                    "bank/evictions": float(sum(bool(e.get("evicted")) for e in shifts)),
                    "bank/perturbed_detections": float(
                        sum(e.get("event") == "perturbed_detection" for e in self.history)
                    ),
                }
            )
        metrics["adapt/skipped_batches"] = float(module.skipped_batches())
        metrics.update(_loss_metrics(module.last_losses()))
        return metrics

    @staticmethod
    def mixing_statistics(weights: torch.Tensor) -> tuple[float, float]:
        """Entropy (nats, never ``-0.0``) and largest entry of the mixing weights ``weights`` (a probability vector).

        Example:
            >>> AdaptationMonitor.mixing_statistics(torch.tensor([0.5, 0.5]))
            (0.6931471824645996, 0.5)
        """
        entropy = max(0.0, float(-(weights * weights.clamp_min(1e-12).log()).sum()))
        return entropy, float(weights.max())

    def _report_mixing_weights(self, pl_module: pl.LightningModule) -> None:
        weights = _observed(pl_module).mixing_weights()
        if weights is None or weights.numel() == 0:
            return
        entropy, largest = self.mixing_statistics(weights)
        rank_zero_info(
            f"knowledge bank: {weights.numel() - 1} stored entries, largest mixing weight {largest:.3f}, "
            f"mixing entropy {entropy:.3f}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(e) for e in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict.get("history", [])]


def _observed(pl_module: pl.LightningModule) -> AdaptationModule:
    """The module as an :class:`~zoa_lightning.core.protocols.AdaptationModule` (checked in ``setup``)."""
    return cast(AdaptationModule, pl_module)


def _loss_metrics(losses: Sequence[float]) -> dict[str, float]:
    """``adapt/loss_<i>`` for an adapter's last loss values (e.g. ZOA's ``(L0, L+)``: ``loss_0``, ``loss_1``)."""
    return {f"adapt/loss_{i}": float(value) for i, value in enumerate(losses)}


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
