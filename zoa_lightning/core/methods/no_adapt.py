"""``no_adapt``: the network as it is, one forward pass per batch (the reference every method is compared with)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["NoAdapt"]


class NoAdapt:
    """Predict with the network unchanged: eval mode, one forward pass per batch, nothing is updated.

    A plain object, not an ``nn.Module``: it holds no tensor of its own, so a stream module keeps the network
    registered under its own name (checkpoint keys ``net.*``) rather than under ``adapter.*``.

    Args:
        model: the (possibly quantized) classifier.

    Example:
        >>> import torch
        >>> adapter = NoAdapt(nn.Linear(4, 3))
        >>> adapter(torch.zeros(2, 4)).shape, adapter.forward_passes
        (torch.Size([2, 3]), 1)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._forward_passes = 0

    @property
    def forward_passes(self) -> int:
        """Network forward passes spent (one per batch)."""
        return self._forward_passes

    def __call__(self, images: Tensor) -> Tensor:
        """Return the network's logits for ``images`` (in eval mode)."""
        self.model.eval()
        self._forward_passes += 1
        return self.model(images)
