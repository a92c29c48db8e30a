"""Shared by the adapter tests: one intra-op thread and seeded random image batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (3-4x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random 32 px RGB images from a generator seeded with ``seed``."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
