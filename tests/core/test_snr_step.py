"""The signal-scaled step (``snr_step``): the per-image power, the signal fraction, the gain and its engine state."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.helpers import corrupt_noise, per_sample_engine
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.estimators import (
    draw_perturbations,
    estimate_from_differences,
    per_sample_gradients,
    sample_power,
)
from zoa_lightning.core.update import ZOAUpdate

B = 16


def _own_estimates(
    differences: torch.Tensor, u: torch.Tensor, c: float, first_tap: torch.Tensor | None
) -> torch.Tensor:
    """``x_i``, one row per image, written out term by term."""
    if differences.ndim == 1:
        return differences[:, None].float() * u / c
    credit = torch.stack([differences[:, t:].sum(1) for t in range(differences.shape[1])], 1)[:, first_tap]
    return credit.float() * u / c


@pytest.mark.parametrize("per_tap", [False, True])
def test_sample_power_is_the_sum_of_the_images_own_squared_estimates(per_tap: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, p, taps = 12, 30, 3
    u = draw_perturbations(n, p, "rademacher", g)
    differences = torch.randn((n, taps) if per_tap else (n,), generator=g, dtype=torch.float64)
    first_tap = torch.randint(0, taps, (p,), generator=g) if per_tap else None
    rows = _own_estimates(differences, u, 0.1, first_tap)
    power = sample_power(differences, u, 0.1, 1.0, first_tap)
    torch.testing.assert_close(power, rows.double().pow(2).sum(), rtol=1e-6, atol=0)
    estimate = estimate_from_differences(differences, u, 0.1, 1.0, first_tap)
    torch.testing.assert_close(estimate, rows.sum(0), rtol=1e-5, atol=1e-5)
    # ‖Σ x_i‖² − N is exactly the sum of the cross terms
    cross = sum(float(rows[i] @ rows[j]) for i in range(n) for j in range(n) if i != j)
    assert float(estimate.double().pow(2).sum() - power) == pytest.approx(cross, rel=1e-4)


def _fraction(per_image_gradients: torch.Tensor, draws: int, c: float = 0.01) -> float:
    """Mean over draws of the per-batch signal fraction ``1 − N/‖ĝ‖²`` for exact first-order differences."""
    g = torch.Generator().manual_seed(1)
    n, p = per_image_gradients.shape
    total = 0.0
    for _ in range(draws):
        u = draw_perturbations(n, p, "rademacher", g).double()
        differences = c * (per_image_gradients * u).sum(1)  # δ_i = c·⟨g_i, u_i⟩
        estimate = estimate_from_differences(differences, u, c, 1.0)
        total += float(1 - sample_power(differences, u, c, 1.0) / estimate.pow(2).sum())
    return total / draws


def test_the_signal_fraction_separates_aligned_from_opposed_image_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    n, p = 32, 200
    shared = torch.randn(p, generator=g, dtype=torch.float64)
    aligned = shared.expand(n, p)  # every image agrees: r = n
    opposed = torch.randn(n, p, generator=g, dtype=torch.float64)
    opposed -= opposed.mean(0)  # the images cancel: the loss gradient is zero
    # aligned: E[‖ĝ‖²] = n²‖g‖² + n(p−1)‖g‖², the signal fraction ≈ n / (n + p − 1)
    assert _fraction(aligned, 200) == pytest.approx(n / (n + p - 1), rel=0.15)
    assert abs(_fraction(opposed, 200)) < 0.05  # E = −1/p, less a small ratio bias


def _update(**config: object) -> tuple[ZOAUpdate, KnowledgeBank]:
    cfg = ZOAConfig(estimator="per_sample", normalize_step=True, lr=0.1, **config)  # type: ignore[arg-type]
    bank = KnowledgeBank([4], torch.ones(8))
    return ZOAUpdate(cfg.resolved("vit"), bank.size), bank


def test_gain_follows_the_running_signal_fraction_and_spares_the_weight_decay() -> None:
    update, bank = _update(snr_step=True, snr_reference=0.2, snr_momentum=0.5, weight_decay=0.0)
    grad = torch.full((8,), 2.0)  # ‖ĝ‖² = 32
    assert update.step(bank, 1, torch.zeros(1), grad, power=torch.tensor(32.0, dtype=torch.float64)) is None
    assert update.gain == 0.0
    assert torch.equal(bank.theta, torch.zeros(8))
    update.step(bank, 1, torch.zeros(1), grad, power=torch.tensor(16.0, dtype=torch.float64))  # fraction 0.5
    assert float(update.signal) == pytest.approx(0.25)
    assert update.gain == 1.0
    torch.testing.assert_close(bank.theta, torch.full((8,), -0.1))  # the normalised step at its full size
    update.step(bank, 1, torch.zeros(1), grad, power=torch.tensor(64.0, dtype=torch.float64))  # fraction -1
    assert float(update.signal) == pytest.approx(-0.375)
    assert update.gain == 0.0

    decayed, bank = _update(snr_step=True, weight_decay=0.5)
    bank.theta.fill_(1.0)
    decayed.step(bank, 1, torch.zeros(1), grad, power=torch.tensor(32.0, dtype=torch.float64))
    torch.testing.assert_close(bank.theta, torch.full((8,), 0.95))  # only the decay: 1 − lr·0.5


def test_snr_step_is_refused_without_the_per_sample_estimator() -> None:
    with pytest.raises(ValueError, match="snr_step needs estimator='per_sample'"):
        ZOAConfig(snr_step=True)
    with pytest.raises(ValueError, match="snr_reference must be > 0"):
        ZOAConfig(estimator="per_sample", snr_step=True, snr_reference=0.0)
    with pytest.raises(ValueError, match="snr_momentum must be in"):
        ZOAConfig(estimator="per_sample", snr_step=True, snr_momentum=1.0)


def _engine(digits: torch.Tensor, **config: object) -> ZOA:
    return per_sample_engine(digits, B, **{"snr_step": True, **config})


def _stream(digits: torch.Tensor) -> list[torch.Tensor]:
    pool = digits[512:]
    return [pool[i * B : (i + 1) * B] for i in range(3)] + [corrupt_noise(pool[i * B :][:B], seed=i) for i in range(4)]


def test_engine_keeps_two_passes_and_scales_its_steps(digits: torch.Tensor) -> None:
    plain, scaled = _engine(digits, snr_step=False), _engine(digits, snr_reference=1e6)
    for x in _stream(digits):
        plain(x)
        scaled(x)
    assert scaled.counter("forward_passes") == 2 * scaled.counter("batches") == plain.counter("forward_passes")
    assert scaled.passes_per_batch == 2
    assert float(scaled.update.signal) != 0.0
    # a gain near zero: the epsilons barely move, the plain normalised step moves them by about lr per batch
    assert float(scaled.bank.theta.abs().mean()) < 0.01 * float(plain.bank.theta.abs().mean())


def test_the_signal_fraction_round_trips_through_the_state_dict(digits: torch.Tensor) -> None:
    stream = _stream(digits)
    adapter = _engine(digits, snr_reference=0.005)
    for x in stream[:4]:
        adapter(x)
    saved = copy.deepcopy(adapter.state_dict())
    assert "update.signal" in saved
    want = [adapter(x) for x in stream[4:]]
    restored = _engine(digits, snr_reference=0.005)
    restored.load_state_dict(saved)
    for x, logits in zip(stream[4:], want, strict=True):
        assert torch.equal(restored(x), logits)
    assert torch.equal(restored.bank.theta, adapter.bank.theta)
    assert torch.equal(restored.update.signal, adapter.update.signal)


def test_snr_off_leaves_the_per_sample_steps_bit_identical(digits: torch.Tensor) -> None:
    stream = _stream(digits)
    plain = _engine(digits, snr_step=False)
    config = dataclasses.replace(plain.config, snr_reference=0.123, snr_momentum=0.5)  # ignored while off
    other = _engine(digits, snr_step=False)
    other.config = config
    for x in stream:
        assert torch.equal(plain(x), other(x))
    assert torch.equal(plain.bank.theta, other.bank.theta)
    assert float(plain.update.signal) == 0.0
    assert plain.estimator.sample_power is None


def test_the_engines_estimate_is_the_public_functions(digits: torch.Tensor) -> None:
    """The estimator reads its differences once for the estimate and the power: the estimate is unchanged."""
    adapter = _engine(digits)
    x = _stream(digits)[4]
    adapter(x)
    bank, k = adapter.bank, adapter.bank.num_entries
    alpha, theta = bank.alpha[:k].clone(), bank.theta.clone()

    def run(a: torch.Tensor, t: torch.Tensor) -> object:
        with bank.evaluated_at(a, t):
            return adapter.fitness(x)

    def pass_at(a: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = run(a, t)
        return out.record.features(), out.logits, out.loss  # type: ignore[attr-defined]

    clean = adapter.fitness(x)
    state = adapter.generator.get_state()
    got = adapter.estimator.estimate(run, alpha, theta, clean, lambda *_: None)  # type: ignore[arg-type]
    adapter.generator.set_state(state)
    want = per_sample_gradients(
        pass_at, clean.record.features(), clean.logits, clean.stats, adapter.source.mean, adapter.source.std,
        adapter.loss.tap_dims, adapter.config.lambda_bp, alpha, theta, c=0.1, c_alpha=adapter.config.spsa_c_alpha,
        kind="rademacher", generator=adapter.generator, reduce_fn=lambda t: t,
    )  # fmt: skip
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert adapter.estimator.sample_power is not None
    assert float(adapter.estimator.sample_power) > 0
