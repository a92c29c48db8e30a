"""Architectures and weight loading for the demo's two source models.

Both models classify 32×32 RGB images (the embedded MNIST digits, grey repeated to three channels) normalised with
mean = std = 0.5 per channel, i.e. ``(x / 255 - 0.5) / 0.5``:

* ``demo_vit``: a timm :class:`~timm.models.vision_transformer.VisionTransformer`, patch 4, width 96, 6 blocks of
  3 heads, with a class token and class-token pooling (ZOA's ViT loss reads the class token);
* ``demo_cnn``: a narrow timm :class:`~timm.models.resnet.ResNet` (basic blocks ``[2, 2, 2, 2]``, stage widths
  16/32/64/128) whose stem is a single 3×3 stride-1 convolution without max-pooling, so that 32-pixel inputs keep
  their resolution in ``layer1``. The standard names ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` and ``fc`` and the
  ``BatchNorm2d`` layers are kept, which is what ZOA's ResNet layout resolver looks for.

The trained weights ship as ``zoa_lightning/demo/weights/<name>.safetensors``; :func:`load_demo_model` builds the
architecture, loads them (up-casting to ``float32``) and returns the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.resnet import BasicBlock, ResNet, make_blocks
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = [
    "DEMO_MEAN",
    "DEMO_MODEL_NAMES",
    "DEMO_NUM_CLASSES",
    "DEMO_STD",
    "build_demo_cnn",
    "build_demo_model",
    "build_demo_vit",
    "default_weights_path",
    "load_demo_model",
]

DEMO_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel normalisation mean of the demo models (inputs scaled to ``[0, 1]`` first)."""
DEMO_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel normalisation standard deviation of the demo models."""
DEMO_IMAGE_SIZE = 32
"""Input side length in pixels of both demo models."""
DEMO_NUM_CLASSES = 10
"""Class count of the demo models (the ten MNIST digits), and of the shipped weights."""
DEMO_CNN_CHANNELS: tuple[int, int, int, int] = (16, 32, 64, 128)
"""Output widths of ``layer1`` .. ``layer4`` of ``demo_cnn``; the stem has ``DEMO_CNN_CHANNELS[0]`` channels."""

_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def build_demo_vit(num_classes: int = DEMO_NUM_CLASSES, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Build the demo vision transformer, randomly initialised.

    Args:
        num_classes: number of output classes.
        drop_path_rate: stochastic-depth rate (training only; it adds no parameters and is inert in eval mode).

    Returns:
        A timm ``VisionTransformer`` for 32×32 inputs: patch 4 (64 patches plus the class token), width 96, depth 6,
        3 heads, MLP ratio 4, ``global_pool="token"``.
    """
    return VisionTransformer(
        img_size=DEMO_IMAGE_SIZE,
        patch_size=4,
        embed_dim=96,
        depth=6,
        num_heads=3,
        mlp_ratio=4.0,
        class_token=True,
        global_pool="token",
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
    )


def build_demo_cnn(num_classes: int = DEMO_NUM_CLASSES) -> ResNet:
    """Build the demo ResNet, randomly initialised.

    timm's plain ResNet stem is a 7×7 stride-2 convolution of fixed width 64 followed by a stride-2 max-pool, which
    leaves 8×8 maps after the stem at 32 pixels. Here the stem is replaced by a 3×3 stride-1 convolution of width
    ``DEMO_CNN_CHANNELS[0]`` and no pooling, and ``layer1`` is rebuilt (with timm's own ``make_blocks``) for that input
    width, so no projection shortcut is needed in ``layer1``; stages 2..4 halve the resolution (32 → 16 → 8 → 4).

    Args:
        num_classes: number of output classes.

    Returns:
        A timm ``ResNet`` with ``BasicBlock`` stages ``[2, 2, 2, 2]`` of widths 16/32/64/128 (about 0.7 M parameters).
    """
    stem_width = DEMO_CNN_CHANNELS[0]
    # timm annotates `block` as an instance although it takes the class, and types `conv1`/`maxpool` as the modules
    # of its deep-stem variant; both are annotation quirks, hence the ignores.
    model = ResNet(
        block=BasicBlock,  # type: ignore[arg-type]
        layers=(2, 2, 2, 2),
        num_classes=num_classes,
        channels=DEMO_CNN_CHANNELS,
    )
    model.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)  # type: ignore[assignment]
    model.bn1 = nn.BatchNorm2d(stem_width)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    stages, _ = make_blocks(
        (BasicBlock,), (stem_width,), (2,), inplanes=stem_width, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d
    )
    model.layer1 = stages[0][1]
    model.feature_info = [
        {"num_chs": stem_width, "reduction": 1, "module": "act1"},
        *({"num_chs": c, "reduction": 2**i, "module": f"layer{i + 1}"} for i, c in enumerate(DEMO_CNN_CHANNELS)),
    ]
    model.init_weights(zero_init_last=True)
    return model


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {"demo_vit": build_demo_vit, "demo_cnn": build_demo_cnn}
DEMO_MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_demo_model` and :func:`load_demo_model`."""


def build_demo_model(name: str, num_classes: int = DEMO_NUM_CLASSES) -> nn.Module:
    """Build a demo architecture by name, randomly initialised.

    Args:
        name: ``"demo_vit"`` or ``"demo_cnn"``.
        num_classes: number of output classes.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo model {name!r}; expected one of {', '.join(DEMO_MODEL_NAMES)}")
    return _BUILDERS[name](num_classes)


def default_weights_path(name: str) -> Path:
    """Return where the shipped weights of demo model ``name`` live inside the package.

    Args:
        name: ``"demo_vit"`` or ``"demo_cnn"``.

    Returns:
        ``<package>/zoa_lightning/demo/weights/<name>.safetensors`` (which may not exist yet).
    """
    return _WEIGHTS_DIR / f"{name}.safetensors"


def load_demo_model(name: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build demo model ``name`` and load its trained weights.

    Args:
        name: ``"demo_vit"`` or ``"demo_cnn"``.
        weights: a ``safetensors`` file holding the model's full state dict; defaults to the shipped file
            (:func:`default_weights_path`). Floating-point tensors stored in lower precision are up-cast to
            ``float32``.
        num_classes: the class count the caller needs (e.g. the data's); ``None`` accepts the 10 of the demo models.
            Checked against the classifier in the file before anything else runs, so a data set with another class
            count fails here rather than after quantization calibration.

    Returns:
        The model with its weights, in eval mode, in ``float32`` on the CPU.

    Raises:
        ValueError: for an unknown name, or if the file is unreadable, its classifier has another class count than
            ``num_classes``, or its keys or shapes do not match the architecture (the message names the file).
        FileNotFoundError: if the weights file does not exist (the message names it and the command creating it).
    """
    model = build_demo_model(name, DEMO_NUM_CLASSES if num_classes is None else num_classes)
    path = Path(weights) if weights is not None else default_weights_path(name)
    if not path.is_file():
        # the trainer writes to ./runs/demo-weights unless told otherwise, so the folder is always named
        raise FileNotFoundError(
            f"weights file for {name!r} not found: {path}; create it with "
            f"`python -m zoa_lightning.demo.train --model {name} --out {path.parent}`"
            + ("" if path.name == f"{name}.safetensors" else f" (which writes {name}.safetensors)")
        )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read weights file {path} as safetensors: {error}") from error
    _check_demo_classes(name, path, state, num_classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            key = mismatched[0]
            details.append(
                f"{len(mismatched)} with wrong shape (e.g. {key!r}: file {tuple(state[key].shape)}, "
                f"model {tuple(expected[key].shape)})"
            )
        raise ValueError(f"weights file {path} does not match the {name!r} architecture: " + "; ".join(details))
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


_CLASSIFIERS = {"demo_vit": "head", "demo_cnn": "fc"}


def _check_demo_classes(name: str, path: Path, state: dict[str, Tensor], num_classes: int | None) -> None:
    """Raise if the classifier in ``state`` (read from ``path``) does not have ``num_classes`` outputs."""
    key = f"{_CLASSIFIERS[name]}.weight"
    if num_classes is None or key not in state or state[key].shape[0] == num_classes:
        return
    shape = tuple(state[key].shape)
    raise ValueError(
        f"weights file {path} holds a {shape[0]}-class {name} (classifier {key} of shape {shape}), but "
        f"num_classes={num_classes} is requested (the `zoa` CLI links it from the data's class count; classifier "
        f"shape {(num_classes, *shape[1:])}). Train {name} on your data with `python -m zoa_lightning.demo.train "
        f"--model {name} --dataset <your image folder>` and pass the file it writes with --model.init_args.weights "
        f"(any {num_classes}-class {name} weights do), or choose another network (--model.init_args.network: a timm "
        "name or torchvision:<name>)"
    )
