r"""Shared fake-quantisation primitives (spec §7): simulated uniform quantisers and the interval-search helpers.

Everything here is pure tensor maths with no module state, so both quantisation back-ends can use it. Quantised
values are de-quantised at once ("fake" quantisation): the result is a float tensor on a grid of at most ``2**bits``
levels, computed in the input's dtype.

Notation (spec §7):
:math:`Q_b^{\Delta}(x)=\Delta\cdot\mathrm{clamp}(\mathrm{round}(x/\Delta),-2^{b-1},2^{b-1}-1)`,
with ``torch.round`` (round half to even).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GELU_NEGATIVE_RANGE",
    "PTQ4VIT_BITS",
    "fake_quant_post_gelu",
    "fake_quant_post_softmax",
    "fake_quant_uniform",
    "interval_candidate_scales",
    "max_abs_interval",
    "post_gelu_negative_interval",
    "softmax_split_candidates",
    "validate_bits",
]

#: Bit widths (inclusive range) of the PTQ4ViT-style quantisers, weights and activations alike. At 1 bit the
#: post-softmax twin-range quantiser has no grid step (``q = 2**(b-1) - 1 = 0``: it divides by zero) and the post-GELU
#: one no positive level, so 2 is the least; 16 is the cap :func:`validate_bits` enforces.
PTQ4VIT_BITS: tuple[int, int] = (2, 16)

#: Magnitude of GELU's minimum (about -0.17): the fixed range of the negative grid of the post-GELU quantiser.
GELU_NEGATIVE_RANGE: float = 0.16997124254703522


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _records_grad(*tensors: Tensor | float) -> bool:
    """Whether autograd would record an operation on any of ``tensors`` (then the out-of-place, STE path runs)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _round(x: Tensor) -> Tensor:
    """Round half to even; gradients pass straight through, so a first-order method (Tent) can adapt the model.

    The forward value is ``torch.round(x)`` either way; the estimator only exists when autograd records.
    """
    return _RoundSTE.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.round(x)


def validate_bits(bits: int, what: str) -> int:
    """Check that ``bits`` is a usable bit width and return it.

    Args:
        bits: the bit width.
        what: what the width is for, used in the error message (e.g. ``"w_bits"``).

    Returns:
        ``bits`` unchanged.

    Raises:
        ValueError: if ``bits`` is not an integer in :data:`PTQ4VIT_BITS` (``[2, 16]``).
    """
    low, high = PTQ4VIT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {bits!r}")
    return bits


def fake_quant_uniform(x: Tensor, delta: Tensor | float, bits: int) -> Tensor:
    r"""Signed symmetric uniform fake quantisation :math:`Q_b^{\Delta}(x)`.

    Args:
        x: values to quantise.
        delta: quantisation interval(s), broadcastable against ``x``.
        bits: bit width ``b``; the integer grid is ``[-2**(b-1), 2**(b-1) - 1]``.

    Returns:
        ``delta * clamp(round(x / delta), -2**(b-1), 2**(b-1) - 1)``, broadcast shape of ``x`` and ``delta``.

    Example:
        >>> fake_quant_uniform(torch.tensor([-1.0, 0.26, 0.74, 5.0]), 0.5, bits=3)
        tensor([-1.0000,  0.5000,  0.5000,  1.5000])
    """
    qmax = 2 ** (bits - 1)
    if not _records_grad(x, delta):  # same values, one temporary instead of four
        return (x / delta).round_().clamp_(-qmax, qmax - 1).mul_(delta)
    return torch.clamp(_round(x / delta), -qmax, qmax - 1) * delta


def post_gelu_negative_interval(bits: int) -> float:
    r"""Fixed interval of the negative grid of the post-GELU quantiser, ``0.16997124254703522 / 2**(b-1)``.

    Args:
        bits: activation bit width ``b``.

    Returns:
        The interval :math:`\Delta_-`.
    """
    return GELU_NEGATIVE_RANGE / 2 ** (bits - 1)


def fake_quant_post_gelu(x: Tensor, delta_pos: Tensor | float, bits: int) -> Tensor:
    r"""Post-GELU twin-uniform fake quantisation (spec §7.1).

    Positive values use the searched interval ``delta_pos`` on the grid ``[0, 2**(b-1) - 1]``; negative values use
    the fixed interval :func:`post_gelu_negative_interval` on ``[-2**(b-1), 0]``. The output takes at most ``2**b``
    distinct values (``2**(b-1)`` non-negative and ``2**(b-1)`` negative ones).

    Args:
        x: values to quantise (the GELU output).
        delta_pos: interval :math:`\Delta_+` for the positive part, broadcastable against ``x``.
        bits: bit width ``b``.

    Returns:
        The fake-quantised tensor.
    """
    qmax = 2 ** (bits - 1)
    delta_neg = post_gelu_negative_interval(bits)
    if not _records_grad(x, delta_pos):
        # Each value lives on one grid only (the other term is exactly zero), so pick its interval and quantise once.
        delta = torch.where(x >= 0, _as_tensor(delta_pos, x), delta_neg)
        return (x / delta).round_().clamp_(-qmax, qmax - 1).mul_(delta)
    pos = torch.clamp(_round(x / delta_pos), 0, qmax - 1) * delta_pos
    neg = torch.clamp(_round(x / delta_neg), -qmax, 0) * delta_neg
    return pos + neg


def fake_quant_post_softmax(x: Tensor, split: Tensor | float, bits: int) -> Tensor:
    r"""Post-softmax twin-range fake quantisation, exactly the reference formula of spec §7.1.

    With :math:`q=2^{b-1}-1` and :math:`\Delta_\rho=\rho/q`:
    :math:`\hat x=\mathrm{clamp}(\mathrm{round}(q\,\mathrm{clamp}(x,\rho,1)),0,q)/q
    +\Delta_\rho\,\mathrm{clamp}(\mathrm{round}(\mathrm{clamp}(x,0,\rho)/\Delta_\rho),0,q)`.
    Each term takes at most ``q + 1 = 2**(b-1)`` values, so the output takes at most ``2**b`` distinct values.
    Note the quirk the spec keeps: below the split the first term adds the constant ``round(q * split) / q`` and above
    it the second term adds ``split``.

    Args:
        x: probabilities in ``[0, 1]``.
        split: the split :math:`\rho`, broadcastable against ``x``.
        bits: bit width ``b``.

    Returns:
        The fake-quantised tensor.
    """
    q = 2 ** (bits - 1) - 1
    split_t = _as_tensor(split, x)
    delta_low = split_t / q
    high = torch.clamp(_round(q * torch.clamp(x, min=split_t, max=_scalar(1.0, x))), 0, q) / q
    low = torch.clamp(_round(torch.clamp(x, min=_scalar(0.0, x), max=split_t) / delta_low), 0, q)
    return high + low * delta_low


def max_abs_interval(max_abs: Tensor, bits: int) -> Tensor:
    """Initial ("max-abs") interval ``max_abs / (2**(b-1) - 0.5)`` of spec §7.1 step 3.

    A zero range (an all-zero weight block, say) would give a zero interval and a division by zero; it is replaced
    by the smallest positive normal number of the dtype, so such values quantise to exactly zero.

    Args:
        max_abs: largest magnitude per interval (any shape).
        bits: bit width ``b``.

    Returns:
        The intervals, same shape as ``max_abs``.
    """
    delta = max_abs / (2 ** (bits - 1) - 0.5)
    return torch.clamp(delta, min=torch.finfo(delta.dtype).tiny)


def interval_candidate_scales(
    num_candidates: int = 100, low: float = 0.01, high: float = 1.2, *, device: torch.device | None = None
) -> Tensor:
    """Multipliers of the initial interval searched by the calibration (spec §7.1 step 4).

    The grid ``low + i * (high - low) / num_candidates`` is defined for ``i = 0..num_candidates`` but, as in the
    reference, its last point is never evaluated. With the defaults: ``0.01 + 0.0119 i`` for ``i = 0..99``.

    Args:
        num_candidates: number of evaluated candidates.
        low: smallest multiplier.
        high: end of the grid (excluded).
        device: device of the result.

    Returns:
        A float32 tensor of shape ``(num_candidates,)``.

    Example:
        >>> interval_candidate_scales(4)
        tensor([0.0100, 0.3075, 0.6050, 0.9025])
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    step = (high - low) / num_candidates
    return torch.tensor([low + i * step for i in range(num_candidates)], dtype=torch.float32, device=device)


def softmax_split_candidates(num: int = 20, *, device: torch.device | None = None) -> Tensor:
    r"""Splits :math:`\rho\in\{2^{-i}: i=0..num-1\}` searched for the post-softmax quantiser.

    Args:
        num: number of candidates (20 in the spec).
        device: device of the result.

    Returns:
        A float32 tensor of shape ``(num,)``, largest first.
    """
    return torch.tensor([2.0**-i for i in range(num)], dtype=torch.float32, device=device)


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    """Return ``value`` as a tensor with the dtype and device of ``like``."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor holding ``value`` with the dtype and device of ``like``."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)
