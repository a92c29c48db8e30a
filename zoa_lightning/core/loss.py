"""ZOA's fitness loss (spec §2.2-§2.3) as a torchmetrics-style pair: sufficient statistics, then the loss from them.

:func:`loss_statistics` turns one pass's loss features and logits into a vector of sums that processes can add;
:class:`ZOALoss` turns the (reduced) vector into the loss. Between the two, a sum all-reduce makes N processes compute
the loss of their concatenated batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zoa_lightning.core.stats import finish, moments, softmax_entropy

__all__ = ["ZOALoss", "loss_statistics"]


def loss_statistics(features: Tensor, logits: Tensor) -> Tensor:
    """``[Σf (F), Σf² (F), Σ entropy, B]`` in float64, for features ``(B, F)`` and logits ``(B, classes)``.

    One moments call over all loss features instead of one per tap: the same per-column values, far fewer operations.
    """
    s1, s2 = moments(features, (0,))
    entropy = softmax_entropy(logits.float()).sum().double()
    return torch.cat([s1, s2, entropy.view(1), entropy.new_tensor([logits.shape[0]])])


class ZOALoss:
    """``λ · mean over taps of [MSE(σ̂, σ_src) + MSE(μ̂, μ_src)] + mean entropy`` from reduced statistics.

    Each tap's discrepancy is averaged over its own dimensions, then the taps with equal weight (spec §2.3); when all
    taps have the same width (a ViT) this is one mean over every dimension (spec §2.2).

    Args:
        tap_dims: width of each loss tap in network order, the final feature last.
        lambda_bp: ``λ``, the weight of the statistics discrepancy.

    Example:
        >>> loss = ZOALoss([2], lambda_bp=1.0)
        >>> f = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        >>> value, mean = loss(loss_statistics(f, torch.zeros(2, 4)), torch.zeros(2), torch.zeros(2))
        >>> round(float(value), 4), mean.tolist()
        (5.8863, [1.0, 2.0])
    """

    def __init__(self, tap_dims: Sequence[int], lambda_bp: float) -> None:
        self.tap_dims = [int(d) for d in tap_dims]
        self.lambda_bp = float(lambda_bp)
        self.dim = sum(self.tap_dims)

    def __call__(self, stats: Tensor, source_mean: Tensor, source_std: Tensor) -> tuple[Tensor, Tensor]:
        """The loss (float64 scalar) and the batch mean of every loss feature (float64, ``(F,)``)."""
        total, n = self.dim, stats[-1]
        mean, var = finish(n, stats[:total], stats[total : 2 * total])
        std_terms = (var.sqrt() - source_std.double()) ** 2
        mean_terms = (mean - source_mean.double()) ** 2
        dims = self.tap_dims
        if all(d == dims[0] for d in dims):  # ViT: every tap has the model width
            per_tap = std_terms.view(len(dims), -1).mean(1) + mean_terms.view(len(dims), -1).mean(1)
        else:  # CNN stages: each stage's discrepancy is averaged over its own dimensions
            per_tap = torch.stack(
                [a.mean() + b.mean() for a, b in zip(std_terms.split(dims), mean_terms.split(dims), strict=True)]
            )
        return self.lambda_bp * per_tap.mean() + stats[-2] / n, mean
