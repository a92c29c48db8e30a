"""Gradient estimators beside ZOA's SPSA (``docs/estimators.md``): the per-sample two-pass estimator and the oracle.

The per-sample estimator: one perturbed pass, one direction per image.

In pass B every image ``i`` runs with its own perturbation ``c·u_i`` of the adapted values, so the pass yields ``B``
directional differences instead of one. ZOA's loss couples the images through batch statistics, so each image's loss
difference is attributed by linearising the statistics term around pass A (closed-form weights, no backprop):

``δ_i = (H_i⁺ − H_i)/n + ⟨W_i, F_i⁺ − F_i⟩``, with
``W_ij = λ·w_j·[2(σ_j − s_j)(F_ij − μ_j)/((n − 1)·σ_j) + 2(μ_j − m_j)/n]``,

``F`` the loss features, ``μ, σ`` their batch mean and std over all ``n`` images (all processes), ``m, s`` the source
statistics, ``w_j = 1/(T·d_t)`` the weight of dimension ``j`` of tap ``t`` in the loss (``T`` taps), ``H`` the
prediction entropies. To first order ``δ_i = c·⟨g_i, u_i⟩`` where ``Σ_i g_i`` is the loss gradient, so
``ĝ = Σ_i δ_i·u_i / (c·E[u²])`` is unbiased; its error falls with the alignment of the per-image gradients.

With ``tap_attribution`` the difference is split by loss tap, ``δ_i = Σ_t δ_it`` (the entropy joins the last tap,
the head input), and an epsilon ``p`` is credited only with the taps its layer runs before:
``ĝ_p = Σ_i (Σ_{t ≥ f(p)} δ_it)·u_ip / (c·E[u²])``, ``f(p)`` the first tap computed after ``p``'s layer. The terms left
out have zero expectation against ``u_ip`` (a tap computed before a layer cannot depend on it), so the estimate stays
unbiased and loses their noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

from zoa_lightning.core.config import ZOAConfig
from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.source import SourceStatistics
from zoa_lightning.core.spsa import segmented_uniform, spsa_gradients
from zoa_lightning.core.stats import ReduceFn, finish, gather_rows, row_counts, softmax_entropy

__all__ = [
    "GradientEstimator",
    "PassOutput",
    "Perturbation",
    "check_estimator",
    "draw_directions",
    "draw_perturbations",
    "estimate_from_differences",
    "exact_gradients",
    "first_tap_of_values",
    "per_sample_differences",
    "per_sample_gradients",
    "perturbation_second_moment",
    "sample_differences",
    "sample_power",
    "sampler",
    "statistics_weights",
    "tap_differences",
]

Perturbation = Literal["rademacher", "segmented_uniform"]


def sampler(kind: Perturbation | None) -> Callable[[int, torch.Generator, torch.dtype], Tensor]:
    """Draws ``n`` perturbation coordinates of ``kind`` (default the segmented uniform), for ``spsa_gradients``."""
    if kind == "rademacher":
        return lambda n, generator, dtype: draw_perturbations(1, n, "rademacher", generator).view(n).to(dtype)
    return segmented_uniform


def check_estimator(config: ZOAConfig, layout: ModelLayout, world_size: int) -> None:
    """Refuse an estimator the network or the run cannot support, naming the option to change.

    Raises:
        TypeError: ``per_sample`` on a network with BatchNorm layers (they couple the images in the forward pass,
            so one image's perturbation changes the others' features).
        ValueError: ``first_order`` on several processes.
    """
    if config.estimator == "per_sample" and (layout.kind == "cnn" or layout.batch_norms):
        raise TypeError(
            "estimator='per_sample' needs a network whose images do not interact in the forward pass (a ViT with "
            "LayerNorm); this one normalises with batch statistics (BatchNorm), which couples the images, so one "
            "image's perturbation would move every other image's features. Use estimator='spsa' for it"
        )
    if config.estimator == "first_order" and world_size > 1:
        raise ValueError(
            "estimator='first_order' (the autograd oracle) runs on one process: its loss gradient cannot flow through "
            f"the statistics all-reduce of {world_size} processes. Run it without DDP"
        )


def perturbation_second_moment(kind: Perturbation) -> float:
    """``E[u²]`` of one coordinate: 1 for Rademacher signs, 7/12 for the segmented uniform ``[-1,-½] ∪ [½,1]``."""
    return 1.0 if kind == "rademacher" else 7.0 / 12.0


def draw_perturbations(rows: int, size: int, kind: Perturbation, generator: torch.Generator) -> Tensor:
    """``(rows, size)`` perturbation directions from ``generator`` (CPU, float32), one row per image of the batch.

    Drawn for the global batch in global sample order, so every process draws the same rows and takes its own slice.
    """
    return draw_directions(rows, size, kind, generator).float()


def draw_directions(rows: int, size: int, kind: Perturbation, generator: torch.Generator) -> Tensor:
    """:func:`draw_perturbations`' directions in their compact dtype: Rademacher signs as int8 ``±1``, else float32.

    The same draws from ``generator``, so ``draw_directions(...).float()`` equals ``draw_perturbations(...)``.
    """
    if kind == "rademacher":
        return torch.randint(0, 2, (rows, size), generator=generator, dtype=torch.int8).mul_(2).sub_(1)
    return segmented_uniform(rows * size, generator).view(rows, size)


def statistics_weights(
    features: Tensor,
    mean: Tensor,
    std: Tensor,
    source_mean: Tensor,
    source_std: Tensor,
    tap_dims: Sequence[int],
    lambda_bp: float,
    n: float,
) -> Tensor:
    """``W``, ``(B, F)`` float64: the derivative of the statistics term of ZOA's loss in each image's features.

    Args:
        features: this process's loss features ``(B, F)`` of the clean pass.
        mean: the batch mean of every feature over all ``n`` images (float64, ``(F,)``).
        std: their unbiased batch std (``(F,)``).
        source_mean: source means ``m`` (``(F,)``).
        source_std: source stds ``s`` (``(F,)``).
        tap_dims: the width of each loss tap, network order (the loss averages each tap, then the taps).
        lambda_bp: ``λ``.
        n: the global batch size.
    """
    weight = torch.cat([torch.full((d,), 1.0 / (len(tap_dims) * d), dtype=torch.float64) for d in tap_dims])
    weight = weight.to(features.device)
    std = std.double()
    std_term = 2 * (std - source_std.double()) / ((n - 1) * std.clamp_min(1e-12))
    centred = features.double() - mean.double()
    return lambda_bp * weight * (std_term * centred + 2 * (mean.double() - source_mean.double()) / n)


def sample_differences(
    weights: Tensor,
    features: Tensor,
    features_plus: Tensor,
    logits: Tensor,
    logits_plus: Tensor,
    n: float,
) -> Tensor:
    """``δ_i = (H_i⁺ − H_i)/n + ⟨W_i, F_i⁺ − F_i⟩`` for this process's images, ``(B,)`` float64."""
    return _entropy_change(logits, logits_plus) / n + (weights * (features_plus.double() - features.double())).sum(1)


def _entropy_change(logits: Tensor, logits_plus: Tensor) -> Tensor:
    """``H_i⁺ − H_i`` per image, float64."""
    return softmax_entropy(logits_plus.float()).double() - softmax_entropy(logits.float()).double()


def tap_differences(
    weights: Tensor,
    features: Tensor,
    features_plus: Tensor,
    logits: Tensor,
    logits_plus: Tensor,
    n: float,
    tap_dims: Sequence[int],
) -> Tensor:
    """``δ_it``, ``(B, T)`` float64: :func:`sample_differences` split by loss tap, the entropy in the last (head)."""
    terms = weights * (features_plus.double() - features.double())
    split = torch.stack([part.sum(1) for part in terms.split(list(tap_dims), dim=1)], 1)
    split[:, -1] += _entropy_change(logits, logits_plus) / n
    return split


def first_tap_of_values(first_taps: Sequence[int], widths: Sequence[int]) -> Tensor:
    """``(P,)``: each epsilon's first loss tap, from each adapted layer's (``2·widths[l]`` epsilons per layer)."""
    return torch.repeat_interleave(torch.tensor(list(first_taps)), 2 * torch.tensor(list(widths)))


def estimate_from_differences(
    differences: Tensor, directions: Tensor, c: float, second_moment: float, first_tap: Tensor | None = None
) -> Tensor:
    """``ĝ = Σ_i δ_i·u_i / (c·E[u²])`` from the global batch's differences and directions ``(n, P)``.

    ``differences`` is ``(n,)``, or ``(n, T)`` per loss tap with ``first_tap`` ``(P,)``: each value is then credited
    with the taps from its first one on (``Σ_{t ≥ first_tap[p]} δ_it``).
    """
    if differences.ndim == 1:
        return (differences.to(directions.dtype) @ directions) / (c * second_moment)
    if first_tap is None:
        raise ValueError("per-tap differences need first_tap, the first loss tap each value can reach")
    from_tap = differences.flip(1).cumsum(1).flip(1)  # column t: the sum over taps t..T-1
    credit = from_tap.to(directions.dtype)[:, first_tap.to(directions.device)]
    return (credit * directions).sum(0) / (c * second_moment)


def per_sample_differences(
    pass_at: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    features: Tensor,
    logits: Tensor,
    stats: Tensor,
    source_mean: Tensor,
    source_std: Tensor,
    tap_dims: Sequence[int],
    lambda_bp: float,
    alpha: Tensor,
    theta: Tensor,
    *,
    c: float,
    c_alpha: float,
    kind: Perturbation,
    generator: torch.Generator,
    reduce_fn: ReduceFn,
    rank: int = 0,
    world_size: int = 1,
    per_tap: bool = False,
    images: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The perturbed pass of the per-sample estimator and every image's loss difference (all processes).

    The arguments are those of :func:`per_sample_gradients` (``per_tap``: split the differences by loss tap).

    Returns:
        ``(u_alpha (n, K), u_theta (n, P), differences, loss_plus)``: the global batch's directions and its
        differences ``δ_i`` (``(n,)``, or ``(n, T)`` per tap), identical on every process.
    """
    dim = features.shape[1]
    n = float(stats[-1])
    batch = int(n) if images is None else int(images)
    counts = row_counts(features.shape[0], reduce_fn, rank, world_size, stats.device)
    start, rows = int(counts[:rank].sum()), features.shape[0]
    u_alpha = draw_perturbations(batch, alpha.numel(), kind, generator).to(alpha.device, alpha.dtype)
    # Rademacher directions are held as int8 signs while the pass runs (a quarter of the float copy at the pass's
    # memory peak) and widened after it: the same values, so the same step
    u_theta = draw_directions(batch, theta.numel(), kind, generator).to(theta.device)
    local_alpha, local_theta = u_alpha[start : start + rows], u_theta[start : start + rows]
    values = theta + c * local_theta.to(theta.dtype)
    features_plus, logits_plus, loss_plus = pass_at(alpha + c_alpha * local_alpha, values)
    del values
    u_theta = u_theta.to(theta.dtype)
    mean, var = finish(stats[-1], stats[:dim], stats[dim : 2 * dim])
    weights = statistics_weights(features, mean, var.sqrt(), source_mean, source_std, tap_dims, lambda_bp, n)
    if not per_tap:
        local = sample_differences(weights, features, features_plus, logits, logits_plus, n)
    else:
        local = tap_differences(weights, features, features_plus, logits, logits_plus, n, tap_dims)
    differences = gather_rows(local.double(), reduce_fn, rank, counts)
    return u_alpha, u_theta, differences, loss_plus


def sample_power(
    differences: Tensor, directions: Tensor, c: float, second_moment: float, first_tap: Tensor | None = None
) -> Tensor:
    """``N = Σ_i ‖x_i‖²``, float64: the summed squared norms of the images' own estimates ``x_i = δ_i·u_i/(c·E[u²])``.

    :func:`estimate_from_differences` returns ``ĝ = Σ_i x_i``; the ``x_i`` are independent given the state, so
    ``‖ĝ‖² − N = Σ_{i≠j} ⟨x_i, x_j⟩`` has the expectation ``Σ_{i≠j} ⟨g_i, g_j⟩``: the part of ``‖ĝ‖²`` that is signal
    (``docs/estimators.md``, the signal-scaled step). Per-tap ``differences`` ``(n, T)`` need ``first_tap`` as there.
    """
    scale = (c * second_moment) ** 2
    if differences.ndim == 1:
        return (differences.pow(2) * directions.double().pow(2).sum(1)).sum() / scale
    if first_tap is None:
        raise ValueError("per-tap differences need first_tap, the first loss tap each value can reach")
    from_tap = differences.flip(1).cumsum(1).flip(1)
    credit = from_tap[:, first_tap.to(directions.device)]
    return (credit.pow(2) * directions.double().pow(2)).sum() / scale


def per_sample_gradients(
    pass_at: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    features: Tensor,
    logits: Tensor,
    stats: Tensor,
    source_mean: Tensor,
    source_std: Tensor,
    tap_dims: Sequence[int],
    lambda_bp: float,
    alpha: Tensor,
    theta: Tensor,
    *,
    c: float,
    c_alpha: float,
    kind: Perturbation,
    generator: torch.Generator,
    reduce_fn: ReduceFn,
    rank: int = 0,
    world_size: int = 1,
    first_tap: Tensor | None = None,
    images: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample estimates of the loss gradient in the mixing logits and the epsilons, from one perturbed pass.

    Args:
        pass_at: runs the perturbed pass with per-image values ``(alpha (B, K), theta (B, P))`` and returns its
            features ``(B, F)``, loss logits ``(B, classes)`` and loss (a scalar, for the caller's checks).
        features: this process's clean-pass features ``(B, F)``.
        logits: the clean pass's loss logits.
        stats: the reduced loss statistics ``[Σf, Σf², ΣH, n]`` the clean pass's loss read (a small batch's pooled
            with earlier batches': ``n`` then counts them too, and only this batch's images are perturbed).
        source_mean: source means.
        source_std: source stds.
        tap_dims: loss tap widths.
        lambda_bp: ``λ``.
        alpha: the current mixing logits in use ``(K,)``.
        theta: the current epsilons ``(P,)``.
        c: perturbation scale of the epsilons.
        c_alpha: perturbation scale of the logits.
        kind: the perturbation distribution.
        generator: the engine's generator; the directions of all ``n`` images of the global batch are drawn from it in
            global sample order (the same on every process).
        reduce_fn: sums over processes.
        rank: this process's index; its images are the global batch's slice after those of lower ranks.
        world_size: the number of processes.
        first_tap: for tap attribution, the index of the first loss tap (``tap_dims`` order, the head last) each
            epsilon's layer runs before, ``(P,)``; ``None``: every epsilon is credited with the whole difference.
        images: the batch's image count over all processes (default ``n``, the batch alone).

    Returns:
        ``(grad_alpha, grad_theta, loss_plus)``.
    """
    u_alpha, u_theta, differences, loss_plus = per_sample_differences(
        pass_at, features, logits, stats, source_mean, source_std, tap_dims, lambda_bp, alpha, theta, c=c,
        c_alpha=c_alpha, kind=kind, generator=generator, reduce_fn=reduce_fn, rank=rank, world_size=world_size,
        per_tap=first_tap is not None, images=images,
    )  # fmt: skip
    second = perturbation_second_moment(kind)
    total = differences if differences.ndim == 1 else differences.sum(1)  # the logits mix every layer: all taps
    grad_alpha = estimate_from_differences(total, u_alpha, c_alpha, second)
    grad_theta = estimate_from_differences(differences, u_theta, c, second, first_tap)
    return grad_alpha, grad_theta, loss_plus


def exact_gradients(loss_at: Callable[[Tensor, Tensor], Tensor], alpha: Tensor, theta: Tensor) -> tuple[Tensor, ...]:
    """The first-order oracle: the exact gradient of ``loss_at(alpha, theta)`` by autograd (one forward, one backward).

    Fake-quantized networks pass the gradient through their quantizers' straight-through estimators. Not a zeroth-order
    method: a diagnostic ceiling for the estimators above.

    Returns:
        ``(grad_alpha, grad_theta, loss)``, detached.
    """
    alpha, theta = alpha.detach().clone().requires_grad_(True), theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_at(alpha, theta)
        grad_alpha, grad_theta = torch.autograd.grad(loss, [alpha, theta], allow_unused=True)
    grad_alpha = torch.zeros_like(alpha) if grad_alpha is None else grad_alpha
    grad_theta = torch.zeros_like(theta) if grad_theta is None else grad_theta
    return grad_alpha.detach(), grad_theta.detach(), loss.detach()


class PassOutput(Protocol):
    """What the estimators read from a forward pass: the loss features per image, the loss logits, the loss."""

    features: Tensor | None
    logits: Tensor
    loss: Tensor
    stats: Tensor

    @property
    def images(self) -> int:
        """The batch's image count over all processes (``stats`` may pool earlier batches)."""
        ...


class GradientEstimator:
    """Turns forward passes at chosen values into gradient estimates, as ``config.estimator`` says.

    Args:
        config: the resolved configuration (``estimator``, ``perturbation``, ``spsa_c``, ``spsa_c_alpha``,
            ``sp_avg``, ``lambda_bp``).
        tap_dims: the loss taps' widths.
        source: the source statistics ``(mean, std)`` holder (read at every estimate).
        generator: the engine's generator (every draw comes from it).
        reduce_fn: sums over processes.
        rank: this process's index.
        world_size: the number of processes.
    """

    def __init__(
        self,
        config: ZOAConfig,
        tap_dims: Sequence[int],
        source: SourceStatistics,
        generator: torch.Generator,
        reduce_fn: ReduceFn,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config, self.tap_dims, self.source, self.generator = config, list(tap_dims), source, generator
        self.reduce_fn, self.rank, self.world_size = reduce_fn, rank, world_size
        self.first_tap: Tensor | None = None  # set by the engine when config.tap_attribution is on
        self.sample_power: Tensor | None = None  # the last per-sample estimate's N (config.snr_step), else None

    def set_layer_taps(self, first_taps: Sequence[int], widths: Sequence[int]) -> None:
        """Set tap attribution's map from ``first_taps[l]``, the first loss tap after adapted layer ``l``.

        Layer ``l`` holds ``2·widths[l]`` epsilons, the layers in the bank's order.
        """
        self.first_tap = first_tap_of_values(first_taps, widths)

    def estimate(
        self,
        run: Callable[[Tensor, Tensor], PassOutput],
        alpha: Tensor,
        theta: Tensor,
        clean: PassOutput | None,
        check: Callable[[Tensor, Tensor], None],
    ) -> tuple[Tensor, Tensor]:
        """``(grad_alpha, grad_theta)`` at ``(alpha, theta)``.

        Args:
            run: one forward pass with given values (``(K,), (P,)`` for the batch or ``(B, K), (B, P)`` per image).
            alpha: the current mixing logits in use.
            theta: the current epsilons.
            clean: the pass at the current values if one was run (the prediction pass), else ``None``.
            check: called with ``(loss_plus, loss0)`` for every perturbed (or autograd) pass; raises to reject.
        """
        cfg = self.config
        self.sample_power = None
        if cfg.estimator == "spsa":
            return spsa_gradients(
                lambda a, t: run(a, t).loss, alpha, theta, None if clean is None else clean.loss,
                c_alpha=cfg.spsa_c_alpha, c=cfg.spsa_c, repeats=cfg.sp_avg, generator=self.generator, check=check,
                sampler=sampler(cfg.perturbation),
            )  # fmt: skip
        if cfg.estimator == "first_order":
            grad_alpha, grad_theta, loss = exact_gradients(lambda a, t: run(a, t).loss, alpha, theta)
            check(loss, loss)
            return grad_alpha, grad_theta
        sums = torch.zeros_like(alpha), torch.zeros_like(theta)
        power = torch.zeros((), dtype=torch.float64, device=theta.device)
        first_tap = self.first_tap if cfg.tap_attribution else None
        kind: Perturbation = cfg.perturbation or "rademacher"
        second = perturbation_second_moment(kind)
        for _ in range(cfg.sp_avg):
            base = clean if clean is not None else run(alpha, theta)  # a later repetition: a fresh clean pass
            clean = None

            def perturbed(a: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                out = run(a, t)
                assert out.features is not None
                return out.features, out.logits, out.loss

            assert base.features is not None
            u_alpha, u_theta, differences, loss_plus = per_sample_differences(
                perturbed, base.features, base.logits, base.stats, self.source.mean, self.source.std, self.tap_dims,
                cfg.lambda_bp, alpha, theta, c=cfg.spsa_c, c_alpha=cfg.spsa_c_alpha, kind=kind,
                generator=self.generator, reduce_fn=self.reduce_fn, rank=self.rank, world_size=self.world_size,
                per_tap=first_tap is not None, images=base.images,
            )  # fmt: skip
            check(loss_plus, base.loss)
            total = differences if differences.ndim == 1 else differences.sum(1)  # the logits mix every layer
            sums[0].add_(estimate_from_differences(total, u_alpha, cfg.spsa_c_alpha, second))
            sums[1].add_(estimate_from_differences(differences, u_theta, cfg.spsa_c, second, first_tap))
            if cfg.snr_step:
                power += sample_power(differences, u_theta, cfg.spsa_c, second, first_tap)
        self.sample_power = power / cfg.sp_avg**2 if cfg.snr_step else None
        return sums[0] / cfg.sp_avg, sums[1] / cfg.sp_avg
