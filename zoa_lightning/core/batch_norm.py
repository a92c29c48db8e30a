"""BatchNorm under ZOA: every BatchNorm normalises with the statistics of the current batch (spec §1.2).

Three cases need more than ``torch``'s own batch norm, and :class:`BatchStatistics` decides which applies to a batch:

* several processes share the batch: the per-channel sums go through a sum all-reduce, so N processes holding slices
  normalise exactly as one process holding all of it (:func:`reduced_batch_norm`);
* a pooled small batch (``docs/small_batches.md``): the batch's statistics are mixed with a running estimate of the
  layer's test statistics, Schneider et al.'s prior normalisation (NeurIPS 2020) with the prior kept as a moving
  estimate as RoTTA's robust BatchNorm keeps it (Yuan et al., CVPR 2023) (:meth:`BatchStatistics.normalize`);
* one value per channel (one image of a ``1×1`` map), whose variance is zero: the estimate mixed in with weight one.

:class:`FusedBatchNorm2d` is an adapted BatchNorm (its affine read from the knowledge bank);
:class:`BatchStatisticsNorm2d` takes the place of every other BatchNorm2d of the network (same parameters, same
state-dict keys, its running statistics the start of the estimate). :func:`use_batch_statistics_norms` puts them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.stats import ReduceFn

AffineOf = Callable[[], tuple[Tensor, Tensor]]
"""Returns an adapted layer's effective ``(weight, bias)``: each ``(C,)``, or ``(B, C)`` with one affine per image."""

__all__ = [
    "AffineOf",
    "BatchStatistics",
    "BatchStatisticsNorm2d",
    "FusedBatchNorm2d",
    "post_norm",
    "reduced_batch_norm",
    "running_statistics",
    "use_batch_statistics_norms",
]


class BatchStatistics(nn.Module):
    """The batch settings of every BatchNorm under ZOA and the running estimates of their test statistics.

    Each BatchNorm registers its running estimate (:meth:`add`, started at its source running statistics); the buffer
    ``running`` holds them all, so they are checkpointed and rolled back with the adapter. Per batch the engine sets
    :attr:`prior` (a pooled small batch) and :attr:`record` (its prediction pass records the statistics that
    :meth:`commit` then folds into the estimates); :meth:`end_batch` forgets both.

    Args:
        reduce: sums a float64 statistics vector over processes (``None``: one process).

    Example:
        >>> stats = BatchStatistics()
        >>> offset = stats.add(torch.zeros(2), torch.ones(2))
        >>> stats.prior, stats.record = 16.0, True
        >>> _ = stats.normalize(torch.ones(4, 2, 3, 3), 1e-5, offset)
        >>> stats.commit(8)  # 4 images of an 8-image window: half way to the batch's statistics
        >>> stats.running.tolist()
        [0.5, 0.5, 0.5, 0.5]
    """

    running: Tensor

    def __init__(self, reduce: ReduceFn | None = None) -> None:
        super().__init__()
        self.reduce = reduce
        self.prior: float | None = None
        """Prior strength ``N₀`` of the running estimate in this batch (``None``: the batch's statistics alone)."""
        self.record = False
        """Whether this pass records its statistics for :meth:`commit` (a pooled batch's prediction pass)."""
        self._pending: list[tuple[int, Tensor, Tensor, float]] = []
        self.register_buffer("running", torch.zeros(0, dtype=torch.float64))

    def add(self, mean: Tensor, var: Tensor) -> int:
        """Append a BatchNorm's running test statistics, started at ``(mean, var)``; returns their offset."""
        offset = self.running.numel()
        start = torch.cat([mean.detach().reshape(-1), var.detach().reshape(-1)]).to(self.running)
        self.running = torch.cat([self.running.to(start.device), start])
        return offset

    def needs_own_norm(self, x: Tensor) -> bool:
        """Whether ``torch``'s batch norm will not do: a reduction over processes, a prior, or one value per channel."""
        return self.reduce is not None or self.prior is not None or x.numel() == x.shape[1]

    def normalize(self, x: Tensor, eps: float, offset: int) -> Tensor:
        """Normalise ``x`` ``(B, C, H, W)`` with its batch's per-channel statistics, as this batch's settings say.

        With :attr:`prior` ``= N₀`` the batch's mean and biased variance over its ``n`` images are mixed with the
        running estimate ``r`` at ``offset``: ``(N₀·r + n·batch) / (N₀ + n)``, the variance that of the mixture (with
        the spread of the two means). A batch with one value per channel uses that mix with ``N₀ = 1`` when no prior
        is set (its variance is zero).
        """
        prior = self.prior
        if prior is None and x.numel() == x.shape[1] and self.reduce is None:
            prior = 1.0
        if prior is None:
            return reduced_batch_norm(x, eps, self.reduce or (lambda stats: stats))
        c = x.shape[1]
        wide = x.double()
        s1, s2 = wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3))
        stats = torch.cat([s1, s2, s1.new_tensor([x.numel() // c, x.shape[0]])])
        if self.reduce is not None:
            stats = self.reduce(stats)
        mean = stats[:c] / stats[2 * c]
        var = (stats[c : 2 * c] / stats[2 * c] - mean * mean).clamp_min(0)
        images = float(stats[2 * c + 1])
        self.note(offset, mean, var, images)
        running = self.running[offset : offset + 2 * c].to(mean.device)
        weight = images / (images + prior)
        spread = weight * (1 - weight) * (mean - running[:c]) ** 2  # the mixture's variance includes its means' spread
        mean = weight * mean + (1 - weight) * running[:c]
        var = weight * var + (1 - weight) * running[c:] + spread
        scale = torch.rsqrt(var + eps).to(x.dtype).view(1, c, 1, 1)
        return (x - mean.to(x.dtype).view(1, c, 1, 1)) * scale

    def note(self, offset: int, mean: Tensor, var: Tensor, images: float) -> None:
        """Keep a BatchNorm's batch mean and biased variance (float64) for :meth:`commit` if this pass records.

        :meth:`normalize` calls it; a network that computes the statistics elsewhere (an inference engine's graph)
        hands them in here, with the layer's ``offset`` and the batch's image count.
        """
        if self.record:
            self._pending.append((offset, mean, var, images))

    def commit(self, images_per_window: int) -> None:
        """Fold the statistics recorded in this batch's prediction pass into the running estimates.

        A batch of ``n`` images moves an estimate by ``n / images_per_window`` of the way to its own statistics.
        """
        for offset, mean, var, images in self._pending:
            c = mean.numel()
            weight = min(1.0, images / images_per_window)
            row = self.running[offset : offset + 2 * c]
            row.mul_(1 - weight).add_(torch.cat([mean, var]).to(row), alpha=weight)
        self._pending.clear()

    def end_batch(self) -> None:
        """Forget the batch settings and anything recorded (a batch ended or was rolled back)."""
        self.prior, self.record = None, False
        self._pending.clear()


def reduced_batch_norm(x: Tensor, eps: float, reduce: ReduceFn) -> Tensor:
    """Normalise ``x`` ``(B, C, H, W)`` with the per-channel mean and biased variance of the global batch.

    The per-channel sums ``Σx``, ``Σx²`` and the count (float64) go through ``reduce``, a sum over processes, so N
    processes holding slices of a batch normalise exactly as one process holding all of it (up to rounding).
    """
    c = x.shape[1]
    wide = x.double()  # float64 squares: E[x²] − mean² must not lose the variance to rounding
    s1, s2 = wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3))
    stats = reduce(torch.cat([s1, s2, s1.new_tensor([x.numel() // c])]))
    mean = stats[:c] / stats[-1]
    var = (stats[c : 2 * c] / stats[-1] - mean * mean).clamp_min(0)
    scale = torch.rsqrt(var + eps).to(x.dtype).view(1, c, 1, 1)
    return (x - mean.to(x.dtype).view(1, c, 1, 1)) * scale


def affine(normed: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``normed · weight + bias`` (broadcast); in place on ``normed`` when no gradient needs it."""
    if torch.is_grad_enabled() and (normed.requires_grad or weight.requires_grad or bias.requires_grad):
        return torch.addcmul(bias, normed, weight)
    return torch.addcmul(bias, normed, weight, out=normed)  # the same values as the out-of-place call


class FusedBatchNorm2d(nn.Module):
    """An adapted BatchNorm2d: batch statistics and the affine parameters a knowledge bank fuses.

    Running statistics are not updated (spec §1.2), so the layer behaves the same in train and eval mode.

    Args:
        num_features: channel count.
        eps: variance epsilon.
        affine_of: returns the layer's effective ``(weight, bias)`` (:data:`AffineOf`): its slice of the bank.
        statistics: the batch settings and running estimates of the network's BatchNorms.
        source: the replaced layer's ``(running_mean, running_var)`` (the start of its running estimate), or
            ``None`` (zeros and ones).
        post: what the replaced layer applied after normalising (timm's ``BatchNormAct2d`` carries its dropout and
            activation inside the norm layer); ``None`` for a plain BatchNorm.
    """

    _affine_of: AffineOf
    _statistics: BatchStatistics

    def __init__(
        self,
        num_features: int,
        eps: float,
        affine_of: AffineOf,
        statistics: BatchStatistics,
        source: tuple[Tensor, Tensor] | None = None,
        post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.post = post
        object.__setattr__(self, "_affine_of", affine_of)  # references, not submodules: registered once elsewhere
        object.__setattr__(self, "_statistics", statistics)
        self._offset = statistics.add(*_start(num_features, source))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with batch statistics over (N, H, W) and the fused affine parameters."""
        weight, bias = self._affine_of()
        statistics = self._statistics
        if statistics.needs_own_norm(x):  # several processes, a pooled small batch, or one value per channel
            shape = (*weight.shape, 1, 1) if weight.ndim == 2 else (1, -1, 1, 1)
            out = affine(statistics.normalize(x, self.eps, self._offset), weight.view(shape), bias.view(shape))
        elif weight.ndim == 1:
            out = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        else:  # one affine per image
            shape = (*weight.shape, 1, 1)
            out = affine(
                F.batch_norm(x, None, None, None, None, True, 0.0, self.eps), weight.view(shape), bias.view(shape)
            )
        return out if self.post is None else self.post(out)

    def extra_repr(self) -> str:
        """Channels and epsilon, for ``print(model)``."""
        return f"{self.num_features}, eps={self.eps}"


class BatchStatisticsNorm2d(nn.Module):
    """A network's own (not adapted) BatchNorm2d under ZOA: batch statistics, its own affine, the shared settings.

    Takes the replaced layer's ``weight`` and ``bias`` parameters as they are (same objects, same state-dict keys)
    and keeps no running statistics (spec §1.2); the replaced layer's running statistics start its running estimate.

    Args:
        norm: the BatchNorm2d it replaces.
        statistics: the batch settings and running estimates of the network's BatchNorms.
    """

    _statistics: BatchStatistics

    def __init__(self, norm: nn.BatchNorm2d, statistics: BatchStatistics) -> None:
        super().__init__()
        self.num_features = norm.num_features
        self.eps = float(norm.eps)
        self.weight = norm.weight
        self.bias = norm.bias
        self.post = post_norm(norm)
        object.__setattr__(self, "_statistics", statistics)
        self._offset = statistics.add(*_start(norm.num_features, running_statistics(norm)))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the batch's statistics, as the shared settings say, then the layer's own affine."""
        statistics = self._statistics
        if statistics.needs_own_norm(x):
            out = statistics.normalize(x, self.eps, self._offset)
            if self.weight is not None and self.bias is not None:
                out = torch.addcmul(self.bias.view(1, -1, 1, 1), out, self.weight.view(1, -1, 1, 1))
        else:
            out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return out if self.post is None else self.post(out)

    def extra_repr(self) -> str:
        """Channels and epsilon, for ``print(model)``."""
        return f"{self.num_features}, eps={self.eps}"


def _start(channels: int, source: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Where a running estimate starts: the layer's source (running) statistics, or zeros and ones."""
    return source if source is not None else (torch.zeros(channels), torch.ones(channels))


def post_norm(norm: nn.Module) -> nn.Module | None:
    """What a norm layer applies after normalising, e.g. timm ``BatchNormAct2d``'s dropout and activation."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
        return nn.Sequential(*(m for m in (drop, act) if isinstance(m, nn.Module)))
    return None


def running_statistics(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """A BatchNorm's ``(running_mean, running_var)`` (its source statistics), or ``None`` if it tracks none."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    return (mean, var) if isinstance(mean, Tensor) and isinstance(var, Tensor) else None


def use_batch_statistics_norms(model: nn.Module, names: Sequence[str], statistics: BatchStatistics) -> None:
    """Replace each named ``nn.BatchNorm2d`` of ``model`` by a :class:`BatchStatisticsNorm2d` (in place).

    Names that are no longer a ``BatchNorm2d`` (an adapted layer already fused) are left as they are.
    """
    for name in names:
        norm = model.get_submodule(name)
        if isinstance(norm, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, BatchStatisticsNorm2d(norm, statistics))
