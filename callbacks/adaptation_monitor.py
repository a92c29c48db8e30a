"""Report and log what the adaptation does: knowledge-bank events, mixing weights, rolled-back batches, losses.

:class:`AdaptationMonitor` drains the module's adaptation events after every batch (knowledge stores, evictions,
detections in a perturbed pass), keeps them as its checkpointed history and reports them, and sends the bank and
adaptation metrics to the trainer's loggers (``CSVLogger``, ``TensorBoardLogger``, ...) with the stream's global batch
index as the step, so the curves continue across domains and across a resume. Without a logger it only reports.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from zoa_lightning.core.protocols import AdaptationModule, missing_members
from zoa_lightning.loop import is_last_batch_of_domain

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

#: State keys under which earlier versions stored this callback's history: ``DomainBankCallback[dirpath=...,...]``.
_LEGACY_KEY = re.compile(r"^DomainBankCallback\[.*\]$")
#: Lightning's warning about checkpoint callback states no callback claims, when the only ones are states this
#: callback maps (an earlier version's ``DomainBankCallback`` or this class's own key read by the alias).
_MAPPED_STATES_WARNING = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided.*"
    r"Please add the following callbacks: \[('(DomainBankCallback\[[^']*\]|AdaptationMonitor)'(, )?)+\]\.$"
)


class AdaptationMonitor(Callback):
    """Report knowledge-bank events and log the bank and adaptation metrics after every batch.

    After every test batch the callback takes the module's new adaptation events (a stream module implementing
    :class:`~zoa_lightning.core.protocols.AdaptationModule`) into its history, which a stream checkpoint stores, and
    logs to every logger of the trainer, at step = the batch's index in the whole stream:

    * ``stream/domain``: the domain index;
    * ``bank/entries``, ``bank/mixing_entropy``, ``bank/largest_weight``: the knowledge bank's stored entries and its
      current mixing weights (methods with a bank only);
    * ``bank/shifts``, ``bank/stores``, ``bank/evictions``, ``bank/perturbed_detections``: cumulative event counts;
    * ``adapt/skipped_batches``: batches whose adaptation was rolled back so far;
    * ``adapt/<name>``: the last batch's loss values, if the module's adapter reports them as ``last_losses``: a
      mapping of names to numbers, a sequence (ZOA's ``(L0, L+)`` as ``adapt/loss_0``, ``adapt/loss_1``) or one
      number (``adapt/loss``).

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
        # This callback maps an earlier version's state itself (see on_load_checkpoint): Lightning's warning that
        # the checkpoint holds the state of a callback missing from this run would be wrong for exactly that state.
        warnings.filterwarnings("ignore", message=_MAPPED_STATES_WARNING)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Batches of the domains a resumed run already finished: the steps continue where the checkpoint stopped.
        finished = getattr(pl_module, "stream_results", None)
        self._batch = sum(int(row.get("batches", 0)) for row in finished()) if callable(finished) else 0

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
        self.collect_events(pl_module, dataloader_idx)
        if self.log_metrics and trainer.loggers:
            metrics = self.metrics(pl_module, dataloader_idx)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self._batch)
        self._batch += 1
        if is_last_batch_of_domain(trainer, batch_idx, dataloader_idx) and self.log_mixing_weights:
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
        for event in _observed(pl_module).pop_adaptation_events():
            event = {**event, "domain_index": getattr(pl_module, "start_domain", 0) + dataloader_idx}
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
        metrics: dict[str, float] = {"stream/domain": float(getattr(pl_module, "start_domain", 0) + dataloader_idx)}
        weights = _observed(pl_module).mixing_weights()
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
        skipped = getattr(pl_module, "skipped_batches", None)
        if callable(skipped):
            metrics["adapt/skipped_batches"] = float(skipped())
        metrics.update(_loss_metrics(getattr(getattr(pl_module, "adapter", None), "last_losses", None)))
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

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Take the history from an earlier version's ``DomainBankCallback[...]`` state if the file has none of ours.

        Lightning calls ``load_state_dict`` afterwards only with a state under this callback's own key, so a stream
        checkpoint written before the callback was split resumes with its full event history.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        mapped = [key for key in states if _maps_from(key) and key != self.state_key]
        if not mapped:
            return
        if len(mapped) > 1:
            log.warning(
                "the checkpoint holds %d bank histories (%s); %s continues the first", len(mapped), mapped, self
            )
        self.load_state_dict(states[mapped[0]])


def _observed(pl_module: pl.LightningModule) -> AdaptationModule:
    """The module as an :class:`~zoa_lightning.core.protocols.AdaptationModule` (checked in ``setup``)."""
    return cast(AdaptationModule, pl_module)


def _maps_from(key: Any) -> bool:
    """Whether checkpoint callback state ``key`` holds an adaptation history this callback can continue."""
    return isinstance(key, str) and (key == AdaptationMonitor.__qualname__ or bool(_LEGACY_KEY.match(key)))


def _loss_metrics(losses: Any) -> dict[str, float]:
    """``adapt/<name>`` for an adapter's last loss values.

    A mapping gives its names; a sequence (e.g. ZOA's ``(L0, L+)``) ``loss_0``, ``loss_1``, ...; one number ``loss``.
    Values that are not numbers are left out.
    """
    if losses is None:
        return {}
    if isinstance(losses, Mapping):
        items = [(str(name), value) for name, value in losses.items()]
    elif isinstance(losses, list | tuple):
        items = [(f"loss_{i}", value) for i, value in enumerate(losses)]
    else:
        items = [("loss", losses)]
    metrics = {}
    for name, value in items:
        try:
            metrics[f"adapt/{name}"] = float(value.detach().item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            continue  # not a number (e.g. a tensor of several values): not a loss value to log
    return metrics


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
