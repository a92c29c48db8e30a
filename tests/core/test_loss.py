"""ZOA's loss: the sufficient statistics, the loss from them, and the engine's loss against the spec's features."""

from __future__ import annotations

import copy

import torch

from tests.helpers import corrupt_noise, make_resnet, make_vit
from zoa_lightning.core import ZOA, ZOAConfig, softmax_entropy
from zoa_lightning.core.loss import ZOALoss, loss_statistics

B = 64


def _features(seed: int, n: int = 12, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, dim, generator=g) + 0.3, 2 * torch.randn(n, 5, generator=g)


def _source(dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    return torch.randn(dim, generator=g), torch.rand(dim, generator=g) + 0.5


def test_loss_statistics_are_sums_squares_entropy_and_count() -> None:
    features, logits = _features(0)
    stats = loss_statistics(features, logits)
    assert stats.dtype == torch.float64
    assert stats.shape == (2 * 6 + 2,)
    f = features.double()
    torch.testing.assert_close(stats[:6], f.sum(0))
    torch.testing.assert_close(stats[6:12], (f * f).sum(0))
    p = logits.double().softmax(1)
    torch.testing.assert_close(stats[12], -(p * p.log()).sum(), rtol=1e-6, atol=1e-6)
    assert float(stats[13]) == 12


def test_loss_statistics_of_two_halves_add_up_to_the_whole_batch() -> None:
    features, logits = _features(1)
    halves = loss_statistics(features[:5], logits[:5]) + loss_statistics(features[5:], logits[5:])
    torch.testing.assert_close(halves, loss_statistics(features, logits), rtol=1e-6, atol=1e-6)


def test_equal_width_taps_give_one_mean_over_every_dimension() -> None:
    """ViT: three taps of width 2 are one MSE over all six dimensions (spec §2.2), plus the mean entropy."""
    features, logits = _features(2)
    source_mean, source_std = _source()
    loss, mean = ZOALoss([2, 2, 2], lambda_bp=30.0)(loss_statistics(features, logits), source_mean, source_std)
    std, batch_mean = torch.std_mean(features.double(), dim=0)  # unbiased
    direct = 30.0 * (((std - source_std.double()) ** 2).mean() + ((batch_mean - source_mean.double()) ** 2).mean())
    direct = direct + softmax_entropy(logits.double()).mean()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(mean, batch_mean)


def test_unequal_width_taps_are_averaged_per_stage_with_equal_weight() -> None:
    """CNN: each stage's discrepancy is averaged over its own dimensions, then the stages with equal weight."""
    features, logits = _features(3)
    source_mean, source_std = _source()
    widths = [1, 2, 3]
    loss, _ = ZOALoss(widths, lambda_bp=2.0)(loss_statistics(features, logits), source_mean, source_std)
    std, batch_mean = torch.std_mean(features.double(), dim=0)
    terms = []
    for s, m, ss, sm in zip(std.split(widths), batch_mean.split(widths), source_std.double().split(widths),
                            source_mean.double().split(widths), strict=True):  # fmt: skip
        terms.append(((s - ss) ** 2).mean() + ((m - sm) ** 2).mean())
    entropy = softmax_entropy(logits.double()).mean()
    direct = 2.0 * torch.stack(terms).mean() + entropy
    torch.testing.assert_close(loss, direct)
    one_mean = 2.0 * (((std - source_std.double()) ** 2).mean() + ((batch_mean - source_mean.double()) ** 2).mean())
    assert abs(float(loss - entropy - one_mean)) > 1e-3  # the weighting matters: not one mean over all dimensions


def test_lambda_zero_leaves_the_mean_entropy() -> None:
    features, logits = _features(4)
    source_mean, source_std = _source()
    loss, _ = ZOALoss([6], lambda_bp=0.0)(loss_statistics(features, logits), source_mean, source_std)
    torch.testing.assert_close(loss, softmax_entropy(logits.double()).mean())
    assert ZOALoss([2, 4], 1.0).dim == 6


def test_source_statistics_and_loss_match_the_spec_features(digits: torch.Tensor) -> None:
    """ViT: F = [next block's norm1(CLS) for blocks 0..D-2, final norm(CLS)] (spec §2.2)."""
    net = make_vit(0)
    reference = copy.deepcopy(net)
    adapter = ZOA(net, ZOAConfig(lambda_bp=30.0))
    clean = digits[:256]
    adapter.collect_source_statistics(clean.split(B))

    def features(x: torch.Tensor) -> torch.Tensor:
        h = reference.norm_pre(reference._pos_embed(reference.patch_embed(x)))
        feats = []
        for i, block in enumerate(reference.blocks):
            h = block(h)
            nxt = reference.blocks[i + 1].norm1 if i + 1 < len(reference.blocks) else reference.norm
            feats.append(nxt(h[:, 0]))
        return torch.cat(feats, 1)

    with torch.no_grad():
        f_all = features(clean)
        std, mean = torch.std_mean(f_all, dim=0)
        torch.testing.assert_close(adapter.source.mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.source.std, std, atol=1e-5, rtol=1e-5)
        x = corrupt_noise(digits[300 : 300 + B])
        f = features(x)
        bs, bm = torch.std_mean(f, dim=0)
        logits = reference.head(f[:, -reference.embed_dim :])
        expected = 30 * (((bs - std) ** 2).mean() + ((bm - mean) ** 2).mean()) + softmax_entropy(logits).mean()
        loss = adapter.fitness(x).loss
    torch.testing.assert_close(loss.float(), expected, atol=1e-4, rtol=1e-5)


def test_resnet_loss_averages_stages_with_equal_weight(digits: torch.Tensor) -> None:
    net = make_resnet(0)
    adapter = ZOA(net, ZOAConfig(lambda_bp=1.0))
    adapter.collect_source_statistics(digits[:256].split(B))
    x = digits[300 : 300 + B]
    captured: list[torch.Tensor] = []
    hooks = [
        net.get_submodule(n).register_forward_hook(lambda _, __, o: captured.append(o.mean((2, 3))))
        for n in ("layer1", "layer2", "layer3")
    ]
    hooks.append(net.fc.register_forward_pre_hook(lambda _, a: captured.append(a[0])))
    with torch.no_grad():
        loss = adapter.fitness(x).loss
        logits = net(x)
    for h in hooks:
        h.remove()
    terms, offset = [], 0
    for g in captured[4:]:  # the second forward's taps
        bs, bm = torch.std_mean(g, dim=0)
        d = g.shape[1]
        terms.append(
            ((bs - adapter.source.std[offset : offset + d]) ** 2).mean()
            + ((bm - adapter.source.mean[offset : offset + d]) ** 2).mean()
        )
        offset += d
    expected = torch.stack(terms).mean() + softmax_entropy(logits).mean()
    torch.testing.assert_close(loss.float(), expected, atol=1e-4, rtol=1e-5)
