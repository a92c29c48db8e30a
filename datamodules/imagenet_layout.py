"""ImageNet-1k's class index, the label spaces and the folder layouts of :class:`datamodules.ImageNetCDataModule`.

Label spaces (``label_space``):

* ``"imagenet"``: a wnid's label is its canonical ImageNet-1k class index (the position of the synset in the sorted
  list of the 1,000 ImageNet-1k synsets that timm ships, ``timm/data/_info/imagenet_synsets.txt``) and
  ``num_classes`` is 1,000, so a subset of ImageNet-C (a few wnid folders) is labelled correctly for a 1,000-class
  model. For the full ImageNet-C the labels equal the ``"folders"`` labels (spec §6.1).
* ``"folders"``: a wnid's label is its position in the sorted list of wnid folders; ``num_classes`` is their number.
* ``"auto"``: ``"imagenet"`` if every wnid folder of the stream is an ImageNet-1k synset, else ``"folders"``.

The layouts and folder checks here give the data module's errors their wording.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

C_LAYOUT = "<root>/<corruption>/<severity>/<wnid>/<image>.JPEG, e.g. <root>/gaussian_noise/5/n01440764/x.JPEG"
"""The ImageNet-C layout, as error messages show it."""
CLEAN_LAYOUT = "<folder>/<wnid>/<image>.JPEG, e.g. <folder>/n01440764/ILSVRC2012_val_00000293.JPEG"
"""The layout of a clean ImageNet folder (validation or training), as error messages show it."""

LABEL_SPACES: tuple[str, ...] = ("auto", "imagenet", "folders")
"""``label_space`` choices (see the module docstring)."""

IMAGENET_NUM_CLASSES = 1000
"""Classes of ImageNet-1k."""


@functools.cache
def imagenet_class_index() -> dict[str, int]:
    """Map each ImageNet-1k synset (wnid) to its canonical class index, read from the list timm ships.

    The list ``timm/data/_info/imagenet_synsets.txt`` holds the 1,000 wnids in sorted order, which is the standard
    ImageNet-1k class order.

    Returns:
        ``{wnid: index}`` with 1,000 entries, e.g. ``"n01440764" -> 0`` and ``"n02123045" -> 281`` (tabby cat).

    Raises:
        FileNotFoundError: if timm's synset list is missing.
        ValueError: if the list does not hold 1,000 distinct, sorted wnids.
    """
    source = importlib.resources.files("timm.data") / "_info" / "imagenet_synsets.txt"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(
            f"ImageNet-1k synset list not found: {source} (shipped with timm); "
            "reinstall timm or use label_space='folders'"
        ) from err
    wnids = text.split()
    if len(wnids) != IMAGENET_NUM_CLASSES or len(set(wnids)) != len(wnids) or wnids != sorted(wnids):
        raise ValueError(
            f"{source} should hold {IMAGENET_NUM_CLASSES} distinct wnids in sorted order, got {len(wnids)} entries"
        )
    return {wnid: index for index, wnid in enumerate(wnids)}


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k synsets in class order: label ``i`` is ``imagenet_wnids()[i]``."""
    return tuple(imagenet_class_index())


def existing_folder(value: str, what: str, argument: str, layout: str, example: str | None = None) -> Path:
    """Return ``value`` as an expanded ``Path`` if it is an existing folder.

    Raises:
        FileNotFoundError: if the path is missing or not a folder; the message names it and the expected layout.
    """
    if not str(value).strip():
        raise FileNotFoundError(f"{what} folder not set ({argument}={value!r}). Expected layout: {layout}")
    path = Path(value).expanduser()
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "not found"
        hint = f"set {argument}= to the folder" + (f" (e.g. ImageNet's {example}/)" if example else "")
        raise FileNotFoundError(f"{what} folder {problem}: {path}. Expected layout: {layout}; {hint}")
    return path


def not_imagenet_message(folder: Path, count: int) -> str:
    """The error for a wnid ``folder`` that is not an ImageNet-1k synset (one of ``count``) in that label space."""
    return (
        f"wnid folder {folder} is not one of the 1,000 ImageNet-1k synsets ({count} such folder(s) in "
        f"{folder.parent}), but label_space='imagenet' labels every folder by its ImageNet-1k class index. "
        "Rename or remove the folder, or use label_space='folders' (labels = positions in the sorted folder list)"
    )
