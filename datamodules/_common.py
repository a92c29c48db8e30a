"""Helpers shared by the stream and ImageNet-C data modules: argument checks, stream order, datasets, sharding.

Multi-process runs (DDP): a stream loader built by :func:`make_loader` with ``trainer=...`` shards itself. The
global batch ``batch_size`` keeps its single-process meaning, so the stream is cut into exactly the same global
batches as on one process, and every process reads its own contiguous slice of every global batch
(:class:`GlobalBatchShardSampler`). Lightning's ``DistributedSampler`` must stay off
(``Trainer(use_distributed_sampler=False)``): it would pad the stream with repeated images and cut it differently.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from zoa_lightning.data.images import read_rgb

if TYPE_CHECKING:
    import lightning.pytorch as pl

CALIBRATION_SEED = 3
"""NumPy ``RandomState`` seed that picks the quantization-calibration images (spec §6.3 and §7)."""

MIN_SHARD_SIZE = 1
"""Fewest images a process may get from a global batch under DDP. ZOA's statistics are sums over all processes (its
BatchNorms' included), so one image per process is enough; a process with none would have nothing to predict."""

GRADUAL_LEVELS = (1, 2, 3, 4, 5)
"""The severities a ``gradual`` stream reads."""

GRADUAL_SCHEDULE = (1, 2, 3, 4, 5, 4, 3, 2, 1)
"""The severity of each of the nine consecutive parts of a domain in a ``gradual`` stream."""

MIXED = "mixed"
"""The corruption part of a mixed domain's name (``r1/mixed``): every corruption of the round shuffled together."""

_SOURCE_STREAM_TAG = 0x50C  # separates the source-statistics order from the test-stream orders

Batch = tuple[Tensor, Tensor]


def check_positive(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer not smaller than ``minimum``, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_optional_count(name: str, value: int | None) -> int | None:
    """Return ``value`` if it is ``None`` or a positive integer, else raise ``ValueError`` naming it."""
    return None if value is None else check_positive(name, value)


def domain_names(corruptions: Sequence[str], rounds: int) -> tuple[str, ...]:
    """Return the stream's domain names, round-major: ``("r1/gaussian_noise", ..., "r2/gaussian_noise", ...)``."""
    return tuple(f"r{r}/{name}" for r in range(1, rounds + 1) for name in corruptions)


def split_domain(domain: str) -> tuple[int, str]:
    """Split ``"r2/fog"`` into ``(2, "fog")``."""
    head, corruption = domain.split("/", 1)
    return int(head[1:]), corruption


def stream_order(seed: int, round_index: int, corruption: str, size: int) -> np.ndarray:
    """Return the pre-shuffled sample order of one domain: a permutation of ``range(size)``.

    The permutation is a pure function of ``(seed, round_index, corruption)``, different for every round and
    corruption.
    """
    rng = np.random.default_rng([int(seed), int(round_index), zlib.crc32(corruption.encode())])
    return rng.permutation(size)


def check_flag(name: str, value: bool) -> bool:
    """Return ``value`` if it is a bool, else raise ``ValueError`` naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_concentration(value: float | None) -> float | None:
    """Return a Dirichlet concentration ``value`` (``None`` or a finite number > 0), else raise naming the option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"label_dirichlet must be a positive number (the Dirichlet concentration, e.g. 0.1) or None for the "
            f"shuffled order, got {value!r}"
        )
    return float(value)


def dirichlet_order(
    labels: np.ndarray, concentration: float, seed: int, round_index: int, corruption: str, slots: int | None = None
) -> np.ndarray:
    """Return a label-shifted order of one domain: a permutation of ``range(len(labels))`` whose classes come in runs.

    The non-i.i.d. test stream of the test-time adaptation literature (NOTE, Gong et al., NeurIPS 2022; RoTTA, Yuan
    et al., CVPR 2023): the domain is read as ``slots`` consecutive time slots (default: one per class); each class
    spreads its images (in a seeded random order) over the slots with proportions drawn from a symmetric
    ``Dirichlet(concentration)``, and each slot is shuffled. A small concentration (0.01) puts nearly every class in
    one slot, so the batches hold long runs of one or two classes; a large one (100) approaches the shuffled order.
    A pure function of its arguments, like :func:`stream_order`.

    Args:
        labels: the domain's class labels, ``(N,)`` integers.
        concentration: the Dirichlet concentration ``γ`` (> 0).
        seed: the data module's seed.
        round_index: the round (1-based).
        corruption: the corruption name.
        slots: the number of time slots; default the number of distinct labels.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), int(round_index), zlib.crc32(corruption.encode()), 0xD1])
    classes = np.unique(labels)
    slots = len(classes) if slots is None else slots
    proportions = rng.dirichlet(np.full(slots, float(concentration)), size=len(classes))
    per_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for label, share in zip(classes, proportions, strict=True):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
        for slot, part in enumerate(np.split(members, cuts)):
            per_slot[slot].append(part)
    return np.concatenate([rng.permutation(np.concatenate(parts)) for parts in per_slot]).astype(np.int64)


def source_order(seed: int, size: int, limit: int | None, where: str = "") -> np.ndarray:
    """Return the shuffled order of the clean source images, truncated to ``limit`` images.

    Args:
        seed: the data module's seed.
        size: number of clean source images available.
        limit: the data module's ``num_source_images`` (``None``: all of them).
        where: where the images come from, for the error message (e.g. ``"the training part of dataset 'x'"``).

    Raises:
        ValueError: if ``limit`` exceeds ``size``; the message names the option and how to set it.
    """
    check_source_count(limit, size, where)
    order = np.random.default_rng([int(seed), _SOURCE_STREAM_TAG]).permutation(size)
    return order if limit is None else order[:limit]


def check_source_count(limit: int | None, size: int, where: str = "") -> None:
    """Raise if ``num_source_images=limit`` asks for more than the ``size`` clean source images available.

    Args:
        limit: the data module's ``num_source_images`` (``None``: all of them).
        size: number of clean source images available.
        where: where the images come from, for the error message (e.g. ``"the training part of dataset 'x'"``).

    Raises:
        ValueError: naming the option as a user sets it and the number of images available.
    """
    if limit is not None and limit > size:
        source = f" ({where})" if where else ""
        raise ValueError(
            f"num_source_images={limit}, but only {size} clean source images are available{source}. Set "
            f"`--data.init_args.num_source_images {size}` (or `null` to use all of them), or the same "
            "`num_source_images:` under `data: init_args:` in the config"
        )


def calibration_order(size: int, n: int) -> np.ndarray:
    """Return the first ``n`` indices of ``numpy.random.RandomState(3).permutation(size)``.

    Raises:
        ValueError: if ``n`` is not in ``1..size``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= size:
        raise ValueError(
            f"quantization calibration asked for {n!r} clean images and {size} are available: set `calib_images` of "
            f"callbacks.QuantizationCallback (the config's trainer.callbacks) to an integer in 1..{size}, or give the "
            "data set more clean images"
        )
    return np.random.RandomState(CALIBRATION_SEED).permutation(size)[:n]


def check_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Validate per-channel ``mean``/``std`` and return them as ``3×1×1`` float tensors.

    Raises:
        ValueError: if either does not hold 3 numbers or a ``std`` entry is not positive.
    """
    mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
    std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
    if mean_t.numel() != 3 or std_t.numel() != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got mean={mean!r} std={std!r}")
    if (std_t <= 0).any():
        raise ValueError(f"std values must be positive, got {std!r}")
    return mean_t.view(3, 1, 1), std_t.view(3, 1, 1)


class GlobalBatchShardSampler(Sampler[list[int]]):
    """Batch sampler yielding one process's slice of every global batch of a dataset read in order.

    The dataset is cut into global batches of ``batch_size`` consecutive indices (the last one may be smaller),
    exactly as a single-process ``DataLoader(shuffle=False, drop_last=False)`` cuts it. Global batch ``g`` with ``b``
    images ``g·B … g·B+b-1`` is split into ``num_shards`` contiguous slices whose sizes differ by at most one:
    shard ``r`` gets ``g·B + ⌊b·r/N⌋ … g·B + ⌊b·(r+1)/N⌋ - 1``. So the slices of all processes concatenated in rank
    order are the global batch (nothing duplicated, nothing dropped), and every process gets the same number of
    batches, ``⌈len/B⌉``: a collective per batch never waits for a process that has run out of data.

    Args:
        size: number of items in the dataset.
        batch_size: the global batch size ``B`` (all processes together).
        num_shards: number of processes ``N``.
        rank: this process's global rank, ``0 <= rank < num_shards``.
        min_shard_size: fewest images any process may get from any global batch.

    Raises:
        ValueError: if a global batch, the last one included, would give a process fewer than ``min_shard_size``
            images (the message says which ``batch_size`` values work).

    Example:
        >>> list(GlobalBatchShardSampler(10, batch_size=6, num_shards=2, rank=1))
        [[3, 4, 5], [8, 9]]
    """

    def __init__(
        self, size: int, batch_size: int, num_shards: int, rank: int, min_shard_size: int = MIN_SHARD_SIZE
    ) -> None:
        self.size = check_positive("size", size, minimum=0)
        self.batch_size = check_positive("batch_size", batch_size)
        self.num_shards = check_positive("num_shards", num_shards)
        self.min_shard_size = check_positive("min_shard_size", min_shard_size)
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 0 <= rank < num_shards:
            raise ValueError(f"rank must be an integer in 0..{num_shards - 1}, got {rank!r}")
        self.rank = int(rank)
        check_global_batch(self.batch_size, self.num_shards, self.min_shard_size)
        tail = self.size % self.batch_size
        if 0 < tail < self.num_shards * self.min_shard_size:
            raise ValueError(
                f"the last global batch of a {self.size}-image loader holds {tail} image(s) (batch_size="
                f"{self.batch_size}), too few to give each of {self.num_shards} processes at least "
                f"{self.min_shard_size}: choose a batch_size for which {self.size} % batch_size is 0 or at least "
                f"{self.num_shards * self.min_shard_size}, or run on fewer devices"
            )

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.size, self.batch_size):
            images = min(self.batch_size, self.size - start)
            lo = start + images * self.rank // self.num_shards
            hi = start + images * (self.rank + 1) // self.num_shards
            yield list(range(lo, hi))


def check_global_batch(batch_size: int, num_shards: int, min_shard_size: int = MIN_SHARD_SIZE) -> None:
    """Check that a full global batch gives each of ``num_shards`` processes at least ``min_shard_size`` images.

    Raises:
        ValueError: if ``batch_size < num_shards * min_shard_size``; the message explains the global batch.
    """
    if batch_size < num_shards * min_shard_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch, split over {num_shards} processes, and each process needs "
            f"at least {min_shard_size} images of it: use batch_size >= {num_shards * min_shard_size} or fewer devices"
        )


def stream_shards(trainer: pl.Trainer | None) -> tuple[int, int]:
    """Return ``(num_shards, rank)`` for a stream loader: ``(1, 0)`` without a trainer or on one process.

    Raises:
        ValueError: on several processes, if the trainer would replace the loader's sampler with Lightning's
            ``DistributedSampler`` (``use_distributed_sampler=True``, the default); the message says what to set.
    """
    if trainer is None or trainer.world_size <= 1:
        return 1, 0
    # Lightning keeps the flag only on its (private) accelerator connector; absent means it cannot inject anything.
    if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
        raise ValueError(
            f"this data module shards every global batch over the {trainer.world_size} processes itself; Lightning's "
            "DistributedSampler would instead pad the stream with repeated images (biasing accuracy) and change the "
            "batches. Set `trainer.use_distributed_sampler: false` in the config "
            "(`--trainer.use_distributed_sampler false`, or `Trainer(use_distributed_sampler=False)`)"
        )
    return trainer.world_size, trainer.global_rank


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, trainer: pl.Trainer | None = None) -> DataLoader:
    """Build a sequential ``DataLoader`` (``shuffle=False``, ``drop_last=False``): the stream is read in order.

    Args:
        dataset: the map-style dataset, already in stream order.
        batch_size: the global batch size (all processes together).
        num_workers: ``DataLoader`` worker processes.
        trainer: the data module's trainer (``self.trainer``, may be ``None``). On several processes the loader
            yields this process's slice of every global batch (:class:`GlobalBatchShardSampler`).

    Raises:
        ValueError: on several processes, for a global batch too small to split or a trainer that would inject
            Lightning's ``DistributedSampler`` (see :func:`stream_shards`).
    """
    num_shards, rank = stream_shards(trainer)
    if num_shards > 1:
        sampler = GlobalBatchShardSampler(len(dataset), batch_size, num_shards, rank)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
    )


class ArrayDataset(Dataset):
    """``uint8`` ``N×H×W×3`` images and labels, read in a fixed order and normalized to float tensors.

    Args:
        images: ``uint8`` array ``(N, H, W, 3)`` (may be a read-only memory map).
        labels: ``int64`` array ``(N,)``.
        order: indices into ``images``; item ``i`` is image ``order[i]``. ``None`` for the natural order.
        mean: ``3×1×1`` normalization mean.
        std: ``3×1×1`` normalization standard deviation.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        order: np.ndarray | None,
        mean: Tensor,
        std: Tensor,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.order = np.arange(len(images)) if order is None else np.asarray(order)
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Batch:
        source = int(self.order[index])
        image = torch.from_numpy(np.array(self.images[source], dtype=np.uint8)).permute(2, 0, 1)
        tensor = (image.float().div_(255.0) - self.mean) / self.std
        return tensor, torch.tensor(int(self.labels[source]), dtype=torch.int64)


class FileDataset(Dataset):
    """Image files with labels, read in a fixed order through a transform.

    Args:
        samples: ``(path, label)`` pairs.
        order: indices into ``samples``; item ``i`` is sample ``order[i]``. ``None`` for the natural order.
        transform: maps a PIL RGB image to a ``3×H×W`` float tensor.
        min_size: if set, remember every item whose image is narrower or lower than this many pixels (a centre crop
            of that size zero-pads it); :meth:`undersized_paths` lists them. The marks live in shared memory, so
            items read by ``DataLoader`` worker processes count too.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        order: np.ndarray | None,
        transform: Callable[[Image.Image], Tensor],
        min_size: int | None = None,
    ) -> None:
        self.samples = samples
        self.order = np.arange(len(samples)) if order is None else np.asarray(order)
        self.transform = transform
        self.min_size = min_size
        self._undersized = torch.zeros(len(self.order) if min_size else 0, dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Batch:
        path, label = self.samples[int(self.order[index])]
        image = read_rgb(path)
        if self.min_size is not None and min(image.size) < self.min_size:
            self._undersized[index] = 1
        return self.transform(image), torch.tensor(label, dtype=torch.int64)

    def undersized_paths(self) -> list[str]:
        """Files read so far that were smaller than ``min_size`` on a side (empty if ``min_size`` is unset)."""
        positions = torch.nonzero(self._undersized).flatten().tolist()
        return [self.samples[int(self.order[i])][0] for i in positions]
