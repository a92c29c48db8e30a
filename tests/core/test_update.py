"""ZOAUpdate: the SGD step of the epsilons, the first AdamW step of the mixing logits, share scaling and the guards."""

from __future__ import annotations

import pytest
import torch

from zoa_lightning.core import KnowledgeBank, ZOAConfig
from zoa_lightning.core.update import ZOAUpdate

P = 6  # adapted values: one layer of width 3


def _bank(entries: int = 1) -> KnowledgeBank:
    bank = KnowledgeBank([3], torch.linspace(0.5, 1.5, P), max_entries=4, initial_alpha=0.2)
    bank.theta.copy_(torch.linspace(-0.3, 0.3, P))
    for _ in range(entries - 1):
        bank.store()
        bank.theta.add_(0.1)
    return bank


def _grads(entries: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(entries, generator=g), torch.randn(P, generator=g)


def _torch_sgd(theta: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, momentum: float) -> torch.Tensor:
    param = torch.nn.Parameter(theta.clone())
    optimizer = torch.optim.SGD([param], lr=lr, weight_decay=wd, momentum=momentum)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.4), (0.9, 0.4), (0.5, 0.0)])
def test_the_epsilons_take_torch_sgd_steps(momentum: float, weight_decay: float) -> None:
    config = ZOAConfig(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    bank, update = _bank(), ZOAUpdate(config, P)
    start = bank.theta.clone()
    grads = [_grads(1, seed)[1] for seed in range(3)]
    for grad in grads:
        assert update.step(bank, 1, torch.zeros(1), grad) is None
    torch.testing.assert_close(bank.theta, _torch_sgd(start, grads, 0.05, weight_decay, momentum))
    assert bool(update.momentum_ready) == bool(momentum)
    assert update.momentum_buffer.numel() == (P if momentum else 0)


def test_the_mixing_logits_move_only_once_there_is_stored_knowledge() -> None:
    config = ZOAConfig(lr_alpha=0.01, weight_decay_alpha=0.1)
    bank, update = _bank(entries=1), ZOAUpdate(config, P)
    alpha = bank.alpha.clone()
    update.step(bank, 1, torch.tensor([0.7]), torch.zeros(P))
    assert torch.equal(bank.alpha, alpha)  # one entry: nothing to mix
    bank = _bank(entries=3)
    alpha = bank.alpha.clone()
    grad_alpha = torch.tensor([0.5, -2.0, 0.0])
    assert update.step(bank, 3, grad_alpha, torch.zeros(P)) is None
    expected = alpha[:3] * (1 - 0.01 * 0.1) - 0.01 * grad_alpha / (grad_alpha.abs() + 1e-8)  # closed-form AdamW
    torch.testing.assert_close(bank.alpha[:3], expected)
    assert torch.equal(bank.alpha[3:], alpha[3:])  # unused rows untouched


def test_a_pooled_batch_steps_by_its_share() -> None:
    """Share ``s``: the loss-gradient part keeps its size, weight decay and the logits' step shrink to ``s``."""
    config = ZOAConfig(lr=0.05, lr_alpha=0.01, weight_decay=0.4, weight_decay_alpha=0.1)
    grad_alpha, grad_theta = _grads(2, seed=1)
    shared, full = _bank(entries=2), _bank(entries=2)
    ZOAUpdate(config, P).step(shared, 2, grad_alpha, grad_theta, share=0.25)
    scaled = ZOAConfig(lr=0.05 * 0.25, lr_alpha=0.01 * 0.25, weight_decay=0.4, weight_decay_alpha=0.1)
    ZOAUpdate(scaled, P).step(full, 2, grad_alpha, grad_theta / 0.25)
    torch.testing.assert_close(shared.theta, full.theta)
    torch.testing.assert_close(shared.alpha, full.alpha)
    theta = _bank(entries=2).theta
    torch.testing.assert_close(shared.theta, theta - 0.05 * grad_theta - 0.05 * 0.25 * 0.4 * theta)


def test_the_normalised_step_divides_by_a_running_rms_of_the_estimates() -> None:
    config = ZOAConfig(lr=0.1, weight_decay=0.0, normalize_step=True, normalize_momentum=0.5, normalize_floor=1e-3)
    bank, update = _bank(), ZOAUpdate(config, P)
    first, second = 10 * _grads(1, 2)[1], 30 * _grads(1, 3)[1]
    theta = bank.theta.clone()
    update.step(bank, 1, torch.zeros(1), first)
    rms1 = first.pow(2).mean().sqrt()
    torch.testing.assert_close(bank.theta, theta - 0.1 * first / rms1)
    torch.testing.assert_close(update.spread, rms1)
    theta = bank.theta.clone()
    update.step(bank, 1, torch.zeros(1), second)
    spread = 0.5 * rms1 + 0.5 * second.pow(2).mean().sqrt()
    torch.testing.assert_close(update.spread, spread)
    torch.testing.assert_close(bank.theta, theta - 0.1 * second / spread)
    tiny = ZOAUpdate(config, P)
    bank = _bank()
    theta = bank.theta.clone()
    tiny.step(bank, 1, torch.zeros(1), torch.full((P,), 1e-6))
    torch.testing.assert_close(bank.theta, theta - 0.1 * 1e-6 / 1e-3)  # the floor bounds the division


def test_a_non_finite_estimate_changes_nothing_and_says_why() -> None:
    bank, update = _bank(entries=2), ZOAUpdate(ZOAConfig(momentum=0.9), P)
    theta, alpha = bank.theta.clone(), bank.alpha.clone()
    bad = torch.zeros(P)
    bad[2] = float("nan")
    assert update.step(bank, 2, torch.zeros(2), bad) == "gradient estimate is not finite"
    assert update.step(bank, 2, torch.tensor([float("inf"), 0.0]), torch.zeros(P)) == "gradient estimate is not finite"
    assert torch.equal(bank.theta, theta)
    assert torch.equal(bank.alpha, alpha)
    assert not bool(update.momentum_ready)


def test_an_update_that_overflows_is_reported() -> None:
    bank, update = _bank(), ZOAUpdate(ZOAConfig(lr=1e38, max_abs_epsilon=None), P)
    assert update.step(bank, 1, torch.zeros(1), torch.full((P,), 1e10)) == "updated parameter is not finite"


def test_max_abs_epsilon_guards_the_step_and_none_turns_the_guard_off() -> None:
    grad = torch.zeros(P)
    grad[0] = -100.0  # theta[0] = -0.3 + 0.1 * 100 = 9.7, then 20.7 with lr 0.21
    guarded = ZOAUpdate(ZOAConfig(lr=0.21, weight_decay=0.0, max_abs_epsilon=10.0), P)
    bank = _bank()
    assert guarded.step(bank, 1, torch.zeros(1), grad) == "update would move an epsilon to |20.7| > max_abs_epsilon"
    inside = ZOAUpdate(ZOAConfig(lr=0.1, weight_decay=0.0, max_abs_epsilon=10.0), P)
    assert inside.step(_bank(), 1, torch.zeros(1), grad) is None  # 9.7 <= 10
    unguarded = ZOAUpdate(ZOAConfig(lr=0.21, weight_decay=0.0, max_abs_epsilon=None), P)
    assert unguarded.step(_bank(), 1, torch.zeros(1), grad) is None


def test_the_momentum_buffer_is_state() -> None:
    config = ZOAConfig(lr=0.05, momentum=0.9)
    update = ZOAUpdate(config, P)
    update.step(_bank(), 1, torch.zeros(1), _grads(1, 4)[1])
    assert set(update.state_dict()) == {"momentum_buffer", "momentum_ready", "spread", "spread_ready"}
    resumed = ZOAUpdate(config, P)
    resumed.load_state_dict(update.state_dict())
    a, b = _bank(), _bank()
    grad = _grads(1, 5)[1]
    update.step(a, 1, torch.zeros(1), grad)
    resumed.step(b, 1, torch.zeros(1), grad)
    assert torch.equal(a.theta, b.theta)  # the resumed update continues with the same momentum
