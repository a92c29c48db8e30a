"""Small batches, down to one image: pooled loss statistics and the rules of a pooled batch (docs/small_batches.md).

ZOA's loss compares batch statistics with source statistics, and its detector tests batch statistics for a shift:
both need many images. A batch of fewer than ``pool_images`` images (64 by default) is therefore **pooled**:

* its loss reads the sufficient statistics ``[Σf, Σf², ΣH, n]`` of its own images plus those of the most recent earlier
  batches, as many as bring the total to at least ``pool_images`` images (fewer right after the stream's start or a
  detected shift, which empties the pool). Earlier batches' statistics are those of their prediction pass, fixed, so
  both passes of a batch see the same past and their loss difference comes from this batch's images alone;
* the detector adds its statistics to a pending chunk and tests (and updates) once the chunk holds
  ``detector_min_batch`` images (:class:`~zoa_lightning.core.detector.DomainShiftDetector`), so a shift is detected,
  and knowledge stored, at most one chunk after it happens;
* the step is taken every batch, with every learning rate scaled by ``n / N`` (``n`` the batch's images, ``N`` the
  pooled count) and the estimate by ``N / n``: the loss-gradient part keeps the size the pooled loss gives it (this
  batch's share), while weight decay and the mixing logits' sign-like first AdamW step shrink by the same share. So
  ``N / n`` small batches move the parameters about as far as one batch of ``N`` images would, whatever the batch
  size. A step every batch rather than every ``k`` images: the estimate's noise then averages over ``N / n``
  independent perturbation directions instead of one;
* the activation shift's running mean uses the momentum ``m^(n / pool_images)``, the time constant in images of the
  paper's ``m`` per 64-image batch;
* every BatchNorm mixes the batch's statistics with a running estimate ``r`` of the layer's test statistics,
  ``μ = (N₀·r_μ + n·μ_b) / (N₀ + n)`` and likewise the variance, ``N₀ = bn_prior`` (Schneider et al., "Improving
  robustness against common corruptions by covariate shift adaptation", NeurIPS 2020); ``r`` starts at the source
  statistics and follows the last ``pool_images`` images (as RoTTA's robust BatchNorm, Yuan et al., CVPR 2023):
  :meth:`~zoa_lightning.core.batch_norm.BatchStatistics.normalize`.

A batch of ``pool_images`` or more stands alone, exactly as in the reference, and empties the pool. So does a small
batch right after such a full batch (the short last batch of a domain in the paper's 64-image protocol), so the
paper's protocol runs exactly as before. A batch whose pooled count is still one image (the first batch of a
one-image stream, or the first after a detected shift) predicts and is recorded, but takes no step (a variance
needs two images).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallBatches"]


class SmallBatches(nn.Module):
    """The pool of recent batches' loss statistics and the per-batch decisions of the small-batch rules.

    The pool is a ring of the last ``pool_images - 1`` batches' statistics (enough for one-image batches), float64,
    fixed in shape from construction. It changes only in :meth:`finish`, after a batch has committed, so a rolled-back
    batch leaves it as it was (and a batch transaction need not copy it: ``constant_buffers``).

    Args:
        size: the length of one statistics vector (``2·F + 2`` for ``F`` loss features).
        pool_images: batches with fewer images (all processes together) are pooled up to this many.
        device: where the buffers live.

    Example:
        >>> pool = SmallBatches(3, pool_images=4)
        >>> pool.begin(2)
        >>> pool.pooled(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)).tolist()  # nothing earlier yet
        [1.0, 1.0, 2.0]
        >>> pool.finish(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64), detected=False)
        >>> pool.begin(2)
        >>> pool.pooled(torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)).tolist(), pool.share
        ([4.0, 6.0, 4.0], 0.5)
    """

    history: Tensor
    filled: Tensor
    head: Tensor
    previous: Tensor
    constant_buffers = ("history", "filled", "head", "previous")  # changed only after a batch commits

    def __init__(self, size: int, pool_images: int = 64, device: torch.device | None = None) -> None:
        super().__init__()
        if pool_images < 2:
            raise ValueError(f"pool_images must be >= 2, got {pool_images}")
        self.pool_images = int(pool_images)
        capacity = self.pool_images - 1
        self.register_buffer("history", torch.zeros(capacity, size, dtype=torch.float64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))  # rows in use
        self.register_buffer("head", torch.zeros((), dtype=torch.long, device=device))  # next row to write
        self.register_buffer("previous", torch.zeros((), dtype=torch.long, device=device))  # last batch's images
        self.active = False  # this batch is pooled
        self.share = 1.0  # n / N of this batch (1 when it stands alone)
        self.images = 0
        self._earlier: tuple[float, Tensor | None] | None = None  # this batch's _recent (the ring is fixed till finish)

    def begin(self, images: int) -> None:
        """Decide whether a batch of ``images`` (all processes) is pooled: small, and not right after a full one."""
        previous = int(self.previous)
        self.images = int(images)
        self.active = images < self.pool_images and not (previous >= self.pool_images)
        self.share = 1.0
        self._earlier = None

    def _recent(self, needed: float) -> Tensor | None:
        """The sum of the most recent rows whose image counts reach ``needed`` (all rows if they do not)."""
        filled = int(self.filled)
        if filled == 0 or needed <= 0:
            return None
        capacity = self.history.shape[0]
        head = int(self.head)
        newest_first = [(head - 1 - k) % capacity for k in range(filled)]
        counts = self.history[:, -1].tolist()  # (one plain read; indexed in Python)
        taken, total = 0, 0.0
        while taken < filled and total < needed:
            total += counts[newest_first[taken]]
            taken += 1
        order = torch.tensor(newest_first[:taken], device=self.history.device)
        rows = self.history.index_select(0, order)
        return rows.sum(0)  # a fixed order (newest first): the same bits on every process and after a resume

    def pooled(self, stats: Tensor) -> Tensor:
        """``stats`` of this batch (reduced, ``[..., n]``), plus the recent batches' when pooled; sets :attr:`share`."""
        if not self.active:
            return stats
        own = float(stats[-1].detach())
        needed = self.pool_images - own
        if self._earlier is None or self._earlier[0] != needed:  # a batch's passes have the same images: one sum
            self._earlier = (needed, self._recent(needed))
        earlier = self._earlier[1]
        if earlier is None:
            self.share = 1.0
            return stats
        total = stats + earlier.to(stats.device)
        self.share = own / float(total[-1].detach())
        return total

    def momentum(self, momentum: float) -> float:
        """An EMA momentum per ``pool_images`` images, as the one to apply for this batch."""
        if not self.active:
            return momentum
        return momentum ** (self.images / self.pool_images)

    def finish(self, stats: Tensor | None, detected: bool) -> None:
        """After a batch: record its prediction-pass ``stats``, or nothing at all for a rolled-back batch (``None``).

        A detected shift empties the pool (the past is another domain), and so does a full batch.
        """
        active, self.active, self.share, self._earlier = self.active, False, 1.0, None
        if stats is None:
            return
        if detected or not active:
            self.filled.zero_()
            self.head.zero_()
        if active and not detected:
            self.history[int(self.head)] = stats.to(self.history.device, torch.float64)
            self.head.copy_((self.head + 1) % self.history.shape[0])
            self.filled.copy_(torch.clamp(self.filled + 1, max=self.history.shape[0]))
        self.previous.fill_(self.images)
