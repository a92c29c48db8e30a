"""Two small ZOA policies: what a detected domain shift does to the bank, and how a batch is predicted unadapted.

* :func:`on_shift`: a shift seen in the prediction pass stores the current knowledge (spec §5.3); one seen in a
  perturbed pass never does (spec §5.7). Either way it becomes an event and is counted.
* :class:`UnadaptedPredictions`: a one-image batch has no batch statistics for the loss and the detector, so it is
  predicted with the current parameters and not adapted on; a rolled-back batch whose prediction is not finite is
  predicted by the network with its pretrained parameters.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.counters import Counters

__all__ = ["UnadaptedPredictions", "on_shift"]

log = logging.getLogger(__name__)


def on_shift(bank: KnowledgeBank, counters: Counters, perturbed: bool, store: bool) -> dict[str, Any]:
    """Act on a detected domain shift and return its event record.

    Args:
        bank: the knowledge bank.
        counters: the adapter's counters (``batches``, ``stores``, ``evictions``, ``perturbed_detections``).
        perturbed: the shift was seen in a perturbed pass (spec §5.7: nothing is stored).
        store: whether the bank is in use (``config.use_bank``).

    Returns:
        ``{"event": "shift" | "perturbed_detection", "batch": ...}`` plus the store's record when it stored.
    """
    event: dict[str, Any] = {"event": "shift", "batch": counters["batches"]}
    if perturbed:
        counters.add("perturbed_detections")
        log.warning("domain shift detected in a perturbed pass: not stored (spec §5.7)")
        event["event"] = "perturbed_detection"
    elif store:
        stored = bank.store()
        counters.add("stores")
        counters.add("evictions", int(bool(stored["evicted"])))
        event.update(stored)
        log.info("domain shift at batch %d: stored knowledge entry (%s)", event["batch"], stored)
    return event


class UnadaptedPredictions:
    """Predictions without adaptation, each counted as a forward pass.

    Args:
        model: the wrapped network.
        bank: its knowledge bank (for the pretrained parameters).
        counters: the adapter's counters (``forward_passes``, ``unadapted_batches``, ``batches``).
        predict: the adapter's prediction with the current parameters and shift (touches no state).
    """

    def __init__(
        self, model: nn.Module, bank: KnowledgeBank, counters: Counters, predict: Callable[[Tensor], Tensor]
    ) -> None:
        self._model, self._bank, self._counters, self._predict = model, bank, counters, predict
        self._warned = False

    def pretrained(self, images: Tensor) -> Tensor:
        """Logits of the network with its pretrained norm parameters and no shift (one counted forward pass)."""
        with torch.no_grad(), self._bank.pretrained():
            logits = self._model(images)
        self._counters.add("forward_passes")
        return logits

    def single(self, images: Tensor) -> Tensor:
        """A one-image batch: predict with the current parameters and shift (one pass), adapt on nothing.

        Raises:
            ValueError: if the network cannot normalise one image (a BatchNorm layer seeing one value per channel).
        """
        if not self._warned:
            self._warned = True
            warnings.warn(
                "ZOA got a batch of one image: its loss and domain detector need batch statistics, so such batches are "
                "predicted with the current parameters and not adapted on (counted in unadapted_batches); use a batch "
                "size whose last batch has at least 2 images", RuntimeWarning, stacklevel=3,
            )  # fmt: skip
        try:
            logits = self._predict(images)
        except ValueError as error:  # torch's batch_norm refuses one value per channel (a 1×1 map of one image)
            raise ValueError(
                "this network cannot predict a batch of one image: ZOA normalises its BatchNorm layers with batch "
                f"statistics and one of them sees a single value per channel ({error}). Use a batch size whose last "
                "batch has at least 2 images"
            ) from error
        self._counters.add("forward_passes")
        logits = logits if bool(torch.isfinite(logits).all()) else self.pretrained(images)
        self._counters.add("unadapted_batches")
        self._counters.add("batches")
        return logits
