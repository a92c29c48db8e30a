"""Two small ZOA policies: what a detected domain shift does to the bank, and how a batch is predicted unadapted.

* :func:`on_shift`: a shift seen in the prediction pass stores the current knowledge (spec §5.3); one seen in a
  perturbed pass never does (spec §5.7). Either way it becomes an event and is counted.
* :class:`UnadaptedPredictions`: a rolled-back batch whose prediction is not finite is predicted by the network with
  its pretrained parameters.
"""

from __future__ import annotations

import logging
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
        counters: the adapter's counters (``forward_passes``).
    """

    def __init__(self, model: nn.Module, bank: KnowledgeBank, counters: Counters) -> None:
        self._model, self._bank, self._counters = model, bank, counters

    def pretrained(self, images: Tensor) -> Tensor:
        """Logits of the network with its pretrained norm parameters and no shift (one counted forward pass)."""
        with torch.no_grad(), self._bank.pretrained():
            logits = self._model(images)
        self._counters.add("forward_passes")
        return logits
