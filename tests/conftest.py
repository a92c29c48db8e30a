"""Fixtures shared by every test (the shared helpers that are not fixtures: ``tests/helpers.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import STREAM_CORRUPTIONS


@pytest.fixture(scope="session", autouse=True)
def _one_thread_and_plain_argv() -> Iterator[None]:
    """Every test (and every fixture it uses) runs with one intra-op thread and ``sys.argv == ["zoa"]``.

    The tiny models gain nothing from two threads on a shared 2-core machine: intra-op threads only add contention.
    ``sys.argv`` is what a LightningCLI parses when no arguments are given, so it must not be pytest's. Session-wide,
    so that module-scoped fixtures (quantized models, calibrations) run on one thread too; both are restored at the end.
    A test that changes either restores it itself (``monkeypatch``).
    """
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["zoa"]
    yield
    torch.set_num_threads(threads)
    sys.argv = argv


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """1,000 real MNIST test-part digits, 32 px, 3 channels, normalised with mean = std = 0.5."""
    from zoa_lightning.data import load_mnist_split

    _, _, images, _ = load_mnist_split(32)
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session cache of three fast corruptions of the MNIST test part."""
    from datamodules import CorruptionStreamDataModule

    path = tmp_path_factory.mktemp("stream-cache")
    CorruptionStreamDataModule(corruptions=STREAM_CORRUPTIONS, cache_dir=str(path)).prepare_data()
    return path
