import numpy as np
import pytest
from PIL import Image
from skimage import data

from datamodules import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt_images
from datamodules.corruptions import SPATIAL_CORRUPTIONS, check_corruptions, corrupt_image, image_seed
from zoa_lightning.data import load_mnist_split


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two MNIST digits and two small photos, 32×32 RGB uint8."""
    _, _, test_x, _ = load_mnist_split(32)
    photos = [
        np.asarray(Image.fromarray(p).resize((32, 32), Image.Resampling.BILINEAR))
        for p in (data.astronaut(), data.coffee())
    ]
    return np.stack([test_x[0], test_x[1], *photos])


def test_names() -> None:
    assert len(CORRUPTIONS) == 15
    assert CORRUPTIONS[0] == "gaussian_noise"
    assert CORRUPTIONS[-1] == "jpeg_compression"
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert SPATIAL_CORRUPTIONS.issubset(CORRUPTIONS + EXTRA_CORRUPTIONS)


def test_all_19_corruptions_are_valid_and_change_the_image(images: np.ndarray) -> None:
    for name in CORRUPTIONS + EXTRA_CORRUPTIONS:
        out = corrupt_images(images, name, 5, seed=1)
        assert out.dtype == np.uint8, name
        assert out.shape == images.shape, name
        for clean, corrupted in zip(images, out, strict=True):
            assert not np.array_equal(clean, corrupted), name


@pytest.mark.parametrize("name", ["impulse_noise", "glass_blur", "frost", "gaussian_noise"])
def test_deterministic_and_global_rng_untouched(images: np.ndarray, name: str) -> None:
    np.random.seed(123)
    first = corrupt_images(images[:2], name, 5, seed=7)
    after_call = np.random.random()
    np.random.seed(123)
    assert after_call == np.random.random()  # the global RNG state was restored
    np.random.seed(999)  # a different global state must not matter
    assert np.array_equal(first, corrupt_images(images[:2], name, 5, seed=7))
    assert not np.array_equal(first, corrupt_images(images[:2], name, 5, seed=8))


def test_image_seed_depends_on_every_part() -> None:
    base = image_seed(2020, "fog", 5, 0)
    assert base == image_seed(2020, "fog", 5, 0)
    others = {
        image_seed(2021, "fog", 5, 0),
        image_seed(2020, "snow", 5, 0),
        image_seed(2020, "fog", 4, 0),
        image_seed(2020, "fog", 5, 1),
    }
    assert base not in others
    assert len(others) == 4


@pytest.mark.parametrize("size", [(20, 20), (40, 56)])
def test_sizes_below_minimum_and_non_square(size: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    for name in ("gaussian_noise", "defocus_blur"):
        out = corrupt_image(image, name, 3, seed=0)
        assert out.shape == image.shape
        assert out.dtype == np.uint8


def test_invalid_arguments(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"unknown corruption 'gaussian'.*gaussian_noise.*saturate"):
        corrupt_images(images, "gaussian", 5, seed=0)
    with pytest.raises(ValueError, match=r"severity must be one of \[1, 2, 3, 4, 5\], got 6"):
        corrupt_images(images, "fog", 6, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt_images(images, "fog", 0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative"):
        corrupt_images(images, "fog", 5, seed=-1)
    with pytest.raises(ValueError, match=r"uint8 array of shape \(N, H, W, 3\)"):
        corrupt_images(images.astype(np.float32), "fog", 5, seed=0)
    with pytest.raises(ValueError, match="more than once"):
        check_corruptions(["fog", "fog"])
    with pytest.raises(ValueError, match="list of names"):
        check_corruptions("fog")
    assert check_corruptions(None) == CORRUPTIONS
