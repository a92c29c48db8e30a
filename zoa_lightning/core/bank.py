"""The domain knowledge bank and the fused normalization layers that read it (spec §1.3, §5.3–§5.5).

All adapted affine parameters live in one flat layout of ``P`` values: the adapted layers in network order and, within
a layer, the scale (γ) block before the shift (β) block. :class:`KnowledgeBank` owns, in that layout,

* ``base``: the pretrained γ₀/β₀ (frozen);
* ``theta``: the learned residual deltas ε (the "epsilons"), updated by ZOA every batch;
* ``deltas``: a fixed-capacity store of ``max_entries + 1`` knowledge snapshots, row 0 the permanent zero entry;
* ``alpha``: the mixing logits (one per store row, only the first ``count`` used), shared by all layers;
* ``similarity``: the ``max_entries × max_entries`` cosine-similarity matrix used for eviction.

Every tensor has a fixed shape, so ``state_dict`` shapes never change as the bank grows, and every mutation is in place
(``copy_``, index assignment), which keeps the bank usable under ``torch.inference_mode`` (see `docs/lightning.md` §1).

The effective parameters of layer ℓ are ``base + softmax(s·alpha[:K]) @ deltas[:K] + theta`` restricted to the layer's
slice. :class:`FusedLayerNorm` and :class:`~zoa_lightning.core.batch_norm.FusedBatchNorm2d` read them at every forward
from the bank (the BatchNorm side, batch statistics and their running estimates, is
:mod:`zoa_lightning.core.batch_norm`); :func:`fuse_norms` puts them into a network.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.batch_norm import (
    BatchStatistics,
    FusedBatchNorm2d,
    affine,
    post_norm,
    running_statistics,
    use_batch_statistics_norms,
)
from zoa_lightning.core.layout import ModelLayout

__all__ = ["FusedLayerNorm", "KnowledgeBank", "fuse_norms"]


class KnowledgeBank(nn.Module):
    """Fixed-capacity store of adapted-parameter snapshots, mixing logits and learned epsilons.

    Args:
        widths: channel count of each adapted layer, in network order (each contributes ``2 * width`` values).
        base: the pretrained affine parameters in the flat layout (``2 * sum(widths)`` values).
        max_entries: capacity ``N_max`` for non-zero snapshots (the zero entry is extra).
        alpha_scale: the logit scale ``s`` of ``softmax(s * alpha)``.
        weight_margin: divisor of the scale factor that initialises a new entry's logit (spec §5.3).
        alpha_clip: new logits are clipped to ``[-alpha_clip, alpha_clip]``.
        compact_similarity: corrected mode; compact the similarity matrix after an eviction (spec §5.5). The reference
            leaves it stale (``False``).
        initial_alpha: the value of ``alpha[0]`` (the reference draws it from N(0, 1)).

    Example:
        >>> bank = KnowledgeBank([2], torch.tensor([1.0, 1.0, 0.0, 0.0]), max_entries=4)
        >>> bank.theta += 0.5
        >>> before = bank.current_delta().clone()
        >>> _ = bank.store()
        >>> torch.allclose(bank.current_delta(), before), int(bank.count)
        (True, 2)
    """

    base: Tensor
    theta: Tensor
    deltas: Tensor
    alpha: Tensor
    count: Tensor
    similarity: Tensor
    _segment: Tensor
    constant_buffers = ("base", "_segment")  # never changed by a batch: a batch transaction need not copy them

    def __init__(
        self,
        widths: Sequence[int],
        base: Tensor,
        *,
        max_entries: int = 32,
        alpha_scale: float = 10.0,
        weight_margin: float = 0.01,
        alpha_clip: float = 10.0,
        compact_similarity: bool = False,
        initial_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {list(widths)}")
        size = 2 * sum(widths)
        if base.ndim != 1 or base.numel() != size:
            raise ValueError(f"base must be a flat tensor of {size} values (2 * sum(widths)), got {tuple(base.shape)}")
        self.widths = tuple(int(w) for w in widths)
        self.max_entries = int(max_entries)
        self.alpha_scale = float(alpha_scale)
        self.weight_margin = float(weight_margin)
        self.alpha_clip = float(alpha_clip)
        self.compact_similarity = bool(compact_similarity)
        offsets, offset = [], 0
        for w in self.widths:
            offsets.append(offset)
            offset += 2 * w
        self.offsets = tuple(offsets)
        repeats = torch.tensor(self.widths).repeat_interleave(2)
        segment = torch.repeat_interleave(torch.arange(2 * len(self.widths)), repeats)
        self.register_buffer("_segment", segment, persistent=False)
        dtype = base.dtype
        self.register_buffer("base", base.detach().clone())
        self.register_buffer("theta", torch.zeros(size, dtype=dtype, device=base.device))
        self.register_buffer("deltas", torch.zeros(max_entries + 1, size, dtype=dtype, device=base.device))
        alpha = torch.zeros(max_entries + 1, dtype=dtype, device=base.device)
        alpha[0] = initial_alpha
        self.register_buffer("alpha", alpha)
        self.register_buffer("count", torch.ones((), dtype=torch.long, device=base.device))
        self.register_buffer("similarity", torch.zeros(max_entries, max_entries, dtype=dtype, device=base.device))
        self._fused: Tensor | None = None
        self._fused_key: tuple[tuple[int, int, int], ...] | None = None
        self._use_base = False
        self._override: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of adapted values ``P`` (the length of ``theta``)."""
        return self.theta.numel()

    @property
    def num_entries(self) -> int:
        """``K``: entries in use, the zero entry included."""
        return int(self.count)

    def mixing_weights(self, alpha: Tensor | None = None) -> Tensor:
        """``softmax(s * alpha[:K])``, optionally for other logits of the same length."""
        logits = self.alpha[: self.num_entries] if alpha is None else alpha
        return torch.softmax(logits * self.alpha_scale, dim=0)

    def current_delta(self) -> Tensor:
        """The current total delta in the flat layout: ``softmax(s·alpha) @ deltas[:K] + theta``."""
        k = self.num_entries
        return self.mixing_weights() @ self.deltas[:k] + self.theta

    def fused(self) -> Tensor:
        """Effective flat parameters ``base + softmax(s·alpha) @ deltas[:K] + theta`` of every adapted layer.

        Every fused layer reads its slice of this vector in each forward pass. It is computed once per bank state and
        reused until ``base``, ``theta``, ``alpha``, ``deltas`` or ``count`` changes (an in-place update bumps the
        tensor's version counter; a replaced tensor has another identity), so a forward pass costs one mixing product,
        not one per layer.
        """
        if self._use_base:
            return self.base
        if self._override is not None:
            return self._override
        state = (self.base, self.theta, self.alpha, self.deltas, self.count)
        key = tuple((id(t), t.data_ptr(), t._version) for t in state)
        if self._fused_key != key or self._fused is None:
            k = self.num_entries  # same order of additions as base + (mix @ deltas) + theta, layer by layer
            self._fused = self.base + self.mixing_weights() @ self.deltas[:k] + self.theta
            self._fused_key = key
        return self._fused

    @contextlib.contextmanager
    def pretrained(self) -> Iterator[None]:
        """Within the block every fused layer uses the pretrained parameters ``base`` alone (no knowledge, no ε)."""
        self._use_base = True
        try:
            yield
        finally:
            self._use_base = False

    @contextlib.contextmanager
    def evaluated_at(self, alpha: Tensor, theta: Tensor, *, scratch: bool = False) -> Iterator[None]:
        """Within the block the fused layers use ``base + softmax(s·alpha) @ deltas[:K] + theta`` for given values.

        ``alpha`` ``(K,)`` and ``theta`` ``(P,)`` set the values for the whole batch (they may require grad: autograd
        then reaches them through every fused layer); ``alpha`` ``(B, K)`` and ``theta`` ``(B, P)`` give every image
        of the batch its own values (the fused layers apply a per-sample affine). The bank's buffers are not touched.

        Args:
            alpha: the mixing logits, ``(K,)`` or ``(B, K)``.
            theta: the epsilons, ``(P,)`` or ``(B, P)``.
            scratch: ``theta`` was made for this block and is not read after it: a per-image ``theta`` that needs no
                grad then receives the effective values in place, so the block holds one ``(B, P)`` tensor, not two
                (the same values: the same two sums, and a floating-point sum does not depend on the order of its two
                terms).
        """
        k = self.num_entries
        override = torch.softmax(alpha * self.alpha_scale, dim=-1) @ self.deltas[:k]
        owned = scratch and theta.ndim == 2 and theta.is_contiguous() and not theta.requires_grad
        if owned and theta.shape == override.shape:
            self._override = theta.add_(override.add_(self.base))  # x + y == y + x exactly: the values below
            del override
        elif override.shape == torch.broadcast_shapes(override.shape, theta.shape):  # in place: one (B, P) copy alive
            self._override = override.add_(self.base).add_(theta)
        else:
            self._override = self.base + override + theta
        try:
            yield
        finally:
            self._override = None

    def layer_affine(self, index: int) -> tuple[Tensor, Tensor]:
        """Effective ``(weight, bias)`` of adapted layer ``index``, computed from the current bank state.

        Each is ``(width,)``, or ``(B, width)`` inside :meth:`evaluated_at` with per-sample values.
        """
        start, width = self.offsets[index], self.widths[index]
        fused = self.fused()
        return fused[..., start : start + width], fused[..., start + width : start + 2 * width]

    def scale_factor(self) -> float:
        """``s_f``: the largest per-layer mean |ε| (over γ and β blocks) divided by the weight margin (spec §5.3)."""
        per_segment = torch.zeros(2 * len(self.widths), dtype=self.theta.dtype, device=self.theta.device)
        per_segment.index_add_(0, self._segment, self.theta.abs())
        counts = torch.tensor(self.widths, dtype=self.theta.dtype, device=self.theta.device).repeat_interleave(2)
        return float((per_segment / counts).max()) / self.weight_margin

    def snapshot_similarity(self, a: Tensor, b: Tensor) -> float:
        """Mean over layers and over γ/β of the cosine similarity of two flat snapshots (spec §5.5)."""
        n = 2 * len(self.widths)
        dots = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, self._segment, a * b)
        na = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, self._segment, a * a).sqrt()
        nb = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, self._segment, b * b).sqrt()
        cos = dots / (na.clamp_min(1e-8) * nb.clamp_min(1e-8))
        return float(cos.mean())

    def most_similar_pair(self) -> tuple[int, int, float]:
        """Row-major first maximum ``(k, p, value)`` of the whole similarity matrix."""
        flat = int(torch.argmax(self.similarity.reshape(-1)))
        k, p = divmod(flat, self.max_entries)
        return k, p, float(self.similarity[k, p])

    def _rebase(self, delta_before: Tensor) -> None:
        """Move ``theta`` so that the effective parameters equal ``base + delta_before`` again."""
        k = self.num_entries
        self.theta.copy_(delta_before - self.mixing_weights() @ self.deltas[:k])

    def evict(self) -> int:
        """Remove the older member of the most similar stored pair; fold its contribution into ``theta``.

        Returns:
            The removed stack index (``>= 1``).

        Raises:
            RuntimeError: if the bank holds no non-zero entry.
        """
        k = self.num_entries
        if k < 2:
            raise RuntimeError("cannot evict from a knowledge bank without stored entries")
        row, col, _ = self.most_similar_pair()
        r = min(row, col)
        # A stale reference-mode cell may point past the live entries; clamp to the newest stored snapshot.
        r = min(r, k - 2)
        stack = r + 1
        delta_before = self.current_delta()
        self.deltas[stack : k - 1] = self.deltas[stack + 1 : k].clone()
        self.deltas[k - 1].zero_()
        self.alpha[stack : k - 1] = self.alpha[stack + 1 : k].clone()
        self.alpha[k - 1] = 0
        self.count -= 1
        self._rebase(delta_before)
        if self.compact_similarity:
            m = self.max_entries
            keep = [i for i in range(m) if i != r]
            compact = self.similarity[keep][:, keep].clone()
            self.similarity.zero_()
            self.similarity[: m - 1, : m - 1] = compact
        return stack

    def store(self) -> dict[str, float | int]:
        """Store the current adapted delta as a new knowledge entry (spec §5.3), evicting first when full.

        The effective parameters are unchanged: ``theta`` is re-based in place.

        Returns:
            A record of the event: ``evicted`` stack index (0 if none), ``scale_factor``, ``alpha_new`` and
            ``entries`` (``K`` after the store).
        """
        evicted = self.evict() if self.num_entries - 1 >= self.max_entries else 0
        k = self.num_entries
        s_f = self.scale_factor()
        logits = self.alpha[:k] * self.alpha_scale
        z_new = logits.max()
        if s_f > 1:
            z_new = torch.maximum(z_new, torch.logsumexp(logits, 0) + math.log(s_f - 1))
        alpha_new = float((z_new / self.alpha_scale).clamp(-self.alpha_clip, self.alpha_clip))
        delta_before = self.current_delta()
        self.deltas[k] = delta_before
        self.alpha[k] = alpha_new
        self.count += 1
        self._rebase(delta_before)
        a = k - 1  # matrix index of the new snapshot (stack index k)
        for j in range(a):
            self.similarity[j, a] = self.snapshot_similarity(self.deltas[j + 1], self.deltas[k])
        self.similarity[a, a] = 0
        return {"evicted": evicted, "scale_factor": s_f, "alpha_new": alpha_new, "entries": k + 1}


class _FusedNormMixin:
    """Shared plumbing: the bank is held by reference (not as a submodule), so it is registered once."""

    _index: int

    def _attach(self, bank: KnowledgeBank, index: int) -> None:
        object.__setattr__(self, "_bank", bank)
        self._index = index

    def fused_affine(self) -> tuple[Tensor, Tensor]:
        """The layer's effective ``(weight, bias)``: pretrained + mixed knowledge + epsilon."""
        bank: KnowledgeBank = self._bank  # type: ignore[attr-defined]
        return bank.layer_affine(self._index)


class FusedLayerNorm(_FusedNormMixin, nn.Module):
    """LayerNorm whose affine parameters are read from a :class:`KnowledgeBank` at every forward.

    Args:
        normalized_shape: as for ``nn.LayerNorm`` (a single trailing dimension).
        eps: variance epsilon.
        bank: the bank holding this layer's slice.
        index: the layer's position among the bank's adapted layers.
    """

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, bank: KnowledgeBank, index: int) -> None:
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self._attach(bank, index)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dimension with the fused affine parameters."""
        weight, bias = self.fused_affine()
        if weight.ndim == 1:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        shape = (weight.shape[0],) + (1,) * (x.ndim - 2) + (weight.shape[1],)  # one affine per image
        return affine(
            F.layer_norm(x, self.normalized_shape, None, None, self.eps), weight.view(shape), bias.view(shape)
        )

    def extra_repr(self) -> str:
        """Shape, epsilon and bank slot, for ``print(model)``."""
        return f"{self.normalized_shape}, eps={self.eps}, bank_index={self._index}"


def fuse_norms(
    model: nn.Module, layout: ModelLayout, statistics: BatchStatistics | None = None, **bank_options: Any
) -> KnowledgeBank:
    """Replace the layout's norm layers by fused layers reading one new bank; put every BatchNorm on batch statistics.

    Args:
        model: the network, modified in place.
        layout: which norm layers to adapt (``layout.norms``) and every BatchNorm (``layout.batch_norms``, spec §1.2).
        statistics: the batch settings and running estimates every BatchNorm follows (a new
            :class:`~zoa_lightning.core.batch_norm.BatchStatistics` of one process if ``None``; the caller keeps it
            to set them per batch).
        **bank_options: keyword arguments of :class:`KnowledgeBank` (``max_entries``, ``alpha_scale``, ...).

    Returns:
        The bank, its ``base`` the pretrained affine parameters of the adapted layers.

    Raises:
        ValueError: if an adapted layer has no affine weight and bias.
    """
    statistics = statistics if statistics is not None else BatchStatistics()
    modules = dict(model.named_modules())
    widths, bases, norms = [], [], []
    for name in layout.norms:
        m = modules[name]
        if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
            raise ValueError(f"norm layer {name!r} has no affine weight and bias to adapt")
        widths.append(m.weight.numel())
        bases.append(torch.cat([m.weight.detach().reshape(-1), m.bias.detach().reshape(-1)]))
        norms.append(m)
    bank = KnowledgeBank(widths, torch.cat(bases).float(), **bank_options)
    for index, (name, m) in enumerate(zip(layout.norms, norms, strict=True)):
        fused: nn.Module
        if isinstance(m, nn.LayerNorm):
            fused = FusedLayerNorm(tuple(m.normalized_shape), m.eps, bank, index)
        else:
            affine_of = functools.partial(bank.layer_affine, index)
            fused = FusedBatchNorm2d(m.num_features, m.eps, affine_of, statistics, running_statistics(m), post_norm(m))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
    use_batch_statistics_norms(model, layout.batch_norms, statistics)
    return bank
