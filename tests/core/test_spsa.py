"""Perturbations, the SPSA estimator and the two update rules (spec §3)."""

from __future__ import annotations

import pytest
import torch

from zoa_lightning.core import adamw_first_step_, estimate_gradient, segmented_uniform, sgd_step_, spsa_estimate


def test_segmented_uniform_support_and_signs() -> None:
    u = segmented_uniform(100_000, torch.Generator().manual_seed(0))
    assert u.abs().min() >= 0.5
    assert u.abs().max() < 1.0
    assert abs(float((u > 0).float().mean()) - 0.5) < 0.01
    again = segmented_uniform(100_000, torch.Generator().manual_seed(0))
    assert torch.equal(u, again)


def test_spsa_divides_by_the_perturbation() -> None:
    u = torch.tensor([0.5, -1.0])
    est = spsa_estimate(torch.tensor(1.2), torch.tensor(1.0), u, 0.1)
    torch.testing.assert_close(est, torch.tensor([0.2 / 0.05, -0.2 / 0.1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimate_points_along_the_true_gradient_of_a_smooth_loss(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(20, generator=g) + 0.5
    x = torch.randn(20, generator=g)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (a * v**2).sum() + torch.sin(v).sum()

    true = 2 * a * x + torch.cos(x)
    est = estimate_gradient(loss, x, c=1e-3, num_queries=4000, generator=g)
    assert float(torch.cosine_similarity(est, true, dim=0)) > 0.9


def test_estimate_reuses_a_given_base_loss() -> None:
    calls = []

    def loss(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return v.sum()

    estimate_gradient(loss, torch.zeros(3), c=0.1, num_queries=2, generator=torch.Generator(), loss0=torch.tensor(0.0))
    assert len(calls) == 2


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.4), (0.9, 0.4), (0.5, 0.0)])
def test_sgd_step_matches_torch_sgd(momentum: float, weight_decay: float) -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, generator=g)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.SGD([ref], lr=0.01, momentum=momentum, weight_decay=weight_decay)
    buf = torch.zeros(8)
    for step in range(3):
        grad = torch.randn(8, generator=g)
        ref.grad = grad.clone()
        opt.step()
        sgd_step_(
            p, grad, lr=0.01, weight_decay=weight_decay, momentum=momentum, momentum_buffer=buf, first_step=step == 0
        )
        torch.testing.assert_close(p, ref.detach())


def test_closed_form_adamw_equals_a_first_torch_adamw_step() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=g)
    for _ in range(3):  # the reference wipes AdamW's state after every step
        grad = torch.randn(5, generator=g) * 10 ** torch.randint(-6, 3, (5,), generator=g)
        ref = torch.nn.Parameter(p.clone())
        opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        ref.grad = grad.clone()
        opt.step()
        adamw_first_step_(p, grad, lr=0.01, weight_decay=0.1)
        torch.testing.assert_close(p, ref.detach())
