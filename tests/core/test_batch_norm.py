"""BatchNorm under ZOA: batch statistics, the running estimates a pooled small batch mixes in, the two layer kinds."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.batch_norm import (
    BatchStatistics,
    BatchStatisticsNorm2d,
    FusedBatchNorm2d,
    reduced_batch_norm,
    use_batch_statistics_norms,
)


def test_a_pooled_batch_mixes_the_running_estimate_and_records_only_when_asked() -> None:
    stats = BatchStatistics()
    source_mean, source_var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    offset = stats.add(source_mean, source_var)  # the estimate starts at the source statistics
    x = torch.randn(2, 2, 3, 3) * 3 + 1
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)

    def expected(running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        w = 2 / (2 + 16)
        spread = w * (1 - w) * (mean - running_mean) ** 2  # the variance of the mixture of the two
        mixed_mean, mixed_var = w * mean + (1 - w) * running_mean, w * var + (1 - w) * running_var + spread
        return (x - mixed_mean.view(1, 2, 1, 1)) / torch.sqrt(mixed_var.view(1, 2, 1, 1) + 1e-5)

    stats.prior, stats.record = 16.0, True
    assert stats.needs_own_norm(x)
    torch.testing.assert_close(
        stats.normalize(x, 1e-5, offset), expected(source_mean, source_var), rtol=1e-5, atol=1e-5
    )
    stats.commit(8)  # 2 images of an 8-image window: a quarter of the way to the batch's statistics
    moved = stats.running[offset : offset + 4].float()
    torch.testing.assert_close(moved, torch.cat([0.75 * source_mean + 0.25 * mean, 0.75 * source_var + 0.25 * var]))
    stats.record = False
    out = stats.normalize(x, 1e-5, offset)  # not recorded: the estimate stays
    torch.testing.assert_close(out, expected(moved[:2], moved[2:]), rtol=1e-5, atol=1e-5)
    stats.commit(8)
    assert torch.equal(stats.running[offset : offset + 4].float(), moved)
    stats.end_batch()  # one value per channel: the estimate mixed in with weight 1 instead of failing
    assert (stats.prior, stats.record) == (None, False)
    assert not stats.needs_own_norm(x)
    one = torch.randn(1, 2, 1, 1)
    assert stats.needs_own_norm(one)
    assert torch.isfinite(stats.normalize(one, 1e-5, offset)).all()


def test_reduced_batch_norm_over_two_slices_equals_the_whole_batch() -> None:
    x = torch.randn(6, 3, 4, 4) * 2 + 0.5
    parts = x.split(3)
    total = sum(torch.cat([p.double().sum((0, 2, 3)), (p.double() ** 2).sum((0, 2, 3)), torch.tensor([p.numel() / 3.0],
        dtype=torch.float64)]) for p in parts)  # fmt: skip
    halves = [reduced_batch_norm(p, 1e-5, lambda _: total) for p in parts]
    torch.testing.assert_close(torch.cat(halves), F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5))


def test_a_fused_batch_norm_reads_its_affine_and_normalises_with_batch_statistics() -> None:
    bank = KnowledgeBank([3, 2], torch.randn(10))
    stats = BatchStatistics()
    bn = FusedBatchNorm2d(2, 1e-5, functools.partial(bank.layer_affine, 1), stats)
    bank.theta.add_(0.5)
    y = torch.randn(4, 2, 5, 5)
    w, b = bank.layer_affine(1)
    bn.eval()  # the mode does not matter: batch statistics always
    torch.testing.assert_close(bn(y), F.batch_norm(y, None, None, w, b, True, 0.0, 1e-5))
    alpha, theta = bank.alpha[:1].expand(4, 1), bank.theta.expand(4, -1).clone()
    theta[1] += 1.0  # one image with other values: a per-image affine
    with bank.evaluated_at(alpha, theta):
        per_image = bn(y)
    torch.testing.assert_close(per_image[0], bn(y)[0])
    assert not torch.allclose(per_image[1], bn(y)[1])
    assert not list(bn.parameters())
    assert not list(bn.buffers())  # its running test statistics live in the BatchStatistics
    assert stats.running.numel() == 4


def test_the_networks_own_batch_norms_keep_their_parameters_and_follow_the_shared_settings() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
        net[1].weight.uniform_(0.5, 1.5)
    weight = net[1].weight
    stats = BatchStatistics()
    use_batch_statistics_norms(net, ["1"], stats)
    assert isinstance(net[1], BatchStatisticsNorm2d)
    assert net[1].weight is weight
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    torch.testing.assert_close(stats.running[:4], torch.full((4,), 0.3, dtype=torch.float64))
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        plain = net(x)
        conv = net[0](x)
        torch.testing.assert_close(plain, F.relu(F.batch_norm(conv, None, None, weight, net[1].bias, True, 0.0, 1e-5)))
        stats.prior = 8.0
        assert not torch.allclose(net(x), plain)  # the running estimate mixed in


@pytest.mark.parametrize("images", [1, 3])
def test_one_value_per_channel_does_not_fail(images: int) -> None:
    stats = BatchStatistics()
    offset = stats.add(torch.zeros(2), torch.ones(2))
    out = stats.normalize(torch.randn(images, 2, 1, 1), 1e-5, offset)
    assert torch.isfinite(out).all()
