"""FOA's back-to-source activation shift (spec §4): a running test mean of the final feature, pulled to the source."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ActivationShift"]


class ActivationShift(nn.Module):
    """EMA ``h`` of per-batch final-feature means; the shift vector is ``source - h``.

    Args:
        dim: width of the final feature.
        momentum: weight of the old mean in the EMA (0.9).
        device: where the buffers live.
        dtype: their dtype.

    Example:
        >>> shift = ActivationShift(2)
        >>> shift.vector(torch.zeros(2)) is None
        True
        >>> shift.update(torch.tensor([1.0, 3.0]))
        >>> shift.vector(torch.zeros(2)).tolist()
        [-1.0, -3.0]
    """

    mean: Tensor
    ready: Tensor

    def __init__(
        self, dim: int, momentum: float = 0.9, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim, device=device, dtype=dtype))
        self.register_buffer("ready", torch.zeros((), device=device, dtype=torch.bool))

    def vector(self, source: Tensor) -> Tensor | None:
        """``source - h``, or ``None`` before the first batch or after a reset."""
        return source - self.mean if bool(self.ready) else None

    def reset(self) -> None:
        """Forget the running mean (a detected domain shift); the next :meth:`update` starts it anew."""
        self.ready.fill_(False)

    def update(self, batch_mean: Tensor, momentum: float | None = None) -> None:
        """Fold one batch's mean in: ``h = m·h + (1 - m)·batch_mean``, or ``h = batch_mean`` after a reset.

        ``momentum`` overrides ``m`` for this batch (a small batch's, scaled to its size).
        """
        m = self.momentum if momentum is None else momentum
        if bool(self.ready):
            self.mean.mul_(m).add_(batch_mean, alpha=1 - m)
        else:
            self.mean.copy_(batch_mean)
            self.ready.fill_(True)
