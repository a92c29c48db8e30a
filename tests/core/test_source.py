"""SourceStatistics: the clean-data mean and unbiased std of the loss features, collected over batches or set."""

from __future__ import annotations

import pytest
import torch

from zoa_lightning.core.source import SourceStatistics
from zoa_lightning.core.stats import identity_reduce


def _flat(images: torch.Tensor) -> torch.Tensor:
    """Stand-in loss features: the first four pixel values of each image."""
    return images.flatten(1)[:, :4]


def _batches(sizes: tuple[int, ...] = (5, 3, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [2 * torch.randn(n, 1, 2, 2, generator=g) + 1 for n in sizes]


def test_collect_gives_the_unbiased_std_over_all_images_of_all_batches() -> None:
    batches = _batches()
    source = SourceStatistics(4)
    source.collect(batches, _flat, identity_reduce)
    std, mean = torch.std_mean(torch.cat([_flat(b) for b in batches]), dim=0)  # unbiased, over the 16 images
    torch.testing.assert_close(source.mean, mean)
    torch.testing.assert_close(source.std, std)
    assert bool(source.ready)


def test_collect_reads_the_images_of_labelled_batches_and_stops_at_max_batches() -> None:
    batches = _batches()
    labelled = [(b, torch.zeros(len(b))) for b in batches]
    first_two = SourceStatistics(4)
    first_two.collect(labelled, _flat, identity_reduce, max_batches=2)
    std, mean = torch.std_mean(torch.cat([_flat(b) for b in batches[:2]]), dim=0)
    torch.testing.assert_close(first_two.mean, mean)
    torch.testing.assert_close(first_two.std, std)


def test_collect_reduces_the_sums_once_over_processes() -> None:
    seen: list[torch.Tensor] = []

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        seen.append(sums.clone())
        return 2 * sums  # two identical processes

    batches = _batches()
    source = SourceStatistics(4)
    source.collect(batches, _flat, reduce)
    assert len(seen) == 1
    assert seen[0].shape == (2 * 4 + 1,)
    assert float(seen[0][-1]) == 16
    features = torch.cat([_flat(b) for b in batches] * 2)  # what one process would see on both processes' images
    std, mean = torch.std_mean(features, dim=0)
    torch.testing.assert_close(source.mean, mean)
    torch.testing.assert_close(source.std, std)


def test_an_empty_loader_is_refused() -> None:
    with pytest.raises(ValueError, match="collect_source_statistics got an empty loader: pass clean source images"):
        SourceStatistics(4).collect([], _flat, identity_reduce)
    with pytest.raises(ValueError, match="empty loader"):
        SourceStatistics(4).collect(_batches(), _flat, identity_reduce, max_batches=0)


def test_set_installs_statistics_of_the_right_shape_only() -> None:
    source = SourceStatistics(3)
    assert not bool(source.ready)
    source.set(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 0.3]))
    assert bool(source.ready)
    torch.testing.assert_close(source.final(2), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match=r"source statistics must have shape \(3,\), got mean \(2,\) and std \(3,\)"):
        source.set(torch.zeros(2), torch.ones(3))
    torch.testing.assert_close(source.std, torch.tensor([0.1, 0.2, 0.3]))  # unchanged by the refused call


def test_set_from_sums_finishes_reduced_sums() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]], dtype=torch.float64)
    sums = torch.cat([x.sum(0), (x * x).sum(0), torch.tensor([3.0], dtype=torch.float64)])
    source = SourceStatistics(2, dtype=torch.float64)
    source.set_from_sums(sums)
    torch.testing.assert_close(source.mean, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(source.std, torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_the_statistics_are_constant_buffers_a_batch_transaction_need_not_copy() -> None:
    source = SourceStatistics(2)
    assert set(source.constant_buffers) == set(source.state_dict()) == {"mean", "std", "ready"}
