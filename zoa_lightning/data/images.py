"""Clean image files: reading, class folders in ``ImageFolder`` order, square resizing. No Lightning.

Used by the clean split of an image folder (:mod:`zoa_lightning.data.split`) and by the data modules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "UnreadableImageError",
    "class_folders",
    "has_image_file",
    "index_image_folder",
    "is_image_file",
    "read_rgb",
    "square_image",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions read as images (case-insensitive); the same set as torchvision's ``ImageFolder``."""


class UnreadableImageError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


def read_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file and decode it fully as RGB.

    Raises:
        UnreadableImageError: if the file cannot be opened or decoded; the message names the file.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(
            f"cannot decode image file {os.fspath(path)!r} ({type(err).__name__}: {err}); "
            "replace or delete the file (files are never skipped silently)"
        ) from err


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(root: Path, what: str, layout: str) -> list[str]:
    """Return the sorted names of the non-hidden sub-folders of ``root``.

    Args:
        root: folder holding one sub-folder per class.
        what: words for the error messages, e.g. ``"ImageNet-C severity folder"``.
        layout: the expected layout, quoted in error messages.

    Raises:
        FileNotFoundError: if ``root`` is missing, not a folder, or has no class sub-folders.
    """
    if not root.exists():
        raise FileNotFoundError(f"{what} not found: {root}. Expected layout: {layout}")
    if not root.is_dir():
        raise FileNotFoundError(f"{what} is not a folder: {root}. Expected layout: {layout}")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{what} {root} has no class sub-folders. Expected layout: {layout}")
    return names


def has_image_file(folder: Path) -> bool:
    """Whether ``folder`` holds at least one image file, at any depth (stops at the first one)."""
    return any(is_image_file(name) for _, _, names in os.walk(folder, followlinks=True) for name in names)


def index_image_folder(root: Path, classes: Sequence[str], what: str, layout: str) -> list[tuple[str, int]]:
    """List the image files of ``root/<class>/`` in ``ImageFolder`` order, labelled by position in ``classes``.

    Files are found recursively; folders are walked in sorted order and files sorted by name, as torchvision's
    ``ImageFolder`` does, so indices into the result match an ``ImageFolder`` over the same tree.

    Raises:
        FileNotFoundError: if a class folder holds no image file; the message names it.
    """
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        found = [
            os.path.join(dirpath, fname)
            for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True))
            for fname in sorted(fnames)
            if is_image_file(fname)
        ]
        if not found:
            raise FileNotFoundError(
                f"{what} class folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). "
                f"Expected layout: {layout}"
            )
        samples.extend((path, label) for path in found)
    return samples


def square_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Read an image file as a ``uint8`` ``size×size×3`` array: shorter side resized to ``size`` (bicubic), centre crop.

    Raises:
        UnreadableImageError: if the file cannot be opened or decoded.
    """
    image = read_rgb(path)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
