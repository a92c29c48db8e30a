"""``no_adapt``: the network as it is, one forward pass per batch (the reference every method is compared with)."""

from __future__ import annotations

from torch import Tensor

from zoa_lightning.core.methods.base import Adapter

__all__ = ["NoAdapt"]


class NoAdapt(Adapter):
    """Predict with the network unchanged: eval mode, one forward pass per batch, nothing is updated.

    Args:
        model: the (possibly quantized) classifier.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> adapter = NoAdapt(nn.Linear(4, 3))
        >>> adapter(torch.zeros(2, 4)).shape, adapter.forward_passes
        (torch.Size([2, 3]), 1)
    """

    def forward(self, images: Tensor) -> Tensor:
        """Return the network's logits for ``images``."""
        self.counters.add("batches")
        self.counters.add("forward_passes")
        return self.model(images)
