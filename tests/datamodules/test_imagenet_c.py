import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from datamodules import ImageNetCDataModule

WNIDS = ("n01440764", "n01443537")
PHOTOS = {WNIDS[0]: ("astronaut", "coffee"), WNIDS[1]: ("chelsea", "rocket")}
CORRUPTIONS = ["gaussian_noise", "fog"]


def _write_class_tree(root: Path, size: int, suffix: str = ".JPEG") -> None:
    for wnid, names in PHOTOS.items():
        (root / wnid).mkdir(parents=True)
        for name in names:
            photo = (
                Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            )
            photo.save(root / wnid / f"{name}{suffix}", quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("imagenet")
    for corruption in CORRUPTIONS:
        _write_class_tree(base / "c" / corruption / "5", 32)
    _write_class_tree(base / "val", 40)
    _write_class_tree(base / "train", 48, suffix=".png")
    return base


def _ds(loader: DataLoader) -> Any:
    return loader.dataset


def _make(tree: Path, **kwargs: Any) -> ImageNetCDataModule:
    args: dict[str, Any] = {
        "root": str(tree / "c"),
        "source_root": str(tree / "val"),
        "calib_root": str(tree / "train"),
        "corruptions": CORRUPTIONS,
        "image_size": 32,
        "batch_size": 3,
        "rounds": 2,
    }
    args.update(kwargs)
    return ImageNetCDataModule(**args)


def test_loaders(tree: Path) -> None:
    dm = _make(tree)
    assert dm.num_classes == 2
    assert dm.wnids == WNIDS
    assert dm.domains == ("r1/gaussian_noise", "r1/fog", "r2/gaussian_noise", "r2/fog")
    dm.prepare_data()
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert list(loaders) == list(dm.domains)
    for loader in loaders.values():
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [3, 1]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        assert images.shape == (4, 3, 32, 32)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert sorted(labels.tolist()) == [0, 0, 1, 1]
        assert images.min() >= -1.0
        assert images.max() <= 1.0
    orders = {domain: tuple(_ds(loader).order) for domain, loader in loaders.items()}
    assert orders == {domain: tuple(_ds(loader).order) for domain, loader in _make(tree).test_dataloader().items()}
    for domain, loader in loaders.items():  # every label matches the wnid folder of its file
        for index in _ds(loader).order:
            path, label = _ds(loader).samples[index]
            assert Path(path).parent.name == WNIDS[label], domain


def test_source_and_calibration(tree: Path) -> None:
    dm = _make(tree, num_source_images=3)
    source = dm.source_dataloader()
    assert len(_ds(source)) == 3
    images, _ = next(iter(source))
    assert images.shape == (3, 3, 32, 32)
    calib = dm.calibration_images(2)
    assert calib.shape == (2, 3, 32, 32)
    folder = ImageFolder(str(tree / "train"))
    expected = np.random.RandomState(3).permutation(len(folder))[:2]
    chosen = [dm._folder_samples(tree / "train", "", "")[i][0] for i in expected]
    assert chosen == [folder.samples[i][0] for i in expected]
    resnet = _make(tree, norm="imagenet").calibration_images(2)
    assert not torch.allclose(calib, resnet)
    with pytest.raises(ValueError, match=r"n must be an integer in 1\.\.4"):
        dm.calibration_images(5)
    with pytest.raises(ValueError, match="source_root"):
        _make(tree, source_root=None).source_dataloader()


def test_layout_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        _make(tree, norm="resnet")
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"root folder not found: {re.escape(str(missing))}"):
        _make(tree, root=str(missing)).prepare_data()
    with pytest.raises(FileNotFoundError, match=f"corruption folder not found: {re.escape(str(tree / 'c' / 'snow'))}"):
        _make(tree, corruptions=["fog", "snow"]).prepare_data()
    with pytest.raises(
        FileNotFoundError, match=f"severity folder not found: {re.escape(str(tree / 'c' / 'gaussian_noise' / '3'))}"
    ):
        _make(tree, severity=3).setup("test")


def test_bad_class_folders(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    (root / "fog" / "5" / "n99999999").mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(root / 'fog' / '5'))} has a different wnid set.*n99999999"):
        _make(tree, root=str(root)).setup("test")
    for corruption in CORRUPTIONS:
        (root / corruption / "5" / "n99999999").mkdir(exist_ok=True)
    empty = root / "gaussian_noise" / "5" / "n99999999"
    with pytest.raises(FileNotFoundError, match=f"class folder {re.escape(str(empty))} holds no image files"):
        _make(tree, root=str(root), source_root=None, calib_root=None).setup("test")
    with pytest.raises(ValueError, match=r"source_root folder .* different wnid set"):
        _make(tree, root=str(root)).prepare_data()


def test_unreadable_image_names_the_file(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    bad = root / "fog" / "5" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\x00garbage, not a JPEG")
    dm = _make(tree, root=str(root), batch_size=8, rounds=1)
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert len(next(iter(loaders["r1/gaussian_noise"]))[1]) == 4
    with pytest.raises(OSError, match=f"cannot decode image file '{re.escape(str(bad))}'"):
        list(loaders["r1/fog"])
