"""The on-disk cache of corrupted test images: one ``.npy`` array per (corruption, severity, noise seed).

:class:`CorruptionCache` is a plain class (no data module, no trainer): give it a folder and the clean test images,
ask it for arrays, and it reads the verified files or builds the missing ones (a process pool for larger sets) and
reports the build. :class:`datamodules.CorruptionStreamDataModule` keeps one per clean data set.

Cache layout::

    <cache_dir>/<dataset tag>/<corruption>-s<severity>-px<image_size>-seed<seed>-<fingerprint>-v<version>.npy
    <cache_dir>/<dataset tag>/<same name>.sha256

``<fingerprint>`` hashes the clean test images, so a changed data set never reuses stale files; the ``.sha256``
sidecar holds the checksum of the array. Files are written to a temporary name and renamed
(:func:`zoa_lightning.files.atomic_write`, atomic on POSIX and Windows); a file that cannot be read, has the wrong
shape or dtype, or fails its checksum is rebuilt with a warning. The build is deterministic, so concurrent builders
write identical files.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.corruptions import corrupt_images
from zoa_lightning.files import atomic_write, sha256_of

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "ZOA_CACHE_DIR"
"""Environment variable naming the zoa-lightning cache root; streams are cached in ``$ZOA_CACHE_DIR/streams``."""

CacheKey = tuple[str, int, int]
"""``(corruption, severity, noise seed)``: what one cached array holds."""

_POOL_MIN_IMAGES = 256  # fewer test images than this are corrupted in-process, not in a process pool
_CACHE_VERSION = 1  # bump when the corruption policy changes, so old cache files are not reused


def default_cache_dir() -> Path:
    """Return the stream cache folder: ``$ZOA_CACHE_DIR/streams`` or ``~/.cache/zoa_lightning/streams``."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "zoa_lightning"
    return base / "streams"


class CorruptionCache:
    """Corrupted copies of one set of clean test images, read from (or built into) one folder.

    Arrays are ``uint8`` ``(N, H, W, 3)`` like the clean images, read as read-only memory maps and kept once read.

    Args:
        folder: the folder of this data set's files (``<cache_dir>/<dataset tag>``); created when something is built.
        images: the clean test images, ``uint8`` ``(N, H, W, 3)``.
        image_size: the images' side length in pixels (part of the file names).

    Example::

        cache = CorruptionCache(Path("/tmp/streams/mnist"), test_images, image_size=32)
        fog = cache.array("fog", 5, 2020)  # read, or built once and saved
    """

    def __init__(self, folder: Path, images: np.ndarray, image_size: int) -> None:
        self.folder = Path(folder)
        self.images = images
        self.image_size = image_size
        self._fingerprint = sha256_of(np.ascontiguousarray(images).data)[:12]
        self._arrays: dict[CacheKey, np.ndarray] = {}

    def path(self, corruption: str, severity: int, seed: int) -> Path:
        """The ``.npy`` file of one array (its checksum sidecar is the same name with ``.sha256``)."""
        tail = f"px{self.image_size}-seed{seed}-{self._fingerprint}-v{_CACHE_VERSION}"
        return self.folder / f"{corruption}-s{severity}-{tail}.npy"

    def array(self, corruption: str, severity: int, seed: int) -> np.ndarray:
        """The corrupted images of one (corruption, severity, noise seed), read or built (see :meth:`load`)."""
        key = (corruption, severity, seed)
        if key not in self._arrays:
            self.load([key])
        return self._arrays[key]

    def load(self, keys: Iterable[CacheKey]) -> None:
        """Read every verified file of ``keys``, then build the missing or damaged ones, all in one go.

        Raises:
            RuntimeError: if a file just written cannot be read back (the message names it).
        """
        missing = []
        for key in keys:
            if key not in self._arrays:
                array = self.read(*key)
                if array is None:
                    missing.append(key)
                else:
                    self._arrays[key] = array
        if not missing:
            return
        self._build(missing)
        for key in missing:
            array = self.read(*key)
            if array is None:
                raise RuntimeError(
                    f"cache file {self.path(*key)} is unreadable right after being written; "
                    "check the free space and permissions of cache_dir"
                )
            self._arrays[key] = array

    def read(self, corruption: str, severity: int, seed: int) -> np.ndarray | None:
        """Return the verified cached array, or ``None`` if its file is missing or damaged (with a warning)."""
        path = self.path(corruption, severity, seed)
        if not path.exists():
            return None
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.dtype != np.uint8 or array.shape != self.images.shape:
                raise ValueError(f"dtype {array.dtype} shape {array.shape}, expected uint8 {self.images.shape}")
            expected = _checksum_path(path).read_text().strip()
            if _checksum(array) != expected:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, EOFError) as err:
            log.warning("cache file %s is damaged (%s); rebuilding it", path, err)
            return None
        return array

    def save(self, corruption: str, severity: int, seed: int, array: np.ndarray) -> Path:
        """Write ``array`` (``.npy``) and its checksum sidecar, each atomically; return the ``.npy`` path."""
        path = self.path(corruption, severity, seed)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write(path, buffer.getvalue())
        atomic_write(_checksum_path(path), _checksum(array))
        return path

    def _build(self, missing: list[CacheKey]) -> None:
        images = self.images
        self.folder.mkdir(parents=True, exist_ok=True)
        # Starting a process pool costs tens of seconds (each worker imports numpy/OpenCV/scipy): not worth it for a
        # small set, which one process corrupts faster.
        workers = 1 if len(images) < _POOL_MIN_IMAGES else min(len(missing), os.cpu_count() or 1)
        with _Progress(len(missing), len(images)) as progress:
            progress.note(
                f"building the corruption cache for {len(missing)} corruption(s) of {len(images)} images in "
                f"{self.folder} ({workers} process(es)); this takes a few minutes once, later runs read the files"
            )
            if workers == 1:
                for corruption, severity, seed in missing:
                    start = time.perf_counter()
                    array = corrupt_images(images, corruption, severity, seed, progress=progress.advance)
                    self._save_built((corruption, severity, seed), array, start)
                    progress.done(corruption)
            else:
                # One process per core: the corruptions are independent and CPU-bound (numpy/OpenCV/scipy).
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                    start = time.perf_counter()
                    futures = {pool.submit(corrupt_images, np.asarray(images), *key): key for key in missing}
                    for future in as_completed(futures):
                        self._save_built(futures[future], future.result(), start)
                        progress.advance(len(images))
                        progress.done(futures[future][0])

    def _save_built(self, key: CacheKey, array: np.ndarray, start: float) -> None:
        path = self.save(*key, array)
        log.info(
            "cached %s severity %d for %d images of %s at %d px after %.1f s: %s",
            key[0],
            key[1],
            len(array),
            self.folder.name,
            self.image_size,
            time.perf_counter() - start,
            path,
        )


def _checksum(array: np.ndarray) -> str:
    return sha256_of(np.ascontiguousarray(array).data)


def _checksum_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


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
