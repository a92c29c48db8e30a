"""Source statistics: the per-dimension mean and std of the loss features on clean data (spec §2.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.stats import ReduceFn, finish, moments

__all__ = ["SourceStatistics"]


class SourceStatistics(nn.Module):
    """Fixed-size buffers for the clean-data feature mean and (unbiased) std, filled once before the stream.

    Args:
        dim: number of loss-feature dimensions (all taps concatenated).
        device: where the buffers live.
        dtype: their dtype.
    """

    mean: Tensor
    std: Tensor
    ready: Tensor
    constant_buffers = ("mean", "std", "ready")  # set once before the stream: a batch transaction need not copy them

    def __init__(self, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, device=device, dtype=dtype))
        self.register_buffer("std", torch.zeros(dim, device=device, dtype=dtype))
        self.register_buffer("ready", torch.zeros((), device=device, dtype=torch.bool))

    def set(self, mean: Tensor, std: Tensor) -> None:
        """Install precomputed statistics (concatenated over the loss taps, network order).

        Raises:
            ValueError: if a shape differs from the buffers'.
        """
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"source statistics must have shape {tuple(self.mean.shape)}, "
                f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.ready.fill_(True)

    def set_from_sums(self, sums: Tensor) -> None:
        """Finish reduced sums ``[Σx (D), Σx² (D), n]`` into the mean and the unbiased std."""
        dim = self.mean.numel()
        mean, var = finish(sums[-1], sums[:dim], sums[dim : 2 * dim])
        self.set(mean, var.sqrt())

    def collect(
        self,
        loader: Iterable[Any],
        features: Callable[[Tensor], Tensor],
        reduce_fn: ReduceFn,
        max_batches: int | None = None,
    ) -> None:
        """Accumulate the features of clean batches, reduce the sums over processes and install the statistics.

        Args:
            loader: yields image tensors, or tuples/lists whose first element is the image tensor.
            features: the loss features ``(B, D)`` of a batch of images (one forward pass, no adaptation); under DDP
                it may return the global batch's rows, with an identity ``reduce_fn``.
            reduce_fn: sums the statistics vector over processes.
            max_batches: use only the first ``max_batches`` batches.

        Raises:
            ValueError: if the loader yields no images.
        """
        sums: Tensor | None = None
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0] if isinstance(batch, tuple | list) else batch
                rows = features(images)
                s1, s2 = moments(rows, (0,))
                vec = torch.cat([s1, s2, s1.new_tensor([rows.shape[0]])])
                sums = vec if sums is None else sums + vec
        if sums is None:
            raise ValueError("collect_source_statistics got an empty loader: pass clean source images")
        self.set_from_sums(reduce_fn(sums))

    def final(self, width: int) -> Tensor:
        """The source mean of the final feature: the last ``width`` dimensions."""
        return self.mean[-width:]
