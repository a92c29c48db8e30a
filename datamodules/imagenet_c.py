"""The ImageNet-C test stream read from its standard on-disk layout, plus clean ImageNet source and calibration data.

Layouts (spec §6.1)::

    <root>/<corruption>/<severity>/<wnid>/<image>.JPEG     ImageNet-C test stream
    <source_root>/<wnid>/<image>.JPEG                      clean ImageNet val: source statistics
    <calib_root>/<wnid>/<image>.JPEG                       clean ImageNet train: quantization calibration

Label spaces (``label_space``): described in :mod:`datamodules.imagenet_layout`.

Transforms (spec §6.2; sizes shown for ``image_size=224`` and scaled with it otherwise):

* ImageNet-C: CenterCrop 224, ToTensor, normalization (an image smaller than the crop is zero-padded; the data
  module warns once with the number of such files).
* Clean val: Resize 256 (bilinear, shorter side), CenterCrop 224, ToTensor, normalization.
* Calibration: ``norm="vit"``: Resize 248 (bicubic), CenterCrop 224, 0.5/0.5 (timm's eval transform for ViT-B/16);
  ``norm="imagenet"``: Resize 256 (bilinear), CenterCrop 224, ImageNet statistics.

``norm="imagenet"`` corresponds to giving both ``--use_in1k_norm`` and ``--use_in1k_norm_c`` in the reference code.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from datamodules._common import GRADUAL_LEVELS, FileDataset, calibration_order, source_order
from datamodules.base import StreamDataModuleBase, stream_settings
from datamodules.imagenet_layout import (
    C_LAYOUT,
    CLEAN_LAYOUT,
    IMAGENET_NUM_CLASSES,
    LABEL_SPACES,
    existing_folder,
    imagenet_class_index,
    imagenet_wnids,
    not_imagenet_message,
)
from zoa_lightning.data import class_folders, index_image_folder

log = logging.getLogger(__name__)

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""``norm`` choices: ``(mean, std)``."""

VAL_CROP_PCT = 0.875  # Resize 256 → CenterCrop 224
VIT_CALIB_CROP_PCT = 0.9  # timm's ViT-B/16 eval transform: Resize 248 → CenterCrop 224

_Samples = list[tuple[str, int]]


class ImageNetCDataModule(StreamDataModuleBase):
    """ImageNet-C corruption stream from disk, with clean ImageNet images for source statistics and calibration.

    The test stream visits ``rounds × corruptions`` domains, round-major (``r1/gaussian_noise``, ...,
    ``r1/jpeg_compression``, ``r2/gaussian_noise``, ...). Within a domain the images come in a seeded order that differs
    per round and corruption (the loaders themselves do not shuffle). Every corruption folder must hold the same wnid
    set. Labels depend on ``label_space``: canonical ImageNet-1k class indices (the clean folders may then hold any
    ImageNet-1k wnids), or positions in the sorted wnid folder list (the clean folders must then hold the same wnid set
    as the corruption folders). Batches are ``(images, labels)``: ``float32`` ``N×3×H×W`` and ``int64``. The settings
    every stream shares (``corruptions``, ``rounds``, ``batch_size``, ``seed``, ``start_domain``, ``stop_domain``,
    ``mixed_domains``) are documented on :class:`datamodules.base.StreamDataModuleBase`.

    Args:
        root: ImageNet-C folder, ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``. Must exist when the data module is
            built.
        source_root: clean ImageNet validation folder ``<val>/<wnid>/*``, for source statistics
            (``source_dataloader``). ``None`` if not needed.
        calib_root: clean ImageNet training folder ``<train>/<wnid>/*``, for quantization calibration
            (``calibration_images``). ``None`` falls back to ``source_root`` with a warning.
        severity: severity folder to read, 1 to 5.
        num_workers: ``DataLoader`` worker processes (the paper uses 32).
        norm: ``"vit"`` for mean = std = 0.5, or ``"imagenet"`` for the ImageNet statistics
            (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), used with ResNet-50.
        image_size: crop size in pixels; 224 for ImageNet-C. The resize sizes scale with it (256 and 248 at 224),
            so tests can use tiny images.
        num_source_images: how many clean validation images (a seeded random subset) feed the source statistics;
            ``None`` for all of them.
        label_space: ``"imagenet"``: labels are the canonical ImageNet-1k class indices of the wnid folders (every
            folder must be an ImageNet-1k synset) and ``num_classes`` is 1000; ``"folders"``: labels are positions in
            the sorted wnid folder list and ``num_classes`` is its length; ``"auto"``: ``"imagenet"`` if every wnid
            folder of the stream is an ImageNet-1k synset, else ``"folders"``.
        gradual: gradual severity: every domain's images, in the domain's order, are cut into nine parts read from
            the severity folders 1, 2, 3, 4, 5, 4, 3, 2, 1 (each must hold the same files as ``severity``'s).
        label_dirichlet: a label-shifted stream: within every domain the classes come in runs, drawn with this
            Dirichlet concentration (:func:`datamodules._common.dirichlet_order`, one time slot per class present;
            0.1 is the literature's usual non-i.i.d. setting). ``None``: the shuffled order.

    Raises:
        ValueError: for an unknown corruption, ``norm`` or ``label_space``, a severity outside 1..5, a non-positive
            count or size, or a negative seed.
        FileNotFoundError: if ``root`` (or a ``source_root``/``calib_root`` that is given) is missing or not a folder;
            the message names the path and the expected layout. The rest of the layout is checked in
            ``prepare_data``/``setup``, whose errors name the offending path.
    """

    def __init__(
        self,
        root: str,
        source_root: str | None = None,
        calib_root: str | None = None,
        corruptions: list[str] | None = None,
        severity: int = 5,
        rounds: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 2020,
        norm: str = "vit",
        image_size: int = 224,
        num_source_images: int | None = None,
        start_domain: int = 0,
        stop_domain: int | None = None,
        label_space: str = "auto",
        mixed_domains: bool = False,
        label_dirichlet: float | None = None,
        gradual: bool = False,
    ) -> None:
        if norm not in NORMALIZATIONS:
            raise ValueError(f"norm must be one of {sorted(NORMALIZATIONS)}, got {norm!r}")
        if label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {list(LABEL_SPACES)}, got {label_space!r}")
        root_folder = existing_folder(root, "ImageNet-C root", "root", C_LAYOUT)
        source_folder = (
            existing_folder(source_root, "source_root", "source_root", CLEAN_LAYOUT, "val") if source_root else None
        )
        calib_folder = (
            existing_folder(calib_root, "calib_root", "calib_root", CLEAN_LAYOUT, "train") if calib_root else None
        )
        super().__init__(**stream_settings(locals()))
        self.root, self.source_root, self.calib_root = root_folder, source_folder, calib_folder
        self.norm = norm
        self.label_space = label_space
        self._wnids: tuple[str, ...] | None = None
        self._effective_label_space: str | None = None
        self._test_samples: dict[tuple[str, int], _Samples] = {}
        self._clean_samples: dict[Path, _Samples] = {}
        self._test_datasets: list[FileDataset] = []
        self._padding_warned = False
        self._files_hash: str | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def num_classes(self) -> int:
        """Classifier size: 1000 in the ``"imagenet"`` label space, else the number of wnid folders.

        Read from disk on first use (before ``setup`` if needed) unless ``label_space="imagenet"``.
        """
        if self.label_space == "imagenet":
            return IMAGENET_NUM_CLASSES
        return len(self.class_wnids)

    @property
    def wnids(self) -> tuple[str, ...]:
        """Sorted wnid folder names of the first corruption: the stream's classes."""
        if self._wnids is None:
            first = self._severity_dir(self.corruptions[0])
            self._wnids = tuple(class_folders(first, "ImageNet-C severity folder", C_LAYOUT))
        return self._wnids

    @property
    def effective_label_space(self) -> str:
        """``"imagenet"`` or ``"folders"``: ``label_space`` with ``"auto"`` resolved from the stream's wnid folders.

        Raises:
            ValueError: if ``label_space="imagenet"`` and a wnid folder is not an ImageNet-1k synset (the message
                names the folder).
        """
        if self._effective_label_space is None:
            index = imagenet_class_index() if self.label_space != "folders" else {}
            foreign = [wnid for wnid in self.wnids if wnid not in index]
            if self.label_space == "imagenet" and foreign:
                folder = self._severity_dir(self.corruptions[0]) / foreign[0]
                raise ValueError(not_imagenet_message(folder, len(foreign)))
            if self.label_space == "auto":
                resolved = "folders" if foreign else "imagenet"
                log.info("label_space='auto' resolved to %r for the wnid folders of %s", resolved, self.root)
            else:
                resolved = self.label_space
            self._effective_label_space = resolved
        return self._effective_label_space

    @property
    def class_wnids(self) -> tuple[str, ...]:
        """The wnid of every label: label ``i`` is ``class_wnids[i]``; ``len(class_wnids) == num_classes``.

        The 1,000 ImageNet-1k synsets in the ``"imagenet"`` label space, :attr:`wnids` in the ``"folders"`` one.
        """
        if self.effective_label_space == "imagenet":
            return imagenet_wnids()
        return self.wnids

    def prepare_data(self) -> None:
        """Check the folder structure (root, corruption and severity folders, wnid sets) without listing images.

        Raises:
            FileNotFoundError: for a missing root, corruption, severity or class folder.
            ValueError: if a corruption folder's wnid set differs from the first corruption's, or a wnid folder does
                not fit the label space (see :meth:`setup`).
        """
        self._check_root()
        for corruption in self.corruptions:
            for severity in GRADUAL_LEVELS if self.gradual else (self.severity,):
                self._check_wnids(self._severity_dir(corruption, severity), "ImageNet-C severity folder", C_LAYOUT)
        for folder, what in ((self.source_root, "source_root"), (self.calib_root, "calib_root")):
            if folder is not None:
                self._check_wnids(folder, f"{what} folder", CLEAN_LAYOUT, clean=True)

    def setup(self, stage: str | None = None) -> None:
        """Index the image files of every corruption (and of the clean folders that are set).

        Args:
            stage: the Lightning stage, or ``None`` for all.

        Raises:
            FileNotFoundError: for a missing root, corruption, severity or class folder, or a class folder without
                images; the message names the path and the expected layout.
            ValueError: if a corruption folder's wnid set differs from the first corruption's; in the ``"imagenet"``
                label space, if a wnid folder (also of ``source_root``/``calib_root``) is not an ImageNet-1k synset;
                in the ``"folders"`` label space, if a clean folder's wnid set differs from the stream's.
        """
        self.prepare_data()
        if stage in (None, "test", "predict"):
            for corruption in self.corruptions:
                self._corruption_samples(corruption)
        for folder in (self.source_root, self.calib_root):
            if folder is not None:
                self._folder_samples(folder, "clean folder", CLEAN_LAYOUT)

    def teardown(self, stage: str) -> None:
        """Warn (once per data module) if test images smaller than the crop were read: they were zero-padded.

        The ImageNet-C transform centre-crops without resizing (spec §6.2), and a crop larger than the image pads it
        with black. Every test image read is checked; under DDP each process counts the images it read.

        Args:
            stage: the Lightning stage.
        """
        datasets, self._test_datasets = self._test_datasets, []
        undersized = sorted({path for dataset in datasets for path in dataset.undersized_paths()})
        if not undersized or self._padding_warned:
            return
        self._padding_warned = True
        with Image.open(undersized[0]) as image:
            width, height = image.size
        share = " (the images this process read)" if self.trainer is not None and self.trainer.world_size > 1 else ""
        rank_zero_warn(
            f"{len(undersized)} test image file(s) under {self.root}{share} are smaller than the "
            f"{self.image_size}-pixel centre crop and were zero-padded to it (e.g. {undersized[0]}, {width}×{height}): "
            "the model saw black borders and the accuracy is not comparable. Use images of at least "
            f"{self.image_size} pixels per side (ImageNet-C's are 224×224) or set image_size to their size"
        )

    def source_dataloader(self) -> DataLoader:
        """Clean validation images for source statistics, in a seeded order, ``shuffle=False``.

        Raises:
            ValueError: if ``source_root`` is not set or ``num_source_images`` exceeds the images found.
        """
        if self.source_root is None:
            raise ValueError("source_dataloader needs clean ImageNet validation images: set source_root=<ImageNet val>")
        samples = self._folder_samples(self.source_root, "source_root folder", CLEAN_LAYOUT)
        order = source_order(self.seed, len(samples), self.num_source_images, f"in source_root {self.source_root}")
        transform = self._transform(resize=(VAL_CROP_PCT, T.InterpolationMode.BILINEAR))
        return self._loader(FileDataset(samples, order, transform))

    def calibration_images(self, n: int = 32) -> Tensor:
        """Return ``n`` clean images for quantization calibration (spec §7).

        The images are the first ``n`` of ``numpy.random.RandomState(3).permutation`` over the ``ImageFolder``
        ordering of ``calib_root`` (or of ``source_root`` when ``calib_root`` is unset), with the calibration
        transform of the chosen ``norm``.

        Args:
            n: number of images.

        Returns:
            A normalized ``float32`` tensor of shape ``(n, 3, image_size, image_size)``.

        Raises:
            ValueError: if neither ``calib_root`` nor ``source_root`` is set, or ``n`` exceeds the images found.
        """
        folder = self.calib_root
        if folder is None:
            if self.source_root is None:
                raise ValueError("calibration_images needs clean images: set calib_root=<ImageNet train>")
            log.warning("calib_root is not set; calibrating on images from source_root %s", self.source_root)
            folder = self.source_root
        samples = self._folder_samples(folder, "calibration folder", CLEAN_LAYOUT)
        order = calibration_order(len(samples), n)
        if self.norm == "vit":
            transform = self._transform(resize=(VIT_CALIB_CROP_PCT, T.InterpolationMode.BICUBIC))
        else:
            transform = self._transform(resize=(VAL_CROP_PCT, T.InterpolationMode.BILINEAR))
        return self._stack_images(FileDataset(samples, order, transform))

    # ------------------------------------------------------------------ the stream's images

    def _domain_labels(self, names: Sequence[str]) -> np.ndarray:
        return np.array([label for c in names for _, label in self._corruption_samples(c)])

    def _domain_part(
        self, names: Sequence[str], draw: int, severity: int | None, labels: np.ndarray, order: np.ndarray
    ) -> FileDataset:
        """Read ``order`` of the domain's files, from the ``severity`` folders (gradual) or the stream's ones."""
        samples = [sample for c in names for sample in self._corruption_samples(c, severity)]
        dataset = FileDataset(samples, order, self._transform(resize=None), min_size=self.image_size)
        self._test_datasets.append(dataset)  # checked for undersized images in teardown
        return dataset

    def _test_images_fingerprint(self) -> dict[str, Any]:
        """``test_images``: a hash of the image files' paths relative to ``root`` and their labels.

        Not of their bytes, which would mean reading the whole data set, so a moved ``root`` still matches. The clean
        folders do not change the stream and are left out.
        """
        if self._files_hash is None:
            digest = hashlib.sha256()
            count = 0
            for corruption in self.corruptions:
                for path, label in self._corruption_samples(corruption):
                    digest.update(f"{Path(path).relative_to(self.root).as_posix()}\t{label}\n".encode())
                    count += 1
            self._files_hash = f"{count} files, sha256 {digest.hexdigest()[:16]}"
        return {"test_images": self._files_hash}

    def _input_fingerprint(self) -> dict[str, Any]:
        """``norm`` and ``label_space`` (the effective one)."""
        return {"norm": self.norm, "label_space": self.effective_label_space}

    # ------------------------------------------------------------------ layout

    def _transform(self, resize: tuple[float, T.InterpolationMode] | None) -> T.Compose:
        mean, std = NORMALIZATIONS[self.norm]
        steps: list[object] = []
        if resize is not None:
            crop_pct, interpolation = resize
            steps.append(T.Resize(math.floor(self.image_size / crop_pct), interpolation=interpolation))
        steps += [T.CenterCrop(self.image_size), T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(steps)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"ImageNet-C root folder not found: {self.root}. Expected layout: {C_LAYOUT}; set root= to it"
            )

    def _severity_dir(self, corruption: str, severity: int | None = None) -> Path:
        self._check_root()
        corruption_dir = self.root / corruption
        if not corruption_dir.is_dir():
            raise FileNotFoundError(
                f"ImageNet-C corruption folder not found: {corruption_dir}. Expected layout: {C_LAYOUT}; "
                "remove the corruption from `corruptions` or complete the download"
            )
        severity_dir = corruption_dir / str(self.severity if severity is None else severity)
        if not severity_dir.is_dir():
            raise FileNotFoundError(
                f"ImageNet-C severity folder not found: {severity_dir}. Expected layout: {C_LAYOUT}; "
                "check `severity` or complete the download"
            )
        return severity_dir

    def _check_wnids(self, folder: Path, what: str, layout: str, *, clean: bool = False) -> list[str]:
        """Return the sorted wnid folders of ``folder`` after checking that they fit the stream and label space.

        Corruption folders (``clean=False``) must hold the stream's wnid set. Clean folders must too in the
        ``"folders"`` label space; in the ``"imagenet"`` one they may hold any ImageNet-1k synsets.
        """
        found = class_folders(folder, what, layout)
        imagenet = self.effective_label_space == "imagenet"
        if clean and imagenet:
            index = imagenet_class_index()
            foreign = [wnid for wnid in found if wnid not in index]
            if foreign:
                raise ValueError(not_imagenet_message(folder / foreign[0], len(foreign)))
            return found
        if tuple(found) != self.wnids:
            reference = self._severity_dir(self.corruptions[0])
            missing = sorted(set(self.wnids) - set(found))
            extra = sorted(set(found) - set(self.wnids))
            reason = (
                "Every ImageNet-C corruption folder must hold the same wnid folders"
                if imagenet
                else "Labels are positions in the sorted wnid list (label_space='folders'), so every folder must hold "
                "the same wnid folders"
            )
            raise ValueError(
                f"{what} {folder} has a different wnid set than {reference}: "
                f"{len(missing)} missing (first: {missing[:5]}), {len(extra)} extra (first: {extra[:5]}). {reason}"
            )
        return found

    def _labelled_samples(self, folder: Path, wnids: Sequence[str], what: str, layout: str) -> _Samples:
        """Index ``folder/<wnid>/`` in ``ImageFolder`` order and label each file in the effective label space.

        ``wnids`` comes from :meth:`_check_wnids`: in the ``"folders"`` label space it equals :attr:`wnids`, so the
        positions that ``index_image_folder`` assigns are the labels; in the ``"imagenet"`` one they are mapped to the
        canonical class indices.
        """
        samples = index_image_folder(folder, wnids, what, layout)
        if self.effective_label_space == "folders":
            return samples
        index = imagenet_class_index()
        labels = [index[wnid] for wnid in wnids]
        return [(path, labels[position]) for path, position in samples]

    def _corruption_samples(self, corruption: str, severity: int | None = None) -> _Samples:
        key = (corruption, self.severity if severity is None else severity)
        if key not in self._test_samples:
            folder = self._severity_dir(*key)
            wnids = self._check_wnids(folder, "ImageNet-C severity folder", C_LAYOUT)
            samples = self._labelled_samples(folder, wnids, "ImageNet-C", C_LAYOUT)
            log.debug("ImageNet-C %s severity %d: %d images", corruption, key[1], len(samples))
            if severity is not None and severity != self.severity:  # gradual: the same images at another severity
                base = self._corruption_samples(corruption)
                if [Path(p).relative_to(folder).as_posix() for p, _ in samples] != [
                    Path(p).relative_to(self._severity_dir(corruption)).as_posix() for p, _ in base
                ]:
                    raise ValueError(
                        f"gradual needs the same image files at every severity, but {folder} differs from "
                        f"{self._severity_dir(corruption)}; complete the download or set gradual: false"
                    )
            self._test_samples[key] = samples
        return self._test_samples[key]

    def _folder_samples(self, folder: Path, what: str, layout: str) -> _Samples:
        if folder not in self._clean_samples:
            wnids = self._check_wnids(folder, what, layout, clean=True)
            self._clean_samples[folder] = self._labelled_samples(folder, wnids, what, layout)
        return self._clean_samples[folder]
