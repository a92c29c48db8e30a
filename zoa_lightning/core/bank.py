"""The domain knowledge bank and the fused normalization layers that read it (spec §1.3, §5.3–§5.5).

All adapted affine parameters live in one flat layout of ``P`` values: the adapted layers in network order and, within
a layer, the scale (γ) block before the shift (β) block. :class:`KnowledgeBank` owns, in that layout,

* ``base``: the pretrained γ₀/β₀ (frozen);
* ``theta``: the learned residual deltas ε (the "epsilons"), updated by ZOA every batch;
* ``deltas``: a fixed-capacity store of ``max_entries + 1`` knowledge snapshots, row 0 the permanent zero entry;
* ``alpha``: the mixing logits (one per store row, only the first ``count`` used), shared by all layers;
* ``similarity``: the ``max_entries × max_entries`` cosine-similarity matrix used for eviction.

Every tensor has a fixed shape, so ``state_dict`` shapes never change as the bank grows, and every mutation is in place
(``copy_``, index assignment), which keeps the bank usable under ``torch.inference_mode`` (see lightning-notes §1).

The effective parameters of layer ℓ are ``base + softmax(s·alpha[:K]) @ deltas[:K] + theta`` restricted to the layer's
slice. :class:`FusedLayerNorm` and :class:`FusedBatchNorm2d` compute them at every forward from a reference to the bank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.stats import ReduceFn

__all__ = ["FusedBatchNorm2d", "FusedLayerNorm", "KnowledgeBank", "fuse_norms"]


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
    norm_statistics: Tensor
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
        batch_reduce: ReduceFn | None = None,
    ) -> None:
        super().__init__()
        self.batch_reduce = batch_reduce  # fused BatchNorms: batch statistics summed over processes (None: one)
        # BatchNorms of a pooled small batch mix in a running estimate of their test statistics (started from the
        # source statistics) with this prior strength (None: not); see batch_statistics_norm
        self.batch_prior: float | None = None
        self.record_norms = False  # the prediction pass of a pooled batch: BatchNorms record their statistics
        self._norm_pending: list[tuple[int, Tensor, Tensor, float]] = []
        self.register_buffer("norm_statistics", torch.zeros(0, dtype=torch.float64, device=base.device))
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

    def add_norm_statistics(self, mean: Tensor, var: Tensor) -> int:
        """Append a BatchNorm's running test statistics, started at ``(mean, var)``; returns their offset."""
        offset = self.norm_statistics.numel()
        start = torch.cat([mean.detach().reshape(-1), var.detach().reshape(-1)]).to(self.norm_statistics)
        self.norm_statistics = torch.cat([self.norm_statistics, start])
        return offset

    def commit_norm_statistics(self, images_per_window: int) -> None:
        """Fold the statistics the BatchNorms recorded in this batch's prediction pass into their running estimates.

        A batch of ``n`` images moves an estimate by ``n / images_per_window`` of the way to its own statistics.
        """
        for offset, mean, var, images in self._norm_pending:
            c = mean.numel()
            weight = min(1.0, images / images_per_window)
            row = self.norm_statistics[offset : offset + 2 * c]
            row.mul_(1 - weight).add_(torch.cat([mean, var]).to(row), alpha=weight)
        self._norm_pending.clear()

    def end_batch(self) -> None:
        """Forget the batch settings of the BatchNorms and anything they recorded (a batch ended or was rolled back)."""
        self.batch_prior, self.record_norms = None, False
        self._norm_pending.clear()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "norm_statistics"
        if key not in state_dict:  # a state dict from before the running estimates: keep their starting values
            state_dict[key] = self.norm_statistics.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    def evaluated_at(self, alpha: Tensor, theta: Tensor) -> Iterator[None]:
        """Within the block the fused layers use ``base + softmax(s·alpha) @ deltas[:K] + theta`` for given values.

        ``alpha`` ``(K,)`` and ``theta`` ``(P,)`` set the values for the whole batch (they may require grad: autograd
        then reaches them through every fused layer); ``alpha`` ``(B, K)`` and ``theta`` ``(B, P)`` give every image
        of the batch its own values (the fused layers apply a per-sample affine). The bank's buffers are not touched.
        """
        k = self.num_entries
        override = torch.softmax(alpha * self.alpha_scale, dim=-1) @ self.deltas[:k]
        if override.shape == torch.broadcast_shapes(override.shape, theta.shape):  # in place: one (B, P) copy alive
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


def _affine(normed: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``normed · weight + bias`` for per-image affine parameters; in place on ``normed`` when no gradient needs it."""
    if torch.is_grad_enabled() and (normed.requires_grad or weight.requires_grad or bias.requires_grad):
        return torch.addcmul(bias, normed, weight)
    return torch.addcmul(bias, normed, weight, out=normed)  # the same values as the out-of-place call


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
        return _affine(
            F.layer_norm(x, self.normalized_shape, None, None, self.eps), weight.view(shape), bias.view(shape)
        )

    def extra_repr(self) -> str:
        """Shape, epsilon and bank slot, for ``print(model)``."""
        return f"{self.normalized_shape}, eps={self.eps}, bank_index={self._index}"


class FusedBatchNorm2d(_FusedNormMixin, nn.Module):
    """BatchNorm2d that normalises with the current batch's statistics and fused affine parameters.

    Running statistics are not updated (spec §1.2), so the layer behaves the same in train and eval mode. The replaced
    layer's running statistics start the bank's running estimate of its test statistics, which a small batch mixes in
    (:func:`batch_statistics_norm`).

    Args:
        num_features: channel count.
        eps: variance epsilon.
        bank: the bank holding this layer's slice.
        index: the layer's position among the bank's adapted layers.
        post: what the replaced layer applied after normalising (timm's ``BatchNormAct2d`` carries its dropout and
            activation inside the norm layer); ``None`` for a plain BatchNorm.
        source: the replaced layer's ``(running_mean, running_var)``, or ``None`` (then zeros and ones).
    """

    def __init__(
        self,
        num_features: int,
        eps: float,
        bank: KnowledgeBank,
        index: int,
        post: nn.Module | None = None,
        source: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.post = post
        self._attach(bank, index)
        self._norm_offset = _add_norm_statistics(bank, num_features, source)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with batch statistics over (N, H, W) and the fused affine parameters."""
        weight, bias = self.fused_affine()
        bank: KnowledgeBank = self._bank  # type: ignore[assignment]
        if _needs_own_norm(x, bank):  # several processes, a pooled small batch, or one value per channel
            shape = (*weight.shape, 1, 1) if weight.ndim == 2 else (1, -1, 1, 1)
            normed = batch_statistics_norm(x, self.eps, bank, self._norm_offset)
            out = _affine(normed, weight.view(shape), bias.view(shape))
        elif weight.ndim == 1:
            out = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        else:  # one affine per image
            shape = (*weight.shape, 1, 1)
            out = _affine(
                F.batch_norm(x, None, None, None, None, True, 0.0, self.eps), weight.view(shape), bias.view(shape)
            )
        return out if self.post is None else self.post(out)

    def extra_repr(self) -> str:
        """Channels, epsilon and bank slot, for ``print(model)``."""
        return f"{self.num_features}, eps={self.eps}, bank_index={self._index}"


def _add_norm_statistics(bank: KnowledgeBank, channels: int, source: tuple[Tensor, Tensor] | None) -> int:
    """Give a BatchNorm its running test statistics in ``bank``, started at its source (running) statistics."""
    mean, var = source if source is not None else (torch.zeros(channels), torch.ones(channels))
    return bank.add_norm_statistics(mean, var)


def _needs_own_norm(x: Tensor, bank: KnowledgeBank) -> bool:
    """Whether ``torch``'s batch norm will not do: a reduction over processes, a prior, or one value per channel."""
    return bank.batch_reduce is not None or bank.batch_prior is not None or x.numel() == x.shape[1]


def batch_statistics_norm(x: Tensor, eps: float, bank: KnowledgeBank, offset: int) -> Tensor:
    """Normalise ``x`` ``(B, C, H, W)`` with its batch's per-channel statistics, as the bank's batch settings say.

    The sums go through ``bank.batch_reduce`` when several processes share the batch (:func:`reduced_batch_norm`).
    With ``bank.batch_prior = N₀`` (a pooled small batch, ``docs/small_batches.md``) the batch's mean and biased
    variance over its ``n`` images are mixed with a running estimate ``r`` of the layer's test statistics,
    ``(N₀·r + n·batch) / (N₀ + n)``, the variance that of the mixture (with the spread of the two means): Schneider
    et al.'s prior normalisation (NeurIPS 2020) with the prior kept as a moving estimate over the last
    ``pool_images`` images, as RoTTA's robust BatchNorm keeps it (Yuan et al., CVPR 2023).
    ``r`` starts at the layer's source statistics (``bank.norm_statistics`` at ``offset``). A batch with one value per
    channel (one image of a ``1×1`` map) uses that mix with ``N₀ = 1`` when no prior is set (its variance is zero).
    """
    prior = bank.batch_prior
    if prior is None and x.numel() == x.shape[1] and bank.batch_reduce is None:
        prior = 1.0
    if prior is None:
        return reduced_batch_norm(x, eps, bank.batch_reduce or (lambda stats: stats))
    c = x.shape[1]
    wide = x.double()
    s1, s2 = wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3))
    stats = torch.cat([s1, s2, s1.new_tensor([x.numel() // c, x.shape[0]])])
    if bank.batch_reduce is not None:
        stats = bank.batch_reduce(stats)
    mean = stats[:c] / stats[2 * c]
    var = (stats[c : 2 * c] / stats[2 * c] - mean * mean).clamp_min(0)
    images = float(stats[2 * c + 1])
    if bank.record_norms:
        bank._norm_pending.append((offset, mean, var, images))
    running = bank.norm_statistics[offset : offset + 2 * c].to(mean.device)
    weight = images / (images + prior)
    spread = weight * (1 - weight) * (mean - running[:c]) ** 2  # the mixture's variance includes its means' spread
    mean = weight * mean + (1 - weight) * running[:c]
    var = weight * var + (1 - weight) * running[c:] + spread
    scale = torch.rsqrt(var + eps).to(x.dtype).view(1, c, 1, 1)
    return (x - mean.to(x.dtype).view(1, c, 1, 1)) * scale


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


class _BankBatchNorm:
    """Mixin for a network's own (not adapted) BatchNorms: the bank's batch settings (processes, small-batch prior)."""

    bank: KnowledgeBank
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    norm_offset: int

    def forward(self, x: Tensor) -> Tensor:
        """Normalise as :func:`batch_statistics_norm` says when needed, else as the layer itself (batch statistics)."""
        if not _needs_own_norm(x, self.bank):
            return super().forward(x)  # type: ignore[misc]
        out = batch_statistics_norm(x, self.eps, self.bank, self.norm_offset)
        if self.weight is not None and self.bias is not None:
            out = torch.addcmul(self.bias.view(1, -1, 1, 1), out, self.weight.view(1, -1, 1, 1))
        post = _post_norm(self)  # type: ignore[arg-type]
        return out if post is None else post(out)


_BANK_CLASSES: dict[type, type] = {}


def _bank_batch_norm(bn: nn.BatchNorm2d, bank: KnowledgeBank) -> None:
    """Make ``bn`` (in place, keeping its parameters and state-dict keys) follow the bank's batch settings."""
    cls = type(bn)
    if cls not in _BANK_CLASSES:
        _BANK_CLASSES[cls] = type(f"Bank{cls.__name__}", (_BankBatchNorm, cls), {})
    object.__setattr__(bn, "bank", bank)  # a reference, not a submodule
    bn.__class__ = _BANK_CLASSES[cls]


def _post_norm(norm: nn.Module) -> nn.Module | None:
    """What a norm layer applies after normalising, e.g. timm ``BatchNormAct2d``'s dropout and activation."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
        return nn.Sequential(*(m for m in (drop, act) if isinstance(m, nn.Module)))
    return None


def fuse_norms(model: nn.Module, layout: ModelLayout, **bank_options: Any) -> KnowledgeBank:
    """Replace the layout's norm layers by fused layers reading one new bank; put every BatchNorm on batch statistics.

    Args:
        model: the network, modified in place.
        layout: which norm layers to adapt (``layout.norms``) and every BatchNorm (``layout.batch_norms``, spec §1.2).
        **bank_options: keyword arguments of :class:`KnowledgeBank` (``max_entries``, ``alpha_scale``, ...). With
            ``batch_reduce`` (several processes) every BatchNorm, adapted or not, normalises with the statistics of
            the global batch summed through it.

    Returns:
        The bank, its ``base`` the pretrained affine parameters of the adapted layers.

    Raises:
        ValueError: if an adapted layer has no affine weight and bias.
    """
    modules = dict(model.named_modules())
    widths, bases, norms = [], [], []
    for name in layout.norms:
        m = modules[name]
        if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
            raise ValueError(f"norm layer {name!r} has no affine weight and bias to adapt")
        widths.append(m.weight.numel())
        bases.append(torch.cat([m.weight.detach().reshape(-1), m.bias.detach().reshape(-1)]))
        norms.append(m)
    bank = KnowledgeBank(widths, torch.cat(bases).float(), **bank_options)  # type: ignore[arg-type]
    for index, (name, m) in enumerate(zip(layout.norms, norms, strict=True)):
        fused: nn.Module
        if isinstance(m, nn.LayerNorm):
            fused = FusedLayerNorm(tuple(m.normalized_shape), m.eps, bank, index)
        else:
            fused = FusedBatchNorm2d(m.num_features, m.eps, bank, index, post=_post_norm(m), source=_running(m))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
    for name in layout.batch_norms:
        bn = model.get_submodule(name)
        if isinstance(bn, nn.BatchNorm2d):
            source = _running(bn)
            bn.track_running_stats = False
            bn.running_mean = None
            bn.running_var = None
            _bank_batch_norm(bn, bank)
            object.__setattr__(bn, "norm_offset", _add_norm_statistics(bank, bn.num_features, source))
    return bank


def _running(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """A BatchNorm's ``(running_mean, running_var)`` (its source statistics), or ``None`` if it tracks none."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    return (mean, var) if isinstance(mean, Tensor) and isinstance(var, Tensor) else None
