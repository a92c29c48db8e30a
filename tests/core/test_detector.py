"""The domain-shift detector: symmetric KL against running statistics, the EMA, the reset and the min-batch rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from zoa_lightning.core.detector import DomainShiftDetector, detector_statistics, detector_sums, finish_sums
from zoa_lightning.core.stats import identity_reduce


def _detector(threshold: float = 0.1, momentum: float = 0.8, min_batch: int = 64) -> DomainShiftDetector:
    """Three channels, float64 running statistics."""
    return DomainShiftDetector(3, threshold, momentum, min_batch, dtype=torch.float64)


def test_divergence_is_the_symmetric_kl_of_per_channel_gaussians_averaged_over_channels() -> None:
    det = _detector()
    running_mean, running_var = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 4.0])
    mean, var = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0])
    det.step(running_mean, running_var, images=64)  # the first batch sets the running statistics
    p, q = Normal(running_mean.double(), running_var.double().sqrt()), Normal(mean.double(), var.double().sqrt())
    by_hand = (kl_divergence(p, q) + kl_divergence(q, p)).mean()
    assert det.divergence(mean.double(), var.double()) == pytest.approx(float(by_hand), rel=1e-7)
    assert det.divergence(running_mean.double(), running_var.double()) == pytest.approx(0.0, abs=1e-7)
    # symmetric: swapping the running and the batch statistics gives the same value
    other = _detector()
    other.step(mean, var, images=64)
    assert other.divergence(running_mean.double(), running_var.double()) == pytest.approx(float(by_hand), rel=1e-7)


def test_the_first_batch_initialises_then_an_ema_follows() -> None:
    det = _detector(momentum=0.8)
    assert not bool(det.ready)
    assert det.step(torch.zeros(3), torch.ones(3), images=64) is False  # nothing to compare with yet
    assert bool(det.ready)
    torch.testing.assert_close(det.mean, torch.zeros(3, dtype=torch.float64))
    assert det.step(torch.full((3,), 0.1), torch.full((3,), 1.1), images=64) is False  # close: no shift
    torch.testing.assert_close(det.mean, torch.full((3,), 0.2 * 0.1, dtype=torch.float64))
    torch.testing.assert_close(det.var, torch.full((3,), 0.8 + 0.2 * 1.1, dtype=torch.float64))


def test_a_shift_is_reported_and_the_running_statistics_restart_from_the_batch() -> None:
    det = _detector(threshold=0.1)
    det.step(torch.zeros(3), torch.ones(3), images=64)
    shifted_mean, shifted_var = torch.full((3,), 3.0), torch.full((3,), 2.0)
    assert det.divergence(shifted_mean.double(), shifted_var.double()) > 0.1
    assert det.step(shifted_mean, shifted_var, images=64) is True
    assert bool(det.ready)
    torch.testing.assert_close(det.mean, shifted_mean.double())  # reset to the new domain's batch, no EMA
    torch.testing.assert_close(det.var, shifted_var.double())
    assert det.step(shifted_mean, shifted_var, images=64) is False  # the new domain is now the reference


def test_a_shift_is_a_divergence_strictly_above_the_threshold() -> None:
    mean, var = torch.full((3,), 0.5), torch.full((3,), 1.5)
    for margin, shift in ((0.0, False), (1e-9, True)):
        det = _detector()
        det.step(torch.zeros(3), torch.ones(3), images=64)
        divergence = det.divergence(mean.double(), var.double())
        det.threshold = divergence * (1 - margin)
        assert det.step(mean, var, images=64) is shift, margin


def test_a_batch_below_min_batch_neither_tests_nor_updates_and_warns_once_before_any_full_batch() -> None:
    det = _detector(min_batch=64)
    with pytest.warns(RuntimeWarning, match=r"detector_min_batch=64 images and this stream's batches have 8"):
        assert det.step(torch.zeros(3), torch.ones(3), images=8) is None
    assert not bool(det.ready)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert det.step(torch.zeros(3), torch.ones(3), images=8) is None  # warned once already
    fresh = _detector(min_batch=64)
    fresh.step(torch.zeros(3), torch.ones(3), images=64)
    before = fresh.mean.clone(), fresh.var.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a domain's short last batch after full ones: normal, no warning
        assert fresh.step(torch.full((3,), 5.0), torch.ones(3), images=63) is None
    assert torch.equal(fresh.mean, before[0])
    assert torch.equal(fresh.var, before[1])


def test_detector_statistics_of_a_vit_leave_the_prefix_tokens_out() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 1 + 6, 5, generator=g)  # (B, class token + 6 patch tokens, C)
    tokens[:, 0] += 100.0  # a class token far away: it must not count
    mean, var, images = detector_statistics(tokens, "vit", 1, identity_reduce)
    patches = tokens[:, 1:].double().reshape(-1, 5)
    want_var, want_mean = torch.var_mean(patches, dim=0, correction=1)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    assert images == 4


def test_detector_statistics_of_a_cnn_are_per_channel_over_images_and_pixels() -> None:
    maps = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    mean, var, images = detector_statistics(maps, "cnn", 0, identity_reduce)
    want_var, want_mean = torch.var_mean(maps.double(), dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    assert images == 3


def test_sums_of_two_slices_finish_to_the_whole_batch() -> None:
    maps = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    halves = detector_sums(maps[:2], "cnn", 0, identity_reduce) + detector_sums(maps[2:], "cnn", 0, identity_reduce)
    whole = detector_statistics(maps, "cnn", 0, identity_reduce)
    mean, var, images = finish_sums(halves)
    torch.testing.assert_close(mean, whole[0])
    torch.testing.assert_close(var, whole[1])
    assert images == whole[2] == 6


def test_pooled_small_batches_are_tested_once_their_chunk_holds_min_batch_images() -> None:
    det = DomainShiftDetector(2, threshold=0.1, min_batch=8)
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(3, 2, 2, 2, generator=g) for _ in range(3)]  # 3 + 3 images, then 3 more: 9 >= 8
    assert det.observe(chunks[0], "cnn", 0, identity_reduce, pooled=True) is False
    assert not bool(det.ready)
    assert int(det.pending[-1]) == 3
    det.end_batch()
    assert det.observe(chunks[1], "cnn", 0, identity_reduce, pooled=True) is False
    det.end_batch()
    assert not bool(det.ready)  # 6 images: still pending
    det.observe(chunks[2], "cnn", 0, identity_reduce, pooled=True)
    assert bool(det.ready)
    assert torch.equal(det.pending, torch.zeros_like(det.pending))  # tested and emptied
    mean, _, _ = detector_statistics(torch.cat(chunks), "cnn", 0, identity_reduce)
    torch.testing.assert_close(det.mean, mean.float())  # the chunk's statistics, as one 9-image batch's


def test_a_full_batch_drops_the_pending_chunk() -> None:
    det = DomainShiftDetector(2, threshold=0.1, min_batch=8)
    g = torch.Generator().manual_seed(4)
    det.observe(torch.randn(3, 2, 2, 2, generator=g), "cnn", 0, identity_reduce, pooled=True)
    det.end_batch()
    full = torch.randn(8, 2, 2, 2, generator=g)
    det.observe(full, "cnn", 0, identity_reduce)
    assert torch.equal(det.pending, torch.zeros_like(det.pending))
    torch.testing.assert_close(det.mean, detector_statistics(full, "cnn", 0, identity_reduce)[0].float())


def test_reuse_tests_the_same_statistics_again_within_a_batch() -> None:
    det = DomainShiftDetector(2, threshold=0.1, min_batch=4)
    g = torch.Generator().manual_seed(5)
    det.observe(torch.randn(8, 2, 2, 2, generator=g), "cnn", 0, identity_reduce)
    det.end_batch()
    shifted = 5 + 3 * torch.randn(8, 2, 2, 2, generator=g)
    assert det.observe(shifted, "cnn", 0, identity_reduce) is True  # the prediction pass detects and resets
    mean_after = det.mean.clone()
    unrelated = torch.zeros(8, 2, 2, 2)  # a reused observation ignores the tensor it is given
    assert det.observe(unrelated, "cnn", 0, identity_reduce, reuse=True) is False  # same statistics: no shift now
    torch.testing.assert_close(det.mean, mean_after)  # folded in again: the same values
    det.end_batch()
    fresh = DomainShiftDetector(2, threshold=0.1, min_batch=4)
    assert fresh.observe(shifted, "cnn", 0, identity_reduce, reuse=True) is False  # nothing observed yet: tests it
    assert bool(fresh.ready)
