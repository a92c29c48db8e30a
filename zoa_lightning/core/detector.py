"""The domain-shift detector (spec §5.1-§5.2): symmetric KL between running and current per-channel Gaussians."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from zoa_lightning.core.stats import ReduceFn, channel_moments, finish

__all__ = ["DetectorSums", "DomainShiftDetector", "detector_statistics", "detector_sums", "finish_sums"]


@dataclass(frozen=True)
class DetectorSums:
    """This process's sums of the detector tensor, computed where the network ran (an inference engine's graph).

    Args:
        values: ``[Σx (C), Σx² (C), values per channel, images]``, float64, over this process's images only.
    """

    values: Tensor


def detector_sums(
    output: Tensor | DetectorSums, kind: Literal["vit", "cnn"], num_prefix_tokens: int, reduce_fn: ReduceFn
) -> Tensor:
    """``[Σx (C), Σx² (C), values per channel, images]`` of the detector tensor, float64, summed over processes.

    Args:
        output: the detector module's output: ``(B, tokens, C)`` for a ViT, ``(B, C, H, W)`` for a CNN; or its
            sums already taken (:class:`DetectorSums`), which are only summed over processes.
        kind: ``"vit"`` or ``"cnn"``.
        num_prefix_tokens: leading ViT tokens (class token, registers) left out of the sums and the count.
        reduce_fn: sums the statistics vector over processes.
    """
    if isinstance(output, DetectorSums):
        return reduce_fn(output.values)
    if kind == "vit":
        output = output[:, num_prefix_tokens:]  # patch tokens only, for the sums and the count
        s1, s2 = channel_moments(output, (0, 1))
    else:
        s1, s2 = channel_moments(output, (0, 2, 3))
    c = s1.numel()
    return reduce_fn(torch.cat([s1, s2, s1.new_tensor([output.numel() // c, output.shape[0]])]))


def finish_sums(stats: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and unbiased variance, and the image count, from :func:`detector_sums`' vector."""
    c = (stats.numel() - 2) // 2
    mean, var = finish(stats[2 * c], stats[:c], stats[c : 2 * c])
    return mean, var, int(stats[2 * c + 1])


def detector_statistics(
    output: Tensor, kind: Literal["vit", "cnn"], num_prefix_tokens: int, reduce_fn: ReduceFn
) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and unbiased variance of the detector tensor, and the (global) image count.

    Args:
        output: the detector module's output: ``(B, tokens, C)`` for a ViT, ``(B, C, H, W)`` for a CNN.
        kind: ``"vit"`` or ``"cnn"``.
        num_prefix_tokens: leading ViT tokens (class token, registers) left out of the sums and the count.
        reduce_fn: sums the statistics vector over processes.

    Returns:
        ``(mean, var, images)``, the statistics in float64 over every process's tokens or pixels.
    """
    return finish_sums(detector_sums(output, kind, num_prefix_tokens, reduce_fn))


class DomainShiftDetector(nn.Module):
    """Running per-channel statistics of the detector tensor and the shift test against them.

    Args:
        channels: channel count of the detector tensor.
        threshold: ``τ``; a divergence above it is a shift.
        momentum: weight of the old statistics in the running update (0.8).
        min_batch: batches with fewer images neither test nor update (64 in the reference); pooled small batches
            (:mod:`~zoa_lightning.core.small_batch`) add up in a pending chunk that tests once it holds this many.
        device: where the buffers live.
        dtype: their dtype.

    Example:
        >>> det = DomainShiftDetector(2, threshold=0.1, min_batch=2)
        >>> det.step(torch.zeros(2), torch.ones(2), images=8)  # the first batch only initialises
        False
        >>> det.step(torch.full((2,), 3.0), torch.ones(2), images=8)
        True
    """

    mean: Tensor
    var: Tensor
    ready: Tensor
    pending: Tensor

    def __init__(
        self,
        channels: int,
        threshold: float,
        momentum: float = 0.8,
        min_batch: int = 64,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.threshold, self.momentum, self.min_batch = threshold, momentum, min_batch
        self.register_buffer("mean", torch.zeros(channels, device=device, dtype=dtype))
        self.register_buffer("var", torch.zeros(channels, device=device, dtype=dtype))
        self.register_buffer("ready", torch.zeros((), device=device, dtype=torch.bool))
        # pooled small batches: the summed detector_sums of the chunk not yet tested (zeros: none)
        self.register_buffer("pending", torch.zeros(2 * channels + 2, device=device, dtype=torch.float64))
        self._full_batch_seen = False
        self._warned = False
        self._last: tuple[Tensor, Tensor, int] | None = None
        self._observed = False  # this batch's prediction pass has been observed

    def observe(
        self,
        output: Tensor | DetectorSums,
        kind: Literal["vit", "cnn"],
        num_prefix_tokens: int,
        reduce_fn: ReduceFn,
        reuse: bool = False,
        pooled: bool = False,
    ) -> bool:
        """:func:`detector_sums` of a detector tensor, then :meth:`step`; whether a shift was detected.

        With ``reuse`` the statistics the previous observation tested are tested again, or nothing when it tested
        nothing (the perturbed pass in reference mode: the detector tensor does not depend on the adapted values,
        spec §5.1, so nothing is sent again). With ``pooled`` (a small batch) the sums join the pending chunk, which
        is tested once it holds ``min_batch`` images; without, the batch is tested alone and any pending chunk dropped.
        """
        if reuse and self._observed:
            return self._last is not None and bool(self.step(*self._last))
        self._observed = True
        stats = detector_sums(output, kind, num_prefix_tokens, reduce_fn)
        if pooled:
            self.pending.add_(stats.to(self.pending.device))
            if float(self.pending[-1]) < self.min_batch:
                self._last = None
                return False
            stats = self.pending.clone()
        self.pending.zero_()
        self._last = finish_sums(stats)
        return bool(self.step(*self._last))

    def end_batch(self) -> None:
        """Forget the statistics kept for reuse."""
        self._last = None
        self._observed = False

    def divergence(self, mean: Tensor, var: Tensor) -> float:
        """Symmetric KL divergence between the running statistics and ``(mean, var)``, averaged over channels."""
        d2 = (self.mean - mean) ** 2
        div = (self.var + d2) / (2 * (var + 1e-8)) + (var + d2) / (2 * (self.var + 1e-8)) - 1
        return float(div.mean())

    def step(self, mean: Tensor, var: Tensor, images: int) -> bool | None:
        """Test the batch for a shift, then fold it into the running statistics (reset to it after a shift).

        Returns:
            Whether a shift was detected, or ``None`` for a batch below ``min_batch`` (neither tested nor used).
        """
        if images < self.min_batch:
            self._warn_small(images)
            return None
        self._full_batch_seen = True
        mean, var = mean.to(self.mean.dtype), var.to(self.var.dtype)
        shift = bool(self.ready) and self.divergence(mean, var) > self.threshold
        if shift:
            self.ready.fill_(False)
        if bool(self.ready):
            self.mean.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
            self.var.mul_(self.momentum).add_(var, alpha=1 - self.momentum)
        else:
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.ready.fill_(True)
        return shift

    def _warn_small(self, images: int) -> None:
        if self._full_batch_seen or self._warned:
            return  # a short last batch of a domain after full ones is normal
        self._warned = True
        warnings.warn(
            f"ZOA's domain detector ignores batches of fewer than detector_min_batch={self.min_batch} images and this "
            f"stream's batches have {images}: no domain shift will be detected and the knowledge bank stores nothing. "
            "Use larger batches or lower detector_min_batch (ZOAModule / --model.init_args.detector_min_batch)",
            RuntimeWarning,
            stacklevel=4,
        )
