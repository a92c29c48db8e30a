"""Zeroth-order gradient estimation (spec §3.1–§3.2) and the two update rules ZOA applies (spec §3.3).

Pure functions on tensors: the engine owns the state (parameters, momentum buffer, generator) and calls these.

Example:
    A one-sided SPSA estimate on a quadratic points along the true gradient on average:

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.tensor([1.0, -2.0, 0.5])
    >>> est = estimate_gradient(lambda v: (v**2).sum(), x, c=1e-3, num_queries=2000, generator=g)
    >>> float(torch.cosine_similarity(est, 2 * x, dim=0)) > 0.9
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "adamw_first_step_",
    "estimate_gradient",
    "segmented_uniform",
    "sgd_step_",
    "spsa_estimate",
    "spsa_gradients",
]


def segmented_uniform(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw ``n`` perturbation coordinates from the segmented uniform ``[-1, -0.5] ∪ [0.5, 1]`` (spec §3.1).

    Magnitudes ``m ~ U[0.5, 1)`` are drawn first, then signs ``±1`` with probability ½ each, both from ``generator``
    (a CPU generator: the draws are identical whatever device the model runs on).

    Args:
        n: number of coordinates.
        generator: the engine's dedicated generator.
        dtype: floating dtype of the result.

    Returns:
        A CPU tensor of shape ``(n,)``.
    """
    magnitude = (torch.rand(n, generator=generator, dtype=dtype) + 1) / 2
    flip = torch.bernoulli(torch.full((n,), 0.5, dtype=dtype), generator=generator)
    return magnitude * (1 - 2 * flip)


def spsa_estimate(loss_plus: Tensor, loss0: Tensor, perturbation: Tensor, c: float) -> Tensor:
    """One-sided SPSA estimate ``(L+ - L0) / (c * u)``, element by element (note the division by ``u``).

    Args:
        loss_plus: loss at ``x + c * u`` (a scalar tensor).
        loss0: loss at ``x``.
        perturbation: the perturbation direction ``u``.
        c: the perturbation scale.

    Returns:
        The estimate, shaped like ``perturbation``.
    """
    return (loss_plus - loss0).to(perturbation.dtype) / (c * perturbation)


def estimate_gradient(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    c: float,
    num_queries: int = 1,
    generator: torch.Generator,
    loss0: Tensor | None = None,
) -> Tensor:
    """Average of ``num_queries`` one-sided SPSA estimates of ``grad loss_fn(x)``.

    Args:
        loss_fn: maps a flat parameter vector to a scalar loss; called ``num_queries`` times (plus once for
            ``loss0`` if it is not given).
        x: the point, a flat tensor.
        c: perturbation scale.
        num_queries: number of perturbations averaged (``sp_avg``).
        generator: source of the perturbations.
        loss0: ``loss_fn(x)`` if already known (ZOA reuses the prediction pass's loss).

    Returns:
        The averaged estimate, shaped like ``x``.
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    base = loss_fn(x) if loss0 is None else loss0
    total = torch.zeros_like(x)
    for _ in range(num_queries):
        u = segmented_uniform(x.numel(), generator, x.dtype).to(x.device).view_as(x)
        total += spsa_estimate(loss_fn(x + c * u), base, u, c)
    return total / num_queries


def spsa_gradients(
    loss_at: Callable[[Tensor, Tensor], Tensor],
    alpha: Tensor,
    theta: Tensor,
    loss0: Tensor | None,
    *,
    c_alpha: float,
    c: float,
    repeats: int,
    generator: torch.Generator,
    check: Callable[[Tensor, Tensor], None] | None = None,
    sampler: Callable[[int, torch.Generator, torch.dtype], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """ZOA's one-sided SPSA estimates of the gradients in the mixing logits and the epsilons (spec §3.1-§3.2).

    Each repetition draws ``u_α`` then ``u_θ`` (segmented uniform), evaluates the loss at both perturbed at once and
    divides the loss difference by ``c·u``; the repetitions are averaged. Without a known ``loss0`` (a later step of a
    batch) the unperturbed loss is evaluated once, after the first perturbed one, and reused.

    Args:
        loss_at: the loss at given ``(alpha, theta)`` (one forward pass each call).
        alpha: the current mixing logits in use.
        theta: the current epsilons.
        loss0: the loss at ``(alpha, theta)`` if known (ZOA's first step reuses the prediction pass's).
        c_alpha: perturbation scale of the logits.
        c: perturbation scale of the epsilons.
        repeats: estimates averaged (``sp_avg``).
        generator: source of the perturbations.
        check: called with ``(loss_plus, loss0)`` after each repetition's passes (e.g. to reject non-finite losses).
        sampler: draws ``n`` perturbation coordinates (default :func:`segmented_uniform`, the reference's).

    Returns:
        ``(grad_alpha, grad_theta)``.
    """
    draw = sampler or segmented_uniform
    grad_alpha, grad_theta = torch.zeros_like(alpha), torch.zeros_like(theta)
    for _ in range(repeats):
        u_alpha = draw(alpha.numel(), generator, alpha.dtype).to(alpha.device)
        u_theta = draw(theta.numel(), generator, theta.dtype).to(theta.device)
        loss_plus = loss_at(alpha + c_alpha * u_alpha, theta + c * u_theta)
        if loss0 is None:
            loss0 = loss_at(alpha, theta)
        if check is not None:
            check(loss_plus, loss0)
        grad_alpha += spsa_estimate(loss_plus, loss0, u_alpha, c_alpha)
        grad_theta += spsa_estimate(loss_plus, loss0, u_theta, c)
    return grad_alpha / repeats, grad_theta / repeats


def sgd_step_(
    param: Tensor,
    grad: Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    momentum_buffer: Tensor | None = None,
    first_step: bool = True,
) -> None:
    """In-place SGD step with coupled (L2) weight decay and optional momentum, as ``torch.optim.SGD`` does it.

    ``d = grad + weight_decay * param``; with momentum, ``buf = d`` on the first step and
    ``buf = momentum * buf + d`` afterwards, and ``d = buf``; then ``param -= lr * d``.

    Args:
        param: the parameters, updated in place.
        grad: the gradient estimate.
        lr: learning rate.
        weight_decay: coupled decay coefficient.
        momentum: momentum factor (0 disables the buffer).
        momentum_buffer: the buffer, updated in place; required when ``momentum > 0``.
        first_step: whether the buffer holds no history yet.
    """
    d = grad + weight_decay * param if weight_decay else grad.clone()
    if momentum:
        if momentum_buffer is None:
            raise ValueError("momentum > 0 needs a momentum_buffer")
        if first_step:
            momentum_buffer.copy_(d)
        else:
            momentum_buffer.mul_(momentum).add_(d)
        d = momentum_buffer
    param.add_(d, alpha=-lr)


def adamw_first_step_(param: Tensor, grad: Tensor, *, lr: float, weight_decay: float, eps: float = 1e-8) -> None:
    """In-place closed form of a first AdamW step (bias-corrected moments equal ``grad`` and ``grad**2``).

    ``param <- param * (1 - lr * weight_decay) - lr * grad / (|grad| + eps)``. ZOA wipes the AdamW state after every
    step, so every step of the logits is this one (spec §3.3).

    Args:
        param: the parameters, updated in place.
        grad: the gradient estimate.
        lr: learning rate.
        weight_decay: decoupled decay coefficient.
        eps: Adam's denominator epsilon.
    """
    param.mul_(1 - lr * weight_decay).sub_(lr * grad / (grad.abs() + eps))
