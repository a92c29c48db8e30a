"""Corruption names and a deterministic, size-aware wrapper around ``imagecorruptions``.

``imagecorruptions`` (the ``imagecorruptions-imaug`` distribution) implements the 15 ImageNet-C corruptions and the
four extra ones with the original ImageNet-C parameters, which were chosen for 224×224 images. Three properties of
the package matter when a stream is built from small images, and this module handles each of them:

* **Randomness.** Most corruptions draw from NumPy's *global* RNG, but ``impulse_noise`` (through scikit-image) and
  ``glass_blur`` (through a numba kernel) seed themselves from fresh OS entropy unless given a ``seed``. Every image
  therefore gets its own 32-bit seed derived from ``(seed, corruption, severity, index)``; it seeds the global RNG
  and is passed as ``seed=`` to those two corruptions. The caller's global RNG state is restored afterwards.
* **Size limits.** ``imagecorruptions.corrupt`` refuses images smaller than 32×32 pixels.
* **Scale.** Nothing fails at 32×32 (all 19 corruptions were checked at 32, 64 and 224 pixels), but the blur-like
  corruptions use kernel radii, displacements and textures in absolute pixels tuned for 224-pixel images. At
  32 pixels, ``defocus_blur``, ``glass_blur``, ``motion_blur``, ``gaussian_blur`` and ``elastic_transform`` at
  severity 5 destroy an MNIST digit completely, and ``frost`` shows a 32-pixel crop of a texture that ImageNet-C
  shows at 224 pixels. Doing *everything* at 224 pixels and shrinking back is also wrong: shrinking averages
  pixel-wise noise away (the Gaussian-noise standard deviation drops about 7×).

The size policy is therefore per corruption:

* :data:`SPATIAL_CORRUPTIONS` (parameters in absolute pixels) are applied at :data:`REFERENCE_SIZE` (224): the
  image is enlarged (bicubic) so that its shorter side is 224, corrupted, and shrunk back (Lanczos, antialiased).
  A corruption then covers the same fraction of the image as in ImageNet-C. Images already that large are
  corrupted as they are.
* All other corruptions (pixel-wise noise, colour, contrast, JPEG, and ``pixelate``, ``zoom_blur`` and ``fog``,
  whose parameters are relative to the image size) are applied at the native size; images smaller than
  :data:`MIN_SIZE` (32) are enlarged to 32 pixels first and shrunk back.

The enlarge-shrink round trip alone changes a clean 32-pixel image by about 1 grey level on average.

The first ``glass_blur`` call in a process compiles a numba kernel, which takes a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import zlib
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 ImageNet-C corruptions, in the paper's stream order."""

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The four held-out ImageNet-C corruptions (the package's "validation" set)."""

ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

REFERENCE_SIZE = 224
"""Shorter side, in pixels, at which :data:`SPATIAL_CORRUPTIONS` are applied to smaller images."""

MIN_SIZE = 32
"""Smallest side ``imagecorruptions`` accepts; smaller images are enlarged to it for the other corruptions."""

SPATIAL_CORRUPTIONS: frozenset[str] = frozenset(
    {
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "gaussian_blur",
        "snow",
        "frost",
        "elastic_transform",
        "spatter",
    }
)
"""Corruptions whose parameters are absolute pixel sizes tuned for 224-pixel images."""

_SEEDED_BY_ARGUMENT: frozenset[str] = frozenset({"impulse_noise", "glass_blur"})


def check_corruption(name: str) -> str:
    """Return ``name`` if it is one of the 19 known corruptions.

    Args:
        name: a corruption name, e.g. ``"gaussian_noise"``.

    Returns:
        The same name.

    Raises:
        ValueError: if the name is unknown; the message lists the valid names.
    """
    if name not in ALL_CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {name!r}; valid names are the 15 ImageNet-C corruptions {list(CORRUPTIONS)} "
            f"and the extra ones {list(EXTRA_CORRUPTIONS)}"
        )
    return name


def check_severity(severity: int) -> int:
    """Return ``severity`` if it is an integer from 1 to 5.

    Args:
        severity: corruption severity.

    Returns:
        The same severity.

    Raises:
        ValueError: otherwise; the message lists the valid severities.
    """
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    return int(severity)


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """Derive the 32-bit seed used for one image.

    Args:
        seed: the stream seed (non-negative).
        corruption: corruption name.
        severity: corruption severity.
        index: position of the image in the array being corrupted.

    Returns:
        A seed in ``[0, 2**32)``, a pure function of the four arguments.
    """
    key = [int(seed), zlib.crc32(corruption.encode()), int(severity), int(index)]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    enlarge = height >= image.shape[0] and width >= image.shape[1]
    method = Image.Resampling.BICUBIC if enlarge else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(image).resize((width, height), method))


def _working_shape(corruption: str, height: int, width: int) -> tuple[int, int]:
    target = REFERENCE_SIZE if corruption in SPATIAL_CORRUPTIONS else MIN_SIZE
    shorter = min(height, width)
    if shorter >= target:
        return height, width
    scale = target / shorter
    return max(target, round(height * scale)), max(target, round(width * scale))


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one image deterministically, following the module's size policy.

    Args:
        image: ``uint8`` array of shape ``(H, W, 3)``.
        corruption: one of :data:`ALL_CORRUPTIONS`.
        severity: 1 to 5.
        seed: the per-image seed (see :func:`image_seed`), in ``[0, 2**32)``.

    Returns:
        The corrupted image, ``uint8``, same shape as ``image``. NumPy's global RNG state is unchanged.

    Raises:
        ValueError: for an unknown corruption, a severity outside 1..5, a bad seed or a bad image shape/dtype.
    """
    from imagecorruptions import corrupt  # imported lazily: it pulls in numba, OpenCV and scikit-image

    check_corruption(corruption)
    check_severity(severity)
    if not 0 <= seed < 2**32:
        raise ValueError(f"per-image seed must be in [0, 2**32), got {seed}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got dtype {image.dtype} shape {image.shape}")
    height, width = image.shape[:2]
    work = _resize(np.ascontiguousarray(image), *_working_shape(corruption, height, width))
    kwargs = {"seed": int(seed)} if corruption in _SEEDED_BY_ARGUMENT else {}
    state = np.random.get_state()
    chatter = io.StringIO()
    try:
        np.random.seed(seed)
        # zoom_blur and snow print() on an internal shape mismatch; keep that out of the user's terminal
        with contextlib.redirect_stdout(chatter):
            out = corrupt(work, corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    if chatter.getvalue().strip():
        log.debug("imagecorruptions (%s): %s", corruption, chatter.getvalue().strip())
    out = np.asarray(out, dtype=np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return _resize(out, height, width)


def corrupt_images(
    images: np.ndarray,
    corruption: str,
    severity: int,
    seed: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Corrupt a batch of images deterministically.

    Image ``i`` is corrupted with seed ``image_seed(seed, corruption, severity, i)``, so the result depends only
    on the arguments (and the installed library versions), not on any global RNG state, which is left unchanged.

    Args:
        images: ``uint8`` array of shape ``(N, H, W, 3)``.
        corruption: one of :data:`ALL_CORRUPTIONS`.
        severity: 1 to 5.
        seed: non-negative stream seed.
        progress: optional callable, called with ``1`` after each image (e.g. to advance a progress bar).

    Returns:
        A new ``uint8`` array with the shape of ``images``.

    Raises:
        ValueError: for an unknown corruption (listing the valid ones), a severity outside 1..5 (listing the valid
            ones), a negative seed, or an array that is not ``uint8`` ``(N, H, W, 3)``.

    Example:
        >>> import numpy as np
        >>> clean = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
        >>> out = corrupt_images(clean, "gaussian_noise", 5, seed=0)
        >>> out.shape, out.dtype, bool((out != clean).any())
        ((2, 32, 32, 3), dtype('uint8'), True)
    """
    check_corruption(corruption)
    check_severity(severity)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"expected a uint8 array of shape (N, H, W, 3), got dtype {dtype} shape {shape}")
    out = np.empty_like(images)
    for index in range(len(images)):
        out[index] = corrupt_image(images[index], corruption, severity, image_seed(seed, corruption, severity, index))
        if progress is not None:
            progress(1)
    return out


def check_corruptions(names: Iterable[str] | None) -> tuple[str, ...]:
    """Validate a list of corruption names, defaulting to the 15 of :data:`CORRUPTIONS`.

    Args:
        names: corruption names in stream order, or ``None`` for :data:`CORRUPTIONS`.

    Returns:
        The names as a tuple.

    Raises:
        ValueError: if the list is empty, is a bare string, has duplicates or holds an unknown name.
    """
    if names is None:
        return CORRUPTIONS
    if isinstance(names, str):
        raise ValueError(f"corruptions must be a list of names, got the string {names!r}; write [{names!r}]")
    result = tuple(check_corruption(name) for name in names)
    if not result:
        raise ValueError(
            f"corruptions must not be empty; leave it unset for the 15 ImageNet-C corruptions {CORRUPTIONS}"
        )
    duplicates = sorted({name for name in result if result.count(name) > 1})
    if duplicates:
        raise ValueError(f"corruptions lists {duplicates} more than once; use `rounds` to repeat the stream")
    return result
