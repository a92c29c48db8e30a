"""Shared fixtures: tiny timm models (built fresh per test: ZOA rewrites a model in place) and image streams."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from torch import nn


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """timm zero-initialises some norm scales; give every norm a generic affine so adaptation has an effect."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def make_vit(seed: int = 0) -> nn.Module:
    """timm ``test_vit`` at 32 px (patch 8: 16 tokens + CLS), 10 classes, deterministic weights."""
    torch.manual_seed(seed)
    return _randomize_norms(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8), seed).eval()


def make_resnet(seed: int = 0) -> nn.Module:
    """timm ``test_resnet`` with a single-conv stem (the torchvision-style detector tap), 10 classes."""
    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=10, stem_type="", stem_width=16)
    return _randomize_norms(net, seed).eval()


MODEL_FACTORIES: dict[str, Callable[[int], nn.Module]] = {"vit": make_vit, "resnet": make_resnet}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two processes share two cores: keep the single-process reference run to one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """1,000 real MNIST test-part digits, 32 px, 3 channels, normalised with mean = std = 0.5."""
    from zoa_lightning.data import load_mnist_split

    _, _, images, _ = load_mnist_split(32)
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5


def corrupt_noise(x: torch.Tensor, sigma: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise: a real distribution change for the detector."""
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g)


STREAM_CORRUPTIONS = ["gaussian_noise", "brightness", "contrast"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session cache of three fast corruptions of the MNIST test part."""
    from datamodules import CorruptionStreamDataModule

    path = tmp_path_factory.mktemp("stream-cache")
    CorruptionStreamDataModule(corruptions=STREAM_CORRUPTIONS, cache_dir=str(path)).prepare_data()
    return path


def make_stream(cache: Path, **kwargs: Any) -> Any:
    """A three-domain MNIST corruption stream with 256 source images, read from the session cache."""
    from datamodules import CorruptionStreamDataModule

    return CorruptionStreamDataModule(
        corruptions=STREAM_CORRUPTIONS, cache_dir=str(cache), num_source_images=256, **kwargs
    )


def make_trainer(callbacks: list[pl.Callback] | None = None, batches: int = 2, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU test Trainer running ``batches`` batches per domain, inference mode off."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "limit_test_batches": batches,
        "inference_mode": False,
        "callbacks": callbacks or [],
    }
    options.update(kwargs)
    return pl.Trainer(**options)
