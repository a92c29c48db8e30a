"""Data modules for ZOA: an ImageNet-C-style stream built from a small clean set, and ImageNet-C read from disk.

YAML class paths read ``datamodules.CorruptionStreamDataModule`` and ``datamodules.ImageNetCDataModule``. The clean
data under them (MNIST, image folders, their training/test split) is :mod:`zoa_lightning.data`, which has no
Lightning in it.
"""

from datamodules.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt_images
from datamodules.imagenet_c import ImageNetCDataModule
from datamodules.stream import CorruptionStreamDataModule
from zoa_lightning.data import UnreadableImageError

__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "CorruptionStreamDataModule",
    "ImageNetCDataModule",
    "UnreadableImageError",
    "corrupt_images",
]
