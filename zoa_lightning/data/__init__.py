"""Clean image data, without Lightning: the embedded MNIST digits, image folders and their training/test split.

The data modules (:mod:`datamodules`) build their streams on it, and the demo's training script
(:mod:`zoa_lightning.demo.train`) trains on the same split, so neither depends on the other.
"""

from zoa_lightning.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    class_folders,
    index_image_folder,
    is_image_file,
    read_rgb,
    square_image,
)
from zoa_lightning.data.mnist import MNIST_NUM_CLASSES, MNIST_NUM_TEST, MNIST_NUM_TRAIN, load_mnist_split
from zoa_lightning.data.split import (
    FOLDER_LAYOUT,
    FOLDER_TEST_FRACTION,
    SPLIT_SEED,
    CleanSplit,
    dataset_classes,
    describe_split,
    is_mnist,
    load_clean_split,
)

__all__ = [
    "FOLDER_LAYOUT",
    "FOLDER_TEST_FRACTION",
    "IMAGE_EXTENSIONS",
    "MNIST_NUM_CLASSES",
    "MNIST_NUM_TEST",
    "MNIST_NUM_TRAIN",
    "SPLIT_SEED",
    "CleanSplit",
    "UnreadableImageError",
    "class_folders",
    "dataset_classes",
    "describe_split",
    "index_image_folder",
    "is_image_file",
    "is_mnist",
    "load_clean_split",
    "load_mnist_split",
    "read_rgb",
    "square_image",
]
