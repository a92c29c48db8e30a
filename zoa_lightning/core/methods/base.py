"""The one base of every method's pure-torch adapter, ZOA's engine included: the network, named counters, state.

A method's adapter is called on a batch of images and returns the logits it predicts for them, adapting on the batch
as the method does. :class:`Adapter` gives every method the same shape:

* it owns the network as its ``model`` (a stream module registers the adapter as its child ``adapter``, so the whole
  state, network included, is checkpointed under ``adapter.*``) and keeps it in eval mode;
* named run counters (:class:`~zoa_lightning.core.counters.Counters`, at least ``batches`` and ``forward_passes``) in
  the ``state_dict``, so a resumed run continues its counts;
* what the stream module reads from every method: :attr:`forward_passes`, :attr:`passes_per_batch`,
  :attr:`skipped_batches`, :attr:`last_losses`, :meth:`run_info` and :attr:`requires_autograd`, each with the
  plain default a method that has nothing to say keeps;

Optional capabilities stay protocols of :mod:`zoa_lightning.core.protocols`: collecting source statistics
(:class:`~zoa_lightning.core.protocols.SourceStatisticsAdapter`) and a knowledge bank
(:class:`~zoa_lightning.core.protocols.BankAdapter`).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch
from torch import nn

from zoa_lightning.core.counters import Counters

__all__ = ["Adapter", "device_of"]


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); the CPU for a module without tensors."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class Adapter(nn.Module):
    """Base of every method's adapter: ``adapter(images) -> logits``, counting what it spends.

    A subclass calls ``super().__init__(model)`` first, sets :attr:`COUNTERS` if it counts more than batches and
    forward passes, implements ``forward(images) -> logits`` (adding to ``counters`` what the batch cost) and overrides
    :attr:`passes_per_batch` if a batch costs more than one forward pass.

    Args:
        model: the network (quantized or not); put in eval mode and kept there whatever :meth:`train` is asked.

    Example:
        >>> class Twice(Adapter):
        ...     @property
        ...     def passes_per_batch(self) -> int:
        ...         return 2
        ...
        ...     def forward(self, images: Tensor) -> Tensor:
        ...         self.counters.add("batches")
        ...         self.counters.add("forward_passes", 2)
        ...         return self.model(images) + self.model(images)
        >>> adapter = Twice(nn.Linear(4, 3))
        >>> _ = adapter(torch.zeros(2, 4))
        >>> adapter.forward_passes, adapter.batches, sorted(k for k in adapter.state_dict() if "counters" in k)
        (2, 1, ['counters.batches', 'counters.forward_passes'])
    """

    COUNTERS: ClassVar[tuple[str, ...]] = ("batches", "forward_passes")
    """Names of the run counters (``batches`` and ``forward_passes`` at least)."""
    model: nn.Module
    counters: Counters
    last_losses: tuple[float, ...] = ()
    """The last batch's loss values, for the loggers (ZOA: ``(L0, L+)``); empty for a method without a loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.counters = Counters(self.COUNTERS, device_of(model))

    @property
    def passes_per_batch(self) -> int:
        """Forward passes a (full) batch costs with this adapter's settings; one unless a method says otherwise."""
        return 1

    @property
    def requires_autograd(self) -> bool:
        """Whether the method back-propagates: a stream module then refuses to run it under inference mode."""
        return False

    def counter(self, name: str) -> int:
        """Value of a run counter (one of :attr:`COUNTERS`)."""
        return self.counters[name]

    @property
    def batches(self) -> int:
        """Batches processed."""
        return self.counters["batches"]

    @property
    def forward_passes(self) -> int:
        """Forward passes of the network so far (rolled-back batches included)."""
        return self.counters["forward_passes"]

    @property
    def skipped_batches(self) -> int:
        """Batches predicted but not adapted on (a rolled-back or skipped update); 0 for a method that never skips."""
        return self.counters["skipped_batches"] if "skipped_batches" in self.counters.names else 0

    def run_info(self) -> dict[str, Any]:
        """Plain values the method adds to the run's summary (none by default)."""
        return {}

    def adaptation_state_dict(self) -> dict[str, Any]:
        """Everything the adapter changes, without the frozen network weights (what a stream checkpoint needs)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load an :meth:`adaptation_state_dict`; the frozen network weights are left as they are."""
        network = {k: v for k, v in self.state_dict().items() if k.startswith("model.")}
        self.load_state_dict({**network, **state})

    def train(self, mode: bool = True) -> Adapter:
        """Set the module mode; the wrapped network stays in eval mode (adapters do not depend on it)."""
        super().train(mode)
        self.model.eval()
        return self
