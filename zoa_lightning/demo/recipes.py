"""The demo models' training data and recipes: what :mod:`zoa_lightning.demo.train` trains on, and how.

:func:`load_training_data` reads the clean split of a data set (the embedded MNIST digits or an image folder) exactly
as :class:`datamodules.CorruptionStreamDataModule` splits it; :data:`RECIPES` holds each demo model's optimisation and
augmentation settings (:class:`Recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoa_lightning.data import dataset_classes, describe_split, load_clean_split
from zoa_lightning.demo.models import DEMO_IMAGE_SIZE

__all__ = ["RECIPES", "Recipe", "TrainingData", "load_training_data"]


@dataclass(frozen=True)
class TrainingData:
    """The clean split a demo model is trained and evaluated on.

    Args:
        train_images: ``uint8`` ``N×32×32×3`` training part.
        train_labels: ``int64`` labels of the training part.
        test_images: ``uint8`` ``M×32×32×3`` test part (the images the corruption stream is built from).
        test_labels: ``int64`` labels of the test part.
        num_classes: the data's class count.
        dataset: the ``dataset`` value it was loaded from (``"mnist"`` or a folder path).
        description: how the split was made, for the run record.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    dataset: str
    description: str


def load_training_data(dataset: str = "mnist") -> TrainingData:
    """Load the clean split that :class:`datamodules.CorruptionStreamDataModule` uses for ``dataset`` at 32 px.

    The split is :func:`zoa_lightning.data.load_clean_split`, the one the data module corrupts its test part of into
    the stream, so the training part never overlaps the stream's images.

    Args:
        dataset: ``"mnist"`` for the embedded digits, or a folder ``<root>/<class>/*.png|jpg``.

    Returns:
        The split, the class count and a description.

    Raises:
        FileNotFoundError: if the folder does not exist or has no class sub-folders or images (the message names the
            path and the expected layout).
        ValueError: if the folder holds fewer than 2 images.
    """
    train_images, train_labels, test_images, test_labels = load_clean_split(dataset, DEMO_IMAGE_SIZE)
    source = describe_split(dataset, DEMO_IMAGE_SIZE)
    description = (
        f"{source}: trained on the {len(train_labels)}-image training part, evaluated on the {len(test_labels)}-image "
        "test part; last-epoch weights, no selection on the test part"
    )
    num_classes = len(dataset_classes(dataset))
    return TrainingData(train_images, train_labels, test_images, test_labels, num_classes, dataset, description)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run.

    Args:
        epochs: passes over the training part.
        lr: peak AdamW learning rate (reached after the warm-up).
        weight_decay: decoupled weight decay, applied to weight matrices and kernels only (not to biases, norms,
            position embeddings or the class token).
        batch_size: training mini-batch size (the last incomplete batch of an epoch is dropped).
        warmup_epochs: length of the linear warm-up from ``lr / 100``; the cosine decay to zero follows.
        label_smoothing: cross-entropy label smoothing.
        drop_path_rate: stochastic depth (ViT only).
        grad_clip: maximum global gradient norm.
        max_rotation: augmentation rotation range in degrees, ``±max_rotation``.
        scale_range: augmentation isotropic scale range ``(low, high)``.
        max_shift: augmentation shift range in pixels along each axis, ``±max_shift``.
    """

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    warmup_epochs: float
    label_smoothing: float
    drop_path_rate: float = 0.0
    grad_clip: float = 1.0
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 3.0


RECIPES: dict[str, Recipe] = {
    "demo_cnn": Recipe(epochs=15, lr=2e-3, weight_decay=0.05, batch_size=64, warmup_epochs=1, label_smoothing=0.0),
    "demo_vit": Recipe(
        epochs=30, lr=1e-3, weight_decay=0.05, batch_size=64, warmup_epochs=5, label_smoothing=0.1, drop_path_rate=0.1
    ),
}
"""Default recipe of each demo model."""
