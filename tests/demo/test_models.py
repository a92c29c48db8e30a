"""Tests of the demo source models: architectures, weight loading and the shipped weights' clean accuracy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.demo import (
    DEMO_MODEL_NAMES,
    build_demo_cnn,
    build_demo_model,
    build_demo_vit,
    default_weights_path,
    load_demo_model,
)
from zoa_lightning.demo.recipes import Recipe
from zoa_lightning.demo.train import _augment, _lr_factor


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    return build_demo_vit()


@pytest.fixture(scope="module")
def cnn() -> ResNet:
    return build_demo_cnn()


def _randomized_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def test_vit_architecture(vit: VisionTransformer) -> None:
    assert isinstance(vit, VisionTransformer)
    assert vit.cls_token is not None
    assert vit.global_pool == "token"
    assert vit.num_prefix_tokens == 1
    assert len(vit.blocks) == 6
    assert vit.embed_dim == 96
    assert vit.patch_embed.patch_size == (4, 4)
    assert vit.patch_embed.num_patches == 64
    assert vit.blocks[0].attn.num_heads == 3
    assert vit.head.out_features == 10
    with torch.no_grad():
        assert vit.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert resolve_layout(vit).kind == "vit"


def test_cnn_architecture(cnn: ResNet) -> None:
    assert isinstance(cnn, ResNet)
    assert isinstance(cnn.conv1, nn.Conv2d)
    assert (cnn.conv1.kernel_size, cnn.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(cnn.bn1, nn.BatchNorm2d)
    assert isinstance(cnn.maxpool, nn.Identity)
    for i in range(1, 5):
        stage = getattr(cnn, f"layer{i}")
        assert len(stage) == 2
        assert any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())
    assert cnn.fc.out_features == 10
    num_params = sum(p.numel() for p in cnn.parameters())
    assert 250_000 <= num_params <= 800_000  # about 1-3 MB in float32
    with torch.no_grad():
        assert cnn.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    layout = resolve_layout(cnn)
    assert layout.kind == "cnn"
    assert layout.detector == "conv1"


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="demo_vit"):
        build_demo_model("resnet50")


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_round_trip(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    state = _randomized_state(build_demo_model(name), seed=1)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(path))
    model = load_demo_model(name, path)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        expected = value.to(dtype).to(value.dtype) if value.is_floating_point() else value
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0)


def test_missing_file_names_path_and_command(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "demo_cnn.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))) as info:
        load_demo_model("demo_cnn", path)
    assert "python -m zoa_lightning.demo.train --model demo_cnn" in str(info.value)


def test_default_path_lives_in_package() -> None:
    path = default_weights_path("demo_vit")
    assert path.name == "demo_vit.safetensors"
    assert path.parent.name == "weights"
    assert path.parent.parent.name == "demo"


def test_mismatched_keys_name_path(cnn: ResNet, tmp_path: Path) -> None:
    path = tmp_path / "cnn_as_vit.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_demo_model("demo_vit", path)


def test_mismatched_shapes_name_path(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.safetensors"
    save_file({k: v.contiguous() for k, v in build_demo_cnn(num_classes=5).state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*wrong shape"):
        load_demo_model("demo_cnn", path)


def test_unreadable_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_demo_model("demo_cnn", path)


def test_augment_identity_and_range() -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    still = Recipe(1, 1e-3, 0.0, 4, 0, 0.0, max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0)
    torch.testing.assert_close(_augment(x, still, torch.Generator().manual_seed(0)), x, rtol=0, atol=1e-5)
    moved = Recipe(1, 1e-3, 0.0, 4, 0, 0.0)
    first = _augment(x, moved, torch.Generator().manual_seed(3))
    assert first.shape == x.shape
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0
    torch.testing.assert_close(first, _augment(x, moved, torch.Generator().manual_seed(3)), rtol=0, atol=0)


def test_lr_schedule() -> None:
    assert _lr_factor(0, 10, 100) == pytest.approx(0.01)
    assert _lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert _lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert _lr_factor(100, 10, 100) == pytest.approx(0.0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "minimum"), [("demo_cnn", 0.98), ("demo_vit", 0.95)])
def test_shipped_weights_clean_accuracy(name: str, minimum: float) -> None:
    if not default_weights_path(name).is_file():
        pytest.skip(f"no shipped weights for {name}; run `python -m zoa_lightning.demo.train --model {name}`")
    from zoa_lightning.data import load_mnist_split
    from zoa_lightning.demo.train import evaluate

    _, _, test_images, test_labels = load_mnist_split(32)
    assert evaluate(load_demo_model(name), test_images, test_labels) >= minimum


def test_shipped_weights_fit_size_budget() -> None:
    paths = [default_weights_path(name) for name in DEMO_MODEL_NAMES]
    if not all(p.is_file() for p in paths):
        pytest.skip("shipped weights not built yet")
    assert sum(p.stat().st_size for p in paths) <= 10_000_000
