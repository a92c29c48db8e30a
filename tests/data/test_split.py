"""zoa_lightning.data: the clean split the stream data module and the demo training share, without Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zoa_lightning
from datamodules import CorruptionStreamDataModule
from zoa_lightning.data import (
    FOLDER_LAYOUT,
    CleanSplit,
    UnreadableImageError,
    dataset_classes,
    describe_split,
    is_mnist,
    load_clean_split,
    load_mnist_split,
)

PACKAGE = Path(zoa_lightning.__file__).parent


def _folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_mnist_split_is_the_embedded_one() -> None:
    split = load_clean_split("MNIST", 32)
    assert isinstance(split, CleanSplit)
    for got, want in zip(split, load_mnist_split(32), strict=True):
        assert got is want
    assert is_mnist("mnist")
    assert dataset_classes("mnist") == [str(i) for i in range(10)]
    assert "RandomState(0)" in describe_split("mnist", 32)


def test_folder_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "shapes")
    train_x, train_y, test_x, test_y = load_clean_split(str(root), 16)
    assert (len(train_y), len(test_y)) == (10, 2)  # 20 % of 12 images
    assert train_x.shape[1:] == test_x.shape[1:] == (16, 16, 3)
    assert train_x.dtype == np.uint8
    assert not train_x.flags.writeable
    assert sorted(np.concatenate([train_y, test_y]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert dataset_classes(str(root)) == ["class0", "class1", "class2"]
    assert "3 classes" in describe_split(str(root), 16)


def test_the_data_module_serves_the_same_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "shapes")
    module = CorruptionStreamDataModule(dataset=str(root), image_size=16)
    for got, want in zip(module.clean_split(), load_clean_split(str(root), 16), strict=True):
        assert np.array_equal(got, want)
    assert module.num_classes == 3


def test_folder_errors_name_the_path_and_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither 'mnist' nor an existing folder") as missing:
        load_clean_split(str(tmp_path / "nowhere"), 16)
    assert FOLDER_LAYOUT in str(missing.value)
    single = _folder(tmp_path / "single", classes=2, per_class=1)
    (single / "class1" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"the class folder\(s\) class1 hold no image files.*remove the empty ones"):
        load_clean_split(str(single), 16)  # an empty class folder is no class (it used to count as one)
    (single / "class1").rmdir()
    with pytest.raises(ValueError, match=r"has 1 class folder \(class0\): a classifier needs at least two classes"):
        load_clean_split(str(single), 16)
    broken = _folder(tmp_path / "broken", classes=2, per_class=2)
    (broken / "class0" / "0.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match=r"0\.png"):
        load_clean_split(str(broken), 16)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_package_imports_no_data_module_or_callback() -> None:
    # The demo training (like everything installed under zoa_lightning/) reads its data from zoa_lightning.data.
    files = sorted(PACKAGE.rglob("*.py"))
    assert not [f.name for f in files if _imports(f) & {"datamodules", "callbacks"}]
    pure = [f for f in files if f.parent.name in ("data", "demo") or f.name == "reporting.py"]
    assert not [f.name for f in pure if "lightning" in _imports(f)]


def test_the_stream_data_module_has_no_training_loader_or_augmentation() -> None:
    assert not hasattr(CorruptionStreamDataModule, "train_dataloader") or (
        CorruptionStreamDataModule.train_dataloader.__qualname__.startswith(("LightningDataModule", "DataHooks"))
    )
    with pytest.raises(TypeError, match="augment"):
        CorruptionStreamDataModule(augment=True)  # type: ignore[call-arg]
