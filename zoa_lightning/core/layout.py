"""Where ZOA reads and writes inside a network: the :class:`ModelLayout` and its resolvers.

ZOA needs five things from a classifier: the normalization layers it adapts, the tensor the domain-shift detector
watches, the intermediate features of the fitness loss, the classifier head (whose input is the final feature) and,
for vision transformers, how many prefix tokens to drop from the detector tensor. A :class:`ModelLayout` names them by
qualified module name, so the engine works through forward hooks on the model's own ``forward``, whatever built it
(timm, torchvision, a quantizer that rewrote the graph).

Resolution follows timm's ``create_norm`` habit: a model may carry its own layout in a ``zoa_layout`` attribute (a
quantizer that rewrites the graph sets one); otherwise :func:`resolve_layout` dispatches on the model's structure.

Generalised layer-selection rules (the specification fixes them for ViT-B/16 and ResNet-50 only):

* **Vision transformer** (timm ``VisionTransformer`` with a class token and ``global_pool="token"``) of depth ``D``:
  adapt ``norm1`` and ``norm2`` of blocks ``1 .. D - D // 4 - 1`` (0-indexed). The first block and the last quarter of
  the blocks stay frozen, as does the final ``norm``. For ``D = 12`` this is blocks 1..8, the paper's rule. A depth-1
  model adapts block 0, the only one. Loss taps: the CLS token at the output of ``blocks[i].norm1`` for ``i >= 1``
  (the next block's first LayerNorm applied to block ``i - 1``'s output) and the head input (the final-norm CLS
  token). Detector: the output of ``norm_pre`` without the prefix tokens.
* **ResNet family** (timm or torchvision ``ResNet``; stages ``layer1 ..``): adapt, in every stage but the last, every
  BatchNorm of each block's residual branch except its last one (``bn1``/``bn2`` of a bottleneck, ``bn1`` of a basic
  block), skipping the first block of the first stage entirely; downsample BNs and the stem BN stay frozen. For
  ResNet-50 this is the paper's 24 layers. Loss taps: the pooled outputs of every stage but the last, plus the head
  input (the pooled last stage). Detector: the stem convolution output before ``bn1``; for a deep stem (a
  ``conv1`` sequence, timm ``resnet50d``) the output of its first convolution, before the stem's own BatchNorms.
* **EfficientNet family** (timm ``EfficientNet``; stages ``blocks[0..n-1]``): the same rule over its stages, each
  block's last BatchNorm (the projection BN) excluded. Detector: ``conv_stem`` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ModelLayout",
    "check_head_prediction",
    "check_image_batch",
    "check_image_dtype",
    "default_input_size",
    "refuse_distilled_vit",
    "resolve_layout",
]


@dataclass(frozen=True)
class ModelLayout:
    """Qualified module names that tell the ZOA engine where to act.

    Args:
        kind: ``"vit"`` (token features; taps read the CLS token) or ``"cnn"`` (taps are spatially averaged).
        norms: norm layers to fuse and adapt (``nn.LayerNorm`` for ``"vit"``, ``nn.BatchNorm2d`` for ``"cnn"``), in
            network order.
        detector: module whose **output** feeds the domain-shift detector.
        taps: modules whose **output** gives the intermediate loss features, in network order.
        head: the classifier; its **input** is the final feature (the last loss feature and the one that is
            activation-shifted).
        num_prefix_tokens: for ``"vit"``, the number of leading tokens (CLS, registers) excluded from the detector.
        batch_norms: for ``"cnn"``, every BatchNorm in the network; all of them normalise with batch statistics under
            ZOA (spec §1.2), adapted or not.
    """

    kind: Literal["vit", "cnn"]
    norms: tuple[str, ...]
    detector: str
    taps: tuple[str, ...]
    head: str
    num_prefix_tokens: int = 0
    batch_norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "cnn"):
            raise ValueError(f"ModelLayout.kind must be 'vit' or 'cnn', got {self.kind!r}")
        if not self.norms:
            raise ValueError("ModelLayout.norms is empty: ZOA needs at least one normalization layer to adapt")

    def check(self, model: nn.Module) -> None:
        """Check that every named module exists in ``model`` and has the expected type.

        Args:
            model: the network this layout describes.

        Raises:
            ValueError: naming the first missing or mistyped module.
        """
        modules = dict(model.named_modules())
        expected = nn.LayerNorm if self.kind == "vit" else nn.BatchNorm2d
        for name in (*self.norms, self.detector, *self.taps, self.head, *self.batch_norms):
            if name not in modules:
                raise ValueError(f"ModelLayout names module {name!r}, which {type(model).__name__} does not have")
        for name in self.norms:
            if not isinstance(modules[name], expected) or not getattr(modules[name], "elementwise_affine", True):
                raise ValueError(
                    f"ModelLayout norm {name!r} is {type(modules[name]).__name__}; a {self.kind} layout adapts "
                    f"affine {expected.__name__} layers"
                )


def resolve_layout(model: nn.Module) -> ModelLayout:
    """Return the layout of ``model``: its own ``zoa_layout`` attribute, or one derived from its structure.

    Args:
        model: a timm ``VisionTransformer`` (class-token pooling), a timm/torchvision ``ResNet``, a timm
            ``EfficientNet``, or any module carrying a ``zoa_layout`` :class:`ModelLayout`.

    Returns:
        The checked layout.

    Raises:
        TypeError: if the architecture is not supported; the message says how to provide a layout.
        ValueError: if a vision transformer has no class token or does not pool it.
    """
    layout = getattr(model, "zoa_layout", None)
    if layout is None:
        if hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "norm_pre"):
            layout = _vit_layout(model)
        elif all(hasattr(model, f"layer{i}") for i in (1, 2)) and hasattr(model, "fc") and hasattr(model, "conv1"):
            layout = _resnet_layout(model)
        elif hasattr(model, "conv_stem") and hasattr(model, "blocks") and hasattr(model, "classifier"):
            layout = _efficientnet_layout(model)
        else:
            raise TypeError(
                f"ZOA does not know where to act in a {type(model).__name__}: supported are timm VisionTransformer, "
                "timm/torchvision ResNet and timm EfficientNet models; for another network attach a "
                "zoa_lightning.core.ModelLayout as `model.zoa_layout`"
            )
    if not isinstance(layout, ModelLayout):
        raise TypeError(f"model.zoa_layout must be a ModelLayout, got {type(layout).__name__}")
    layout.check(model)
    return layout


def refuse_distilled_vit(model: nn.Module, method: str) -> None:
    """Raise ``ValueError`` for a distilled ViT (timm's DeiT with ``head_dist``), whose prediction two heads share.

    Args:
        model: the network.
        method: who refuses it, for the message (``"ZOA"``, ``"FOA"``).
    """
    if getattr(model, "dist_token", None) is not None or isinstance(getattr(model, "head_dist", None), nn.Module):
        raise ValueError(
            f"{type(model).__name__} is a distilled ViT: it predicts the mean of two heads, `head` on the class token "
            f"and `head_dist` on the distillation token, while {method}'s activation shift and loss read the class "
            "token's head alone, so its predictions would silently drop `head_dist`. Use the model without "
            "distillation (e.g. deit_small_patch16_224 instead of deit_small_distilled_patch16_224)"
        )


def _vit_layout(model: nn.Module) -> ModelLayout:
    refuse_distilled_vit(model, "ZOA")
    depth = len(model.blocks)  # type: ignore[arg-type]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
        raise ValueError(
            "ZOA's ViT loss reads the class token: build the VisionTransformer with class_token=True and "
            f"global_pool='token' (got global_pool={getattr(model, 'global_pool', None)!r})"
        )
    first = 1 if depth > 1 else 0
    stop = max(first + 1, depth - depth // 4)
    norms = tuple(f"blocks.{i}.{n}" for i in range(first, stop) for n in ("norm1", "norm2"))
    taps = tuple(f"blocks.{i}.norm1" for i in range(1, depth))
    return ModelLayout(kind="vit", norms=norms, detector="norm_pre", taps=taps, head="head", num_prefix_tokens=prefix)


def _residual_branch_norms(block: nn.Module, prefix: str) -> list[str]:
    """Names of a block's residual-branch BatchNorms except the last one (downsample BNs are excluded)."""
    names = [
        f"{prefix}.{n}"
        for n, m in block.named_modules()
        if isinstance(m, nn.BatchNorm2d) and n and not n.startswith(("downsample", "shortcut"))
    ]
    return names[:-1]


def _stage_layout(model: nn.Module, stages: list[tuple[str, nn.Module]], detector: str, head: str) -> ModelLayout:
    norms: list[str] = []
    for s, (stage_name, stage) in enumerate(stages[:-1]):
        for b, (block_name, block) in enumerate(stage.named_children()):
            if s == 0 and b == 0:
                continue
            norms += _residual_branch_norms(block, f"{stage_name}.{block_name}")
    batch_norms = tuple(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    taps = tuple(name for name, _ in stages[:-1])
    return ModelLayout(kind="cnn", norms=tuple(norms), detector=detector, taps=taps, head=head, batch_norms=batch_norms)


def _stem_conv(model: nn.Module, stem: str) -> str:
    """The first convolution of the stem ``stem``: the stem itself, or its first ``Conv2d`` if it is a sequence.

    A deep stem (timm ``stem_type="deep"``, e.g. ``resnet50d``, ``test_resnet``) is conv-BN-act-conv-BN-act-conv;
    its output is already normalised by the stem's own BatchNorms (batch statistics under ZOA), so a corruption barely
    moves its statistics and the detector would never fire. Its first convolution's output is the spec's detector
    tensor: the raw stem convolution output, before any normalisation.
    """
    module = model.get_submodule(stem)
    if isinstance(module, nn.Conv2d):
        return stem
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            return f"{stem}.{name}"
    raise ValueError(f"the stem {stem!r} of {type(model).__name__} has no Conv2d for the domain-shift detector to read")


def _resnet_layout(model: nn.Module) -> ModelLayout:
    stages = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 10) if hasattr(model, f"layer{i}")]
    return _stage_layout(model, stages, detector=_stem_conv(model, "conv1"), head="fc")


def _efficientnet_layout(model: nn.Module) -> ModelLayout:
    stages = [(f"blocks.{i}", stage) for i, stage in enumerate(model.blocks)]  # type: ignore[arg-type]
    return _stage_layout(model, stages, detector=_stem_conv(model, "conv_stem"), head="classifier")


def default_input_size(model: nn.Module, layout: ModelLayout) -> tuple[int, int, int]:
    """``(C, H, W)`` for a probe forward: a ViT's own image size, else ``(C, 64, 64)``; ``C`` from the first conv."""
    weights = (getattr(m, "weight", None) for m in model.modules())
    channels = next((int(w.shape[1]) for w in weights if isinstance(w, Tensor) and w.ndim == 4), 3)
    if layout.kind == "vit":
        height, width = model.patch_embed.img_size  # type: ignore[union-attr,misc]
        return channels, int(height), int(width)
    return channels, 64, 64


def check_image_batch(images: Tensor, model: nn.Module, layout: ModelLayout, input_size: tuple[int, int, int]) -> None:
    """Raise ``ValueError`` naming the expected shape unless ``images`` is a finite, non-empty batch the model takes.

    Args:
        images: the batch.
        model: the network (a ViT's patch embedding says which sizes it accepts; a ViT without one, e.g. an
            exported graph, accepts ``input_size`` only).
        layout: the network's layout.
        input_size: ``(C, H, W)`` the network was built for.

    Raises:
        ValueError: for a non-4-d input, another dtype than the network's, the wrong channel count, a size a ViT cannot
            embed, an empty batch, or NaN/Inf values (the message counts them).
    """
    c, h, w = input_size
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"ZOA expects an image batch of shape (B, {c}, H, W), got {shape}")
    check_image_dtype(images, model)
    if images.shape[1] != c:
        raise ValueError(f"ZOA expects {c}-channel images (B, {c}, H, W), got shape {tuple(images.shape)}")
    if layout.kind == "vit":
        embed = getattr(model, "patch_embed", None)  # None: a graph that takes one image size only
        if getattr(embed, "strict_img_size", True) and tuple(images.shape[2:]) != (h, w):
            raise ValueError(f"this ViT expects images of shape (B, {c}, {h}, {w}), got {tuple(images.shape)}")
        ph, pw = getattr(embed, "patch_size", (1, 1))
        if not getattr(embed, "dynamic_img_pad", False) and (images.shape[2] % ph or images.shape[3] % pw):
            raise ValueError(
                f"this ViT expects images of shape (B, {c}, H, W) with H a multiple of {ph} and W of {pw} "
                f"(e.g. ({c}, {h}, {w})), got {tuple(images.shape)}"
            )
    if images.shape[0] < 1:
        raise ValueError(f"ZOA got an empty batch of shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"the input batch contains {bad} NaN/Inf values; nothing was adapted on it")


def check_image_dtype(images: Tensor, model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``images`` has the floating dtype of the network's parameters.

    A ``uint8`` batch (raw pixels) or a float16/float64 one would otherwise fail deep inside the network with torch's
    dtype mismatch, or silently run at another precision.

    Raises:
        ValueError: naming both dtypes and how to convert.
    """
    expected = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if images.dtype != expected:
        hint = "images.float() / 255, then normalise" if not images.is_floating_point() else f"images.to({expected})"
        raise ValueError(
            f"the network takes {expected} images, got a {images.dtype} batch of shape {tuple(images.shape)}: convert "
            f"it ({hint}, as the data modules do) before adapting on it"
        )


def check_head_prediction(logits: Tensor, head_logits: Tensor, model: nn.Module, head: str) -> None:
    """Raise ``TypeError`` unless a network's prediction is its head applied to the head's input.

    ZOA predicts with ``head(final + shift)`` and its loss reads the head input as the final feature; a network whose
    output also reads something else (a second head, an ensemble) would have part of its prediction dropped.

    Args:
        logits: the network's own output for a probe batch.
        head_logits: ``head(head input)`` for the same batch.
        model: the network, for the message.
        head: the head's qualified name.
    """
    if logits.shape != head_logits.shape or not torch.allclose(logits, head_logits, rtol=1e-4, atol=1e-5):
        raise TypeError(
            f"the prediction of {type(model).__name__} is not its head {head!r} applied to the head's input (the "
            "network's output reads more than that, e.g. a second head), so ZOA's activation-shifted prediction would "
            "differ from the network's own; give ZOA a network whose output is its head's, or a zoa_layout naming the "
            "module that produces the whole prediction"
        )
