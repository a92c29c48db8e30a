"""build_network: weights files load in full, and a classifier with another class count is refused at build time."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from callbacks import QuantizationCallback
from cli import make_cli
from zoa_lightning.demo import build_demo_vit, default_weights_path
from zoa_lightning.networks import build_network

ROOT = Path(__file__).resolve().parents[1]


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def test_vit_10() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=10).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_with_the_requested_classes_loads_its_classifier(
    test_vit_10: torch.nn.Module, suffix: str, tmp_path: Path
) -> None:
    # timm keeps a file's classifier only if the class count equals its pretrained config's (1,000 here); before the
    # fix a 10-class file built with num_classes=10 silently got a random head (and a non-strict load of the rest)
    path = _save(test_vit_10.state_dict(), tmp_path / f"test_vit{suffix}")
    model = build_network("test_vit", path, num_classes=10)
    for key, value in test_vit_10.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("num_classes", [7, None])
def test_timm_checkpoint_with_other_classes_is_refused(
    test_vit_10: torch.nn.Module, num_classes: int | None, tmp_path: Path
) -> None:
    path = _save(test_vit_10.state_dict(), tmp_path / "test_vit.safetensors")
    expected = 1000 if num_classes is None else num_classes
    message = (
        f"weights file {path} has a 10-class classifier (head.weight of shape (10, 64)), but timm model 'test_vit' is "
        f"built for num_classes={expected} (classifier shape ({expected}, 64))"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        build_network("test_vit", path, num_classes=num_classes)
    assert "--model.init_args.num_classes" in str(info.value)


def test_timm_checkpoint_without_classifier_is_refused(test_vit_10: torch.nn.Module, tmp_path: Path) -> None:
    # with num_classes != 1000 timm used to drop the head and load the rest with strict=False: a missing head went
    # unnoticed; now the load is strict
    state = {k: v for k, v in test_vit_10.state_dict().items() if not k.startswith("head.")}
    path = _save(state, tmp_path / "headless.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"weights file {path} does not fit timm model 'test_vit'")):
        build_network("test_vit", path, num_classes=10)


def test_torchvision_checkpoint_with_other_classes_is_refused(tmp_path: Path) -> None:
    import torchvision

    path = _save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    message = (
        f"weights file {path} has a 10-class classifier (fc.weight of shape (10, 512)), but torchvision model "
        "'resnet18' is built for num_classes=7 (classifier shape (7, 512))"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_network("torchvision:resnet18", path, num_classes=7)
    assert build_network("torchvision:resnet18", path, num_classes=10).fc.out_features == 10


def test_demo_model_with_other_classes_is_refused() -> None:
    shipped = default_weights_path("demo_vit")
    message = (
        f"weights file {shipped} holds a 10-class demo_vit (classifier head.weight of shape (10, 96)), but "
        "num_classes=7 is requested"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        build_network("demo_vit", num_classes=7)
    assert "`python -m zoa_lightning.demo.train --model demo_vit --dataset <your image folder>`" in str(info.value)
    assert "--model.init_args.weights" in str(info.value)
    assert build_network("demo_vit", num_classes=10).head.out_features == 10


def test_demo_model_loads_weights_with_other_classes(tmp_path: Path) -> None:
    trained = build_demo_vit(num_classes=7)
    path = tmp_path / "demo_vit.safetensors"
    save_file(trained.state_dict(), str(path))
    model = build_network("demo_vit", str(path), num_classes=7)
    torch.testing.assert_close(model.head.weight, trained.head.weight, rtol=0, atol=0)


def test_cli_refuses_a_demo_model_for_other_data_before_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 7-class folder data set with the demo config: before the fix the run quantized the 10-class demo ViT (minutes
    # of calibration) and then crashed in the first metric update
    rng = np.random.default_rng(0)
    for label in range(7):
        (tmp_path / "data" / f"class{label}").mkdir(parents=True)
        for index in range(2):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / f"class{label}" / f"{index}.png")
    calibrations: list[int] = []
    monkeypatch.setattr(QuantizationCallback, "_calibrate", lambda *args: calibrations.append(1))
    args = [
        "-c",
        str(ROOT / "configs" / "demo.yaml"),
        "--data.init_args.dataset",
        str(tmp_path / "data"),
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    with pytest.raises((ValueError, SystemExit)) as info:
        make_cli(args, run=False)
    message = str(info.value) if isinstance(info.value, ValueError) else str(info.value.__context__)
    assert "holds a 10-class demo_vit" in message
    assert "num_classes=7 is requested" in message
    assert calibrations == []


def test_missing_shipped_weights_name_the_folder_to_train_into(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # demo.train writes to ./runs/demo-weights by default, so a command without --out would not recreate the file
    monkeypatch.setattr("zoa_lightning.demo.models._WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        build_network("demo_cnn")
    assert f"`python -m zoa_lightning.demo.train --model demo_cnn --out {tmp_path}`" in str(info.value)
