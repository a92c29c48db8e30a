"""The per-sample two-pass estimator and the first-order oracle (``zoa_lightning.core.estimators``).

The per-sample attribution is checked against autograd on a tiny ViT: each image's loss difference, divided by the
perturbation scale, is the exact directional derivative of the batch loss in that image's own parameters, up to
``O(c)``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import make_resnet, make_vit
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.estimators import (
    draw_directions,
    draw_perturbations,
    estimate_from_differences,
    exact_gradients,
    per_sample_gradients,
    perturbation_second_moment,
    sample_differences,
    statistics_weights,
    tap_differences,
)
from zoa_lightning.core.spsa import spsa_gradients
from zoa_lightning.core.taps import PassResult

B = 16


def _adapter(digits: torch.Tensor, **config: object) -> ZOA:
    options: dict[str, object] = {"detector_min_batch": 4, "lr": 0.01, "spsa_c": 0.01, **config}
    adapter = ZOA(make_vit(0), ZOAConfig(**options))  # type: ignore[arg-type]
    adapter.collect_source_statistics(digits[:128].split(32))
    return adapter


def _noisy(digits: torch.Tensor, start: int = 600) -> torch.Tensor:
    x = digits[start : start + B]
    return x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(start))


def _statistics_weights(adapter: ZOA, clean: PassResult) -> torch.Tensor:
    """The per-image statistics weights of a clean pass (``lambda_bp`` 30), its batch mean and std from its sums."""
    features, n = clean.record.features(), float(clean.stats[-1])
    dim = features.shape[1]
    mean = clean.stats[:dim] / n
    std = ((clean.stats[dim : 2 * dim] - n * mean * mean) / (n - 1)).sqrt()
    return statistics_weights(
        features, mean, std, adapter.source.mean, adapter.source.std, adapter.loss.tap_dims, 30.0, n
    )


def test_each_images_difference_is_its_exact_directional_derivative(digits: torch.Tensor) -> None:
    adapter = _adapter(digits, estimator="per_sample")
    x = _noisy(digits)
    adapter(x)  # move away from the pretrained values
    bank, k = adapter.bank, adapter.bank.num_entries
    alpha0, theta0 = bank.alpha[:k].clone(), bank.theta.clone()
    clean = adapter.fitness(x)
    features, n = clean.record.features(), float(clean.stats[-1])
    weights = _statistics_weights(adapter, clean)
    u = draw_perturbations(B, theta0.numel(), "rademacher", torch.Generator().manual_seed(0))
    rows = theta0.expand(B, -1).clone().requires_grad_(True)  # every image its own parameters
    with torch.enable_grad(), bank.evaluated_at(alpha0.expand(B, k), rows):
        loss = adapter.fitness(x).loss
        (grad,) = torch.autograd.grad(loss, [rows])
    exact = (grad * u).sum(1).double()
    errors = []
    for c in (1e-2, 1e-3):
        with bank.evaluated_at(alpha0.expand(B, k), theta0 + c * u):
            plus = adapter.fitness(x)
        got = sample_differences(weights, features, plus.record.features(), clean.logits, plus.logits, n) / c
        errors.append(float((got - exact).norm() / exact.norm()))
    assert errors[1] < 3e-3, errors  # first order: the error falls with c
    assert errors[1] < errors[0] / 5, errors


def test_the_estimate_is_unbiased_over_draws() -> None:
    # A linear model of the differences: delta_i = c <g_i, u_i>; the mean estimate over many draws is sum_i g_i.
    g = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)).double()
    generator = torch.Generator().manual_seed(2)
    for kind in ("rademacher", "segmented_uniform"):
        total = torch.zeros(5, dtype=torch.float64)
        draws = 4000
        for _ in range(draws):
            u = draw_perturbations(8, 5, kind, generator).double()  # type: ignore[arg-type]
            delta = 0.1 * (g * u).sum(1)
            total += estimate_from_differences(delta, u, 0.1, perturbation_second_moment(kind))  # type: ignore[arg-type]
        torch.testing.assert_close(total / draws, g.sum(0), rtol=0, atol=0.25)


def test_exact_gradients_match_autograd_of_a_known_function() -> None:
    alpha, theta = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 3.0, -1.0])
    grad_alpha, grad_theta, loss = exact_gradients(lambda a, t: (a**2).sum() + (t**3).sum(), alpha, theta)
    torch.testing.assert_close(grad_alpha, 2 * alpha)
    torch.testing.assert_close(grad_theta, 3 * theta**2)
    assert float(loss) == pytest.approx(0.25 + 1 + 8 + 27 - 1)
    assert not alpha.requires_grad
    assert not theta.requires_grad


def test_tap_attribution_credits_each_epsilon_only_with_the_taps_that_depend_on_it(digits: torch.Tensor) -> None:
    adapter = _adapter(digits, estimator="per_sample", tap_attribution=True)
    first_tap = adapter.estimator.first_tap
    assert first_tap is not None
    assert first_tap.shape == adapter.bank.theta.shape
    assert int(first_tap[0]) == 0  # the first layer reaches every tap
    assert int(first_tap.max()) >= 1  # later ones fewer
    x = _noisy(digits)
    bank, k = adapter.bank, adapter.bank.num_entries
    theta = bank.theta.clone().requires_grad_(True)
    with torch.enable_grad(), bank.evaluated_at(bank.alpha[:k].clone(), theta):
        record = adapter.fitness(x).record
        features = [*record.taps, record.final()]
        for t, tap in enumerate(features):  # autograd: tap t depends on exactly the epsilons with first_tap <= t
            (grad,) = torch.autograd.grad(tap.pow(2).sum(), [theta], retain_graph=True)
            assert bool((grad[first_tap > t] == 0).all()), f"tap {t} depends on epsilons credited only later"
            credited = grad[first_tap == t]  # (none for the head: every layer of this network precedes a tap)
            assert credited.numel() == 0 or bool((credited != 0).any()), f"tap {t} misses the epsilons credited to it"
    # The per-tap differences add up to the image's total difference.
    clean = adapter.fitness(x)
    feats, n = clean.record.features(), float(clean.stats[-1])
    weights = _statistics_weights(adapter, clean)
    u = draw_perturbations(B, bank.size, "rademacher", torch.Generator().manual_seed(0))
    with bank.evaluated_at(bank.alpha[:k].expand(B, k), bank.theta + 0.01 * u):
        plus = adapter.fitness(x)
    args = (weights, feats, plus.record.features(), clean.logits, plus.logits, n)
    split = tap_differences(*args, adapter.loss.tap_dims)
    assert split.shape == (B, len(adapter.loss.tap_dims))
    torch.testing.assert_close(split.sum(1), sample_differences(*args), rtol=1e-9, atol=1e-12)


def test_the_tap_attributed_estimate_is_unbiased_over_draws() -> None:
    # delta_it = c <g_it, u_i> with g_it zero on the values tap t cannot reach; the mean estimate is sum_i,t g_it.
    first_tap = torch.tensor([0, 0, 1, 1, 2])
    g = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(1)).double()
    g *= (first_tap.view(1, 1, 5) <= torch.arange(3).view(1, 3, 1)).double()
    generator = torch.Generator().manual_seed(2)
    total, draws = torch.zeros(5, dtype=torch.float64), 4000
    for _ in range(draws):
        u = draw_perturbations(8, 5, "rademacher", generator).double()
        delta = 0.1 * (g * u.unsqueeze(1)).sum(2)  # (8, 3)
        total += estimate_from_differences(delta, u, 0.1, 1.0, first_tap)
    torch.testing.assert_close(total / draws, g.sum((0, 1)), rtol=0, atol=0.2)
    with pytest.raises(ValueError, match="first_tap"):
        estimate_from_differences(delta, u, 0.1, 1.0)


@pytest.mark.parametrize("estimator", ["per_sample", "per_sample+taps", "first_order"])
def test_other_estimators_spend_two_passes_learn_and_resume_bit_identically(
    digits: torch.Tensor, estimator: str
) -> None:
    name, _, taps = estimator.partition("+")
    adapter = _adapter(digits, estimator=name, tap_attribution=bool(taps))
    adapter(_noisy(digits, 600))
    theta_after_one = adapter.bank.theta.clone()
    assert adapter.forward_passes == 2
    assert float(theta_after_one.abs().max()) > 0
    assert len(adapter.last_losses) == 2
    resumed = _adapter(digits, estimator=name, tap_attribution=bool(taps))
    resumed.load_state_dict(copy.deepcopy(adapter.state_dict()))
    x = _noisy(digits, 700)
    torch.testing.assert_close(resumed(x), adapter(x), rtol=0, atol=0)
    assert torch.equal(resumed.bank.theta, adapter.bank.theta)


def test_per_sample_estimates_follow_the_exact_gradient_better_than_spsa(digits: torch.Tensor) -> None:
    # Same state, same batch, same budget (one perturbed pass): each estimate's cosine with the oracle's gradient.
    x = _noisy(digits)
    adapter = _adapter(digits)
    adapter(x)
    bank, k = adapter.bank, adapter.bank.num_entries
    alpha0, theta0 = bank.alpha[:k].clone(), bank.theta.clone()

    def loss_at(alpha: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        with bank.evaluated_at(alpha, theta):
            return adapter.fitness(x).loss

    def pass_at(alpha: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with bank.evaluated_at(alpha, theta):
            plus = adapter.fitness(x)
        return plus.record.features(), plus.logits, plus.loss

    _, exact, _ = exact_gradients(loss_at, alpha0, theta0)
    clean = adapter.fitness(x)
    generator = torch.Generator().manual_seed(0)
    cosine = {"spsa": 0.0, "per_sample": 0.0}
    draws = 16
    for _ in range(draws):
        _, spsa = spsa_gradients(
            loss_at, alpha0, theta0, clean.loss, c_alpha=0.05, c=0.01, repeats=1, generator=generator
        )
        _, per_sample, _ = per_sample_gradients(
            pass_at, clean.record.features(), clean.logits, clean.stats, adapter.source.mean, adapter.source.std,
            adapter.loss.tap_dims, 30.0, alpha0, theta0, c=0.01, c_alpha=0.05, kind="rademacher",
            generator=generator, reduce_fn=lambda t: t,
        )  # fmt: skip
        for name, estimate in (("spsa", spsa), ("per_sample", per_sample)):
            cosine[name] += float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0)) / draws
    assert cosine["per_sample"] > 0.05, cosine
    assert cosine["per_sample"] > 3 * abs(cosine["spsa"]), cosine


def test_per_sample_is_refused_on_batchnorm_networks_and_the_oracle_on_several_processes() -> None:
    with pytest.raises(TypeError, match=r"per_sample.*BatchNorm.*estimator='spsa'"):
        ZOA(make_resnet(0), ZOAConfig(estimator="per_sample"))
    with pytest.raises(ValueError, match=r"first_order.*one process"):
        ZOA(make_vit(0), ZOAConfig(estimator="first_order"), world_size=2)
    assert ZOA(make_vit(0), ZOAConfig(estimator="first_order")).requires_autograd
    assert not ZOA(make_vit(0), ZOAConfig()).requires_autograd


def test_rademacher_spsa_and_the_config_defaults() -> None:
    assert ZOAConfig().resolved("vit").perturbation == "segmented_uniform"
    assert ZOAConfig(estimator="per_sample").resolved("vit").perturbation == "rademacher"
    with pytest.raises(ValueError, match="estimator must be"):
        ZOAConfig(estimator="adam")  # type: ignore[arg-type]
    u = draw_perturbations(3, 100, "rademacher", torch.Generator().manual_seed(0))
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    s = draw_perturbations(3, 100, "segmented_uniform", torch.Generator().manual_seed(0))
    assert bool((s.abs() >= 0.5).all())
    assert bool((s.abs() <= 1).all())


def test_the_normalised_step_bounds_a_huge_learning_rate(digits: torch.Tensor) -> None:
    # lr 50 with the plain step leaves the guard's bound at once (rolled back); normalised, the step stays ~lr * 1.
    x = _noisy(digits)
    plain = _adapter(digits, estimator="per_sample", lr=50.0, weight_decay=0.0, max_consecutive_skips=None)
    with pytest.warns(RuntimeWarning, match="max_abs_epsilon"):
        plain(x)
    assert plain.skipped_batches == 1
    normed = _adapter(digits, estimator="per_sample", lr=0.05, weight_decay=0.0, normalize_step=True)
    normed(x)
    rms = float(normed.bank.theta.pow(2).mean().sqrt())
    assert rms == pytest.approx(0.05, rel=1e-4)  # the first step: exactly lr in root-mean-square
    assert float(normed.update.spread) > 0


@pytest.mark.parametrize("kind", ["rademacher", "segmented_uniform"])
def test_compact_directions_are_the_perturbations_drawn(kind: str) -> None:
    compact = draw_directions(7, 33, kind, torch.Generator().manual_seed(2))  # type: ignore[arg-type]
    floats = draw_perturbations(7, 33, kind, torch.Generator().manual_seed(2))  # type: ignore[arg-type]
    assert compact.dtype == (torch.int8 if kind == "rademacher" else torch.float32)
    assert floats.dtype == torch.float32
    assert torch.equal(compact.float(), floats)
    magnitude = floats.abs()
    assert bool(((magnitude == 1) if kind == "rademacher" else (magnitude >= 0.5) & (magnitude <= 1)).all())
