import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from datamodules import ImageNetCDataModule
from datamodules.imagenet_c import imagenet_class_index
from tests.helpers import imagenet_c_data, photo, resized, save_class_tree

# ImageNet-1k synsets whose canonical indices (281 tabby cat, 967 espresso) differ from their folder positions (0, 1)
WNIDS = ("n02123045", "n07920052")
IMAGENET_LABELS = (281, 967)
PHOTOS = {WNIDS[0]: ("chelsea", "astronaut"), WNIDS[1]: ("coffee", "rocket")}
CORRUPTIONS = ["gaussian_noise", "fog"]
LABEL_SPACE_CASES = [("auto", 1000, IMAGENET_LABELS), ("imagenet", 1000, IMAGENET_LABELS), ("folders", 2, (0, 1))]


def _write_class_tree(
    root: Path, size: int, suffix: str = ".JPEG", photos: dict[str, tuple[str, ...]] = PHOTOS
) -> None:
    pairs = [(wnid, name) for wnid, names in photos.items() for name in names]
    images = [resized(photo(name), size) for _, name in pairs]
    save_class_tree(images, [name for _, name in pairs], [wnid for wnid, _ in pairs], root, suffix)


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
    options = {"corruptions": CORRUPTIONS, "image_size": 32, "batch_size": 3, "rounds": 2}
    return imagenet_c_data(tree, "c", **{**options, **kwargs})


def _labels(loader: DataLoader) -> list[int]:
    return sorted(int(label) for _, label in _ds(loader).samples)


def test_imagenet_class_index() -> None:
    index = imagenet_class_index()
    assert len(index) == 1000
    assert list(index.values()) == list(range(1000))
    assert list(index) == sorted(index)
    assert index["n01440764"] == 0  # tench
    assert index["n15075141"] == 999  # toilet tissue
    assert tuple(index[wnid] for wnid in WNIDS) == IMAGENET_LABELS


@pytest.mark.parametrize(("label_space", "num_classes", "expected"), LABEL_SPACE_CASES)
def test_loaders(tree: Path, label_space: str, num_classes: int, expected: tuple[int, int]) -> None:
    dm = _make(tree, label_space=label_space)
    assert dm.num_classes == num_classes
    assert dm.wnids == WNIDS
    assert dm.effective_label_space == ("folders" if num_classes == 2 else "imagenet")
    assert len(dm.class_wnids) == num_classes
    assert tuple(dm.class_wnids.index(wnid) for wnid in WNIDS) == expected
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
        assert sorted(labels.tolist()) == sorted(2 * expected)
        assert images.min() >= -1.0
        assert images.max() <= 1.0
    orders = {domain: tuple(_ds(loader).order) for domain, loader in loaders.items()}
    again = _make(tree, label_space=label_space).test_dataloader()
    assert orders == {domain: tuple(_ds(loader).order) for domain, loader in again.items()}
    for domain, loader in loaders.items():  # every label matches the wnid folder of its file
        for index in _ds(loader).order:
            path, label = _ds(loader).samples[index]
            assert Path(path).parent.name == dm.class_wnids[label], domain
    assert _labels(dm.source_dataloader()) == sorted(2 * expected)


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
    with pytest.raises(ValueError, match=r"asked for 5 clean images and 4 are available: set .calib_images. of"):
        dm.calibration_images(5)
    with pytest.raises(ValueError, match="source_root"):
        _make(tree, source_root=None).source_dataloader()


def test_non_imagenet_folders(tmp_path: Path) -> None:
    photos = {"cat": ("chelsea",), "coffee": ("coffee",)}
    for corruption in CORRUPTIONS:
        _write_class_tree(tmp_path / "c" / corruption / "5", 32, photos=photos)
    _write_class_tree(tmp_path / "val", 32, photos=photos)
    dm = _make(tmp_path, calib_root=None)
    assert dm.effective_label_space == "folders"
    assert dm.num_classes == 2
    assert dm.class_wnids == ("cat", "coffee")
    dm.setup("test")
    assert _labels(dm.test_dataloader()["r1/fog"]) == [0, 1]
    assert _labels(dm.source_dataloader()) == [0, 1]
    strict = _make(tmp_path, calib_root=None, label_space="imagenet")
    assert strict.num_classes == 1000  # known without reading the folders
    bad = tmp_path / "c" / "gaussian_noise" / "5" / "cat"
    with pytest.raises(ValueError, match=f"wnid folder {re.escape(str(bad))} is not one of the 1,000 ImageNet-1k"):
        strict.setup("test")


def test_mixed_imagenet_folders_are_not_imagenet(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    for corruption in CORRUPTIONS:
        (root / corruption / "5" / "n99999999").mkdir()
        shutil.copy(next((tree / "val" / WNIDS[0]).iterdir()), root / corruption / "5" / "n99999999" / "x.JPEG")
    dm = _make(tree, root=str(root), source_root=None, calib_root=None)
    assert dm.effective_label_space == "folders"
    assert dm.num_classes == 3
    bad = root / "gaussian_noise" / "5" / "n99999999"
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not one of .* \\(1 such folder"):
        _make(tree, root=str(root), label_space="imagenet").prepare_data()


def test_clean_folders_may_hold_other_imagenet_wnids(tree: Path, tmp_path: Path) -> None:
    val = tmp_path / "val"
    _write_class_tree(val, 40, photos={WNIDS[1]: ("coffee",), "n01440764": ("astronaut", "rocket")})
    train = tmp_path / "train"
    _write_class_tree(train, 40, photos={"n04266014": ("astronaut", "rocket")})
    dm = _make(tree, source_root=str(val), calib_root=str(train))
    dm.prepare_data()
    dm.setup("test")
    assert _labels(dm.source_dataloader()) == [0, 0, IMAGENET_LABELS[1]]
    calib_labels = sorted(label for _, label in dm._folder_samples(train, "", ""))
    assert calib_labels == [812, 812]  # n04266014 space shuttle
    assert dm.calibration_images(2).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=f"source_root folder {re.escape(str(val))} has a different wnid set"):
        _make(tree, source_root=str(val), label_space="folders").prepare_data()
    (val / "n99999999").mkdir()
    bad = val / "n99999999"
    with pytest.raises(ValueError, match=f"wnid folder {re.escape(str(bad))} is not one of the 1,000 ImageNet-1k"):
        _make(tree, source_root=str(val)).prepare_data()


def test_argument_errors(tree: Path) -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        _make(tree, norm="resnet")
    with pytest.raises(ValueError, match=r"label_space must be one of \['auto', 'imagenet', 'folders'\], got 'in1k'"):
        _make(tree, label_space="in1k")


@pytest.mark.parametrize("argument", ["root", "source_root", "calib_root"])
def test_missing_folders_fail_at_construction(tree: Path, tmp_path: Path, argument: str) -> None:
    missing = tmp_path / "missing"
    layout = r"<root>/<corruption>/<severity>/<wnid>/<image>\.JPEG" if argument == "root" else r"<folder>/<wnid>/"
    with pytest.raises(
        FileNotFoundError, match=f"folder not found: {re.escape(str(missing))}\\. Expected layout: {layout}"
    ):
        _make(tree, **{argument: str(missing)})
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    with pytest.raises(FileNotFoundError, match=f"folder is not a directory: {re.escape(str(a_file))}.*{layout}"):
        _make(tree, **{argument: str(a_file)})


def test_layout_errors(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    dm = _make(tree, root=str(root))
    shutil.rmtree(root)  # deleted after construction: prepare_data still names it
    with pytest.raises(FileNotFoundError, match=f"root folder not found: {re.escape(str(root))}"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=f"corruption folder not found: {re.escape(str(tree / 'c' / 'snow'))}"):
        _make(tree, corruptions=["fog", "snow"]).prepare_data()
    with pytest.raises(
        FileNotFoundError, match=f"severity folder not found: {re.escape(str(tree / 'c' / 'gaussian_noise' / '3'))}"
    ):
        _make(tree, severity=3).setup("test")


@pytest.mark.parametrize("label_space", ["auto", "folders"])
def test_bad_class_folders(tree: Path, tmp_path: Path, label_space: str) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    (root / "fog" / "5" / "n01440764").mkdir()  # an ImageNet wnid: the corruption folders must still agree
    with pytest.raises(ValueError, match=f"{re.escape(str(root / 'fog' / '5'))} has a different wnid set.*n01440764"):
        _make(tree, root=str(root), label_space=label_space).setup("test")
    for corruption in CORRUPTIONS:
        (root / corruption / "5" / "n01440764").mkdir(exist_ok=True)
    empty = root / "gaussian_noise" / "5" / "n01440764"
    with pytest.raises(FileNotFoundError, match=f"class folder {re.escape(str(empty))} holds no image files"):
        _make(tree, root=str(root), source_root=None, calib_root=None, label_space=label_space).setup("test")
    (empty / "a.JPEG").write_bytes((root / "fog" / "5" / WNIDS[0] / "chelsea.JPEG").read_bytes())
    (root / "fog" / "5" / "n01440764" / "a.JPEG").write_bytes(empty.joinpath("a.JPEG").read_bytes())
    dm = _make(tree, root=str(root), label_space=label_space)
    if label_space == "folders":
        with pytest.raises(ValueError, match=r"source_root folder .* different wnid set.*label_space='folders'"):
            dm.prepare_data()
    else:  # canonical labels: the clean folders may hold a different subset of ImageNet wnids
        dm.prepare_data()
        assert dm.num_classes == 1000


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


@pytest.mark.parametrize("num_workers", [0, 1])
def test_images_smaller_than_the_crop_are_reported_once(tree: Path, tmp_path: Path, num_workers: int) -> None:
    root = tmp_path / "c"
    shutil.copytree(tree / "c", root)
    shutil.rmtree(root / "fog")
    _write_class_tree(root / "fog" / "5", 24)  # 4 images of 24 px, read in both rounds, padded to the 32-px crop
    dm = _make(tree, root=str(root), num_workers=num_workers)
    dm.setup("test")
    for loader in dm.test_dataloader().values():
        list(loader)
    message = rf"4 test image file\(s\) under {re.escape(str(root))} are smaller than the 32-pixel centre crop"
    with pytest.warns(UserWarning, match=message) as record:
        dm.teardown("test")
    assert "24×24" in str(record[0].message)
    for loader in dm.test_dataloader().values():
        list(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.teardown("test")  # once per data module: no second warning


def test_images_as_large_as_the_crop_are_not_reported(tree: Path, recwarn: pytest.WarningsRecorder) -> None:
    dm = _make(tree, rounds=1)
    dm.setup("test")
    for loader in dm.test_dataloader().values():
        list(loader)
    dm.teardown("test")
    assert not [w for w in recwarn if "centre crop" in str(w.message)]


def test_stream_fingerprint_identifies_files_not_their_folder(tree: Path, tmp_path: Path) -> None:
    dm = _make(tree)
    dm.setup("test")
    fingerprint = dm.stream_fingerprint()
    assert fingerprint["test_images"].startswith("8 files, sha256 ")
    assert fingerprint["label_space"] == "imagenet"
    moved = tmp_path / "moved"
    shutil.copytree(tree / "c", moved)
    assert _make(tree, root=str(moved)).stream_fingerprint() == fingerprint
    (moved / "fog" / "5" / WNIDS[0] / "chelsea.JPEG").rename(moved / "fog" / "5" / WNIDS[0] / "other.JPEG")
    assert _make(tree, root=str(moved)).stream_fingerprint()["test_images"] != fingerprint["test_images"]
    assert _make(tree, norm="imagenet").stream_fingerprint()["norm"] == "imagenet"


def test_label_shifted_order_and_its_fingerprint(tree: Path) -> None:
    from datamodules._common import dirichlet_order

    shifted = _make(tree, label_dirichlet=0.01)
    shifted.setup("test")
    for domain, loader in shifted.test_dataloader().items():
        dataset = _ds(loader)
        labels = np.array([label for _, label in dataset.samples])
        round_index, corruption = int(domain[1]), domain.split("/")[1]
        expected = dirichlet_order(labels, 0.01, shifted.seed, round_index, corruption)
        np.testing.assert_array_equal(dataset.order, expected)
        assert sorted(dataset.order.tolist()) == list(range(len(labels)))
    assert shifted.stream_fingerprint()["label_dirichlet"] == 0.01
    assert "label_dirichlet" not in _make(tree).stream_fingerprint()
    with pytest.raises(ValueError, match="label_dirichlet"):
        _make(tree, label_dirichlet=0)


def test_mixed_domains_read_every_corruption_of_a_round_in_one_domain(tree: Path) -> None:
    mixed = _make(tree, mixed_domains=True)
    mixed.setup("test")
    loaders = mixed.test_dataloader()
    assert list(loaders) == ["r1/mixed", "r2/mixed"]
    samples = _ds(loaders["r1/mixed"]).samples
    assert {Path(path).parts[-4] for path, _ in samples} == set(CORRUPTIONS)  # <corruption>/5/<wnid>/<file>
    assert len(samples) == 2 * 4  # two corruptions of four images
    assert mixed.stream_fingerprint()["mixed_domains"] is True


def test_gradual_severity_reads_the_domain_from_severity_1_to_5_and_back(tmp_path: Path) -> None:
    from datamodules._common import GRADUAL_SCHEDULE

    for corruption in CORRUPTIONS:
        for severity in range(1, 6):
            _write_class_tree(tmp_path / "c" / corruption / str(severity), 32)
    gradual = ImageNetCDataModule(root=str(tmp_path / "c"), corruptions=CORRUPTIONS, image_size=32, batch_size=3,
                                  gradual=True)  # fmt: skip
    gradual.setup("test")
    plain = ImageNetCDataModule(root=str(tmp_path / "c"), corruptions=CORRUPTIONS, image_size=32, batch_size=3)
    plain.setup("test")
    for loader, plain_loader in zip(gradual.test_dataloader().values(), plain.test_dataloader().values(), strict=True):
        parts = loader.dataset.datasets
        assert len(parts) == len(GRADUAL_SCHEDULE)
        np.testing.assert_array_equal(np.concatenate([p.order for p in parts]), _ds(plain_loader).order)
        for severity, part in zip(GRADUAL_SCHEDULE, parts, strict=True):
            assert {Path(path).parts[-3] for path, _ in part.samples} == {str(severity)}
    assert gradual.stream_fingerprint()["gradual"] is True
    (tmp_path / "c" / CORRUPTIONS[0] / "3" / WNIDS[0] / f"{PHOTOS[WNIDS[0]][0]}.JPEG").unlink()
    broken = ImageNetCDataModule(root=str(tmp_path / "c"), corruptions=CORRUPTIONS, image_size=32, batch_size=3,
                                 gradual=True)  # fmt: skip
    with pytest.raises(ValueError, match="same image files at every severity"):
        broken.test_dataloader()
