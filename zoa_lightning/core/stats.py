"""Sufficient statistics: the arithmetic every stream method reduces over processes before it decides anything.

A statistic is carried as a count and float64 sums (``Σx``, ``Σx²``) so that N processes can add theirs with one sum
all-reduce (:data:`ReduceFn`) and then finish exactly what one process would have computed on the whole batch.

Example:
    Sums over two halves, added, give the moments of the whole:

    >>> x = torch.arange(8.0).view(4, 2)
    >>> a, b = moments(x[:2], (0,)), moments(x[2:], (0,))
    >>> mean, var = finish(torch.tensor(4.0, dtype=torch.float64), a[0] + b[0], a[1] + b[1])
    >>> mean.tolist(), var.tolist()
    ([3.0, 4.0], [6.666666666666667, 6.666666666666667])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "CountedReduce",
    "ReduceFn",
    "channel_moments",
    "finish",
    "gather_rows",
    "identity_reduce",
    "moments",
    "row_counts",
    "softmax_entropy",
]

ReduceFn = Callable[[Tensor], Tensor]
"""Sums a tensor over processes (identity on one process): float64 statistics, or :func:`gather_rows`' buffers."""


def identity_reduce(stats: Tensor) -> Tensor:
    """The :data:`ReduceFn` of a single process: returns ``stats`` unchanged."""
    return stats


def row_counts(
    rows: int, reduce_fn: ReduceFn, rank: int, world_size: int, device: torch.device | None = None
) -> Tensor:
    """Every process's row count, ``(world_size,)`` float64 in rank order, through one sum all-reduce."""
    counts = torch.zeros(world_size, dtype=torch.float64, device=device)
    return reduce_fn(counts.index_fill_(0, torch.tensor([rank], device=device), float(rows)))


def gather_rows(local: Tensor, reduce_fn: ReduceFn, rank: int, counts: Tensor) -> Tensor:
    """Every process's rows of ``local``, concatenated in rank order, bit for bit, through one sum all-reduce.

    Each process writes its rows into a zero buffer of the global batch's rows at its own offset and the buffers are
    summed: a value plus zeros is itself, so the result holds every process's values exactly. Statistics then computed
    on the gathered rows are those one process computes on the whole batch, which a sum of per-process sums is not (its
    rounding depends on the split).

    Args:
        local: this process's rows ``(rows, ...)``.
        reduce_fn: sums over processes.
        rank: this process's index.
        counts: every process's row count (:func:`row_counts`); one process: ``local`` comes back as it is.

    Example:
        >>> gather_rows(torch.ones(2, 3), identity_reduce, 0, torch.tensor([2.0])).shape
        torch.Size([2, 3])
    """
    if counts.numel() == 1:
        return local
    start, total = int(counts[:rank].sum()), int(counts.sum())
    buffer = local.new_zeros((total, *local.shape[1:]))
    buffer[start : start + local.shape[0]] = local
    return reduce_fn(buffer)


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``-Σ softmax(z) log softmax(z)`` of logits ``(B, classes)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Sums and sums of squares over ``dims`` in float64, formed stably from a float32 ``var_mean``."""
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    n = x.numel() // mean.numel()
    mean, var = mean.double(), var.double()
    return mean * n, (var + mean * mean) * n


def channel_moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Sums and sums of squares over ``dims`` (float32 squares, float64 accumulation), for large reductions.

    ``var_mean`` over several leading dimensions (a detector's tokens or pixels) takes a slow strided path on CPU,
    3-5 times slower than these two sums; the result agrees with :func:`moments` to float32 rounding.
    """
    x = x.float()
    return x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64)


def finish(n: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance from a count ``n`` and the sums ``s1 = Σx``, ``s2 = Σx²``."""
    mean = s1 / n
    var = ((s2 - n * mean * mean) / (n - 1)).clamp_min(0)
    return mean, var


class CountedReduce:
    """A :data:`ReduceFn` that counts what passes through it: calls, elements and bytes, in total and per batch.

    Args:
        reduce_fn: the reduction (identity by default).

    Example:
        >>> reduce = CountedReduce()
        >>> reduce.begin_batch()
        >>> _ = reduce(torch.zeros(3, dtype=torch.float64))
        >>> reduce.end_batch()
        >>> reduce.calls, reduce.last_batch_elements, reduce.last_batch_bytes
        (1, 3, 24)
    """

    def __init__(self, reduce_fn: ReduceFn | None = None) -> None:
        self.reduce_fn: ReduceFn = reduce_fn or identity_reduce
        self.calls = self.elements = self.bytes = 0
        self.last_batch_calls = self.last_batch_elements = self.last_batch_bytes = 0
        self._mark = (0, 0, 0)

    def __call__(self, stats: Tensor) -> Tensor:
        """Reduce ``stats``, counting it."""
        self.calls += 1
        self.elements += stats.numel()
        self.bytes += stats.numel() * stats.element_size()
        return self.reduce_fn(stats)

    def begin_batch(self) -> None:
        """Start counting one batch's communication."""
        self._mark = (self.calls, self.elements, self.bytes)

    def end_batch(self) -> None:
        """Set the ``last_batch_*`` figures to what passed since :meth:`begin_batch`."""
        self.last_batch_calls = self.calls - self._mark[0]
        self.last_batch_elements = self.elements - self._mark[1]
        self.last_batch_bytes = self.bytes - self._mark[2]
