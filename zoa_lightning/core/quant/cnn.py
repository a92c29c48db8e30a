"""Post-training fake quantization of ResNet-family CNNs with MQBench's "Academic" backend (spec §7.2).

Every MQBench call of the project lives here, behind :func:`quantize_cnn` (prepare, calibrate, AdaRound at four bits
and below, freeze) and :func:`prepare_cnn_quantization` (the same uncalibrated structure, to load a cached calibrated
``state_dict`` into). Swapping the dependency means rewriting this module only.

What the prepared ``torch.fx.GraphModule`` looks like (MQBench ``prepare_by_platform``, Academic backend):

* every ``Conv2d``/``Linear`` becomes a QAT module whose weight passes through a ``weight_fake_quant`` quantizer:
  per output channel, asymmetric ``[0, 2^b - 1]``; the first conv (the one that reads the network input) and the
  classifier are forced to 8 bits;
* an activation fake-quantizer ``<node>_post_act_fake_quantizer`` (per tensor, asymmetric) sits on every tensor that
  feeds a conv or linear layer; the network input and the classifier input are forced to 8 bits;
* BatchNorm is **not** folded (the Academic quantizer never calls ``fuse_fx``): each ``nn.BatchNorm2d`` stays a float
  module at its original qualified name (``layer1.1.bn1``), so ZOA can swap it for a fused layer.

The returned model carries a :class:`~zoa_lightning.core.layout.ModelLayout` in ``model.zoa_layout`` that names, in
the quantized graph, where ZOA acts: the plain model's BatchNorms, the stem conv (detector, spec §5.1), the activation
quantizer that follows each stage but the last (loss taps, spec §2.3) and ``fc`` (whose input is the output of the
8-bit fc-input quantizer).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, fx, nn

from zoa_lightning.core.layout import ModelLayout, resolve_layout

__all__ = [
    "ADAROUND_MAX_BITS",
    "MQBENCH_BITS",
    "CNNObserver",
    "default_activation_bits",
    "prepare_cnn_quantization",
    "quantize_cnn",
]

log = logging.getLogger(__name__)

CNNObserver = Literal["mse", "minmax"]

#: Bit widths (inclusive range) this module quantizes weights and activations with: the settings of spec §7.2 (8, 6, 4
#: and W2A4) and those in between. The first conv, the classifier and their inputs stay at 8 bits whatever is asked.
MQBENCH_BITS: tuple[int, int] = (2, 8)

#: Weight bit widths at or below this use MQBench's AdaRound quantizer and reconstruction (spec §7.2).
ADAROUND_MAX_BITS = 4

# (weight observer, activation observer) per ``observer`` argument. The spec's are the MSE ones; min/max is the
# cheap choice for tests (about ten times faster on CPU).
_OBSERVERS: dict[str, tuple[str, str]] = {
    "mse": ("MSEObserver", "EMAMSEObserver"),
    "minmax": ("MinMaxObserver", "EMAMinMaxObserver"),
}

# AdaRound reconstruction settings of spec §7.2 (MQBench ``ptq_reconstruction`` config keys).
_ADAROUND_CONFIG: dict[str, Any] = {
    "pattern": "layer",  # layer-wise units: AdaRound, not BRECQ/QDrop blocks
    "scale_lr": 4.0e-5,  # activation scales are handed to Adam but are frozen buffers, so they never move
    "warm_up": 0.2,  # no rounding regulariser for the first 20 % of the iterations
    "weight": 0.01,  # regulariser weight
    "b_range": [20, 2],  # beta decays linearly from 20 to 2
    "keep_gpu": True,  # keep cached activations on the model's device (whatever it is)
    "round_mode": "learned_hard_sigmoid",
    "prob": 1.0,  # no QDrop
}

# torch.fx copies the entries of ``GraphModule.meta[<this key>]`` back as attributes on ``copy.deepcopy``.
_FX_PRESERVED_ATTRIBUTES_KEY = "_user_preserved_attributes"


def default_activation_bits(w_bits: int) -> int:
    """Activation bit width the specification pairs with ``w_bits``: the same, except W2 runs with A4.

    Args:
        w_bits: weight bit width.

    Returns:
        The activation bit width.

    Example:
        >>> default_activation_bits(8), default_activation_bits(4), default_activation_bits(2)
        (8, 4, 4)
    """
    return 4 if w_bits == 2 else w_bits


def prepare_cnn_quantization(
    model: nn.Module,
    w_bits: int = 8,
    a_bits: int | None = None,
    *,
    observer: CNNObserver = "mse",
) -> fx.GraphModule:
    """Build the uncalibrated fake-quantized graph of a ResNet-family ``model`` (spec §7.2), without calibrating.

    The result has exactly the module and buffer structure of :func:`quantize_cnn`'s result with the same arguments,
    so a calibrated ``state_dict`` saved from that result loads into it (``strict=True``) and gives the same logits:
    the quantizers' scales, zero points and enable flags (observers off, fake quantization on) are buffers. The
    quantizers start with observers **and** fake quantization on and unit scales, so run a calibration or load a
    state dict before using it.

    ``model`` itself is not modified (it is deep-copied).

    Args:
        model: a timm or torchvision ``ResNet`` (anything :func:`~zoa_lightning.core.layout.resolve_layout` resolves to
            a ``"cnn"`` layout and ``torch.fx`` can trace).
        w_bits: weight bit width of every conv/linear but the first conv and the classifier (8 bits), 2..8.
        a_bits: activation bit width of every activation quantizer but the input and classifier-input ones (8 bits),
            2..8; ``None`` takes :func:`default_activation_bits` (``w_bits``, but 4 for ``w_bits=2``: W2A4).
        observer: ``"mse"`` (the specification: ``MSEObserver`` weights, ``EMAMSEObserver`` activations) or
            ``"minmax"`` (``MinMaxObserver``/``EMAMinMaxObserver``, much faster; for tests).

    Returns:
        The prepared ``GraphModule`` in eval mode, with ``zoa_layout`` set.

    Raises:
        RuntimeError: under ``torch.inference_mode()``, or if MQBench folded or renamed a BatchNorm.
        ValueError: for an unsupported bit width or observer, or a model whose layout is not a CNN one.
    """
    _check_not_inference_mode("prepare_cnn_quantization")
    a_bits = default_activation_bits(w_bits) if a_bits is None else a_bits
    _check_bits(w_bits, a_bits)
    if observer not in _OBSERVERS:
        raise ValueError(f"observer must be one of {sorted(_OBSERVERS)}, got {observer!r}")
    plain = resolve_layout(model)
    if plain.kind != "cnn":
        raise ValueError(
            f"quantize_cnn handles ResNet-family CNNs; {type(model).__name__} resolves to a {plain.kind!r} layout "
            "(use the ViT quantizer for vision transformers)"
        )

    from mqbench.prepare_by_platform import BackendType, prepare_by_platform

    float_model = copy.deepcopy(model).eval()  # MQBench shares leaf modules and parameters with its input
    with _quiet_mqbench():
        graph_module = prepare_by_platform(float_model, BackendType.Academic, _prepare_config(w_bits, a_bits, observer))
    graph_module.eval()
    for module in graph_module.modules():
        if _is_observer(module):
            module.register_load_state_dict_pre_hook(_resize_observer_buffers)
    _attach_layout(graph_module, _quantized_layout(graph_module, plain))
    log.debug("prepared W%dA%d %s graph with %s observers", w_bits, a_bits, type(model).__name__, observer)
    return graph_module


def quantize_cnn(
    model: nn.Module,
    calib_images: Tensor,
    w_bits: int = 8,
    a_bits: int | None = None,
    *,
    observer: CNNObserver = "mse",
    adaround_iters: int = 20000,
    adaround_images: Tensor | None = None,
    adaround_batch_size: int = 64,
) -> fx.GraphModule:
    """Fake-quantize a ResNet-family CNN with MQBench's Academic backend, as specified in §7.2.

    Steps: :func:`prepare_cnn_quantization`; one forward pass over ``calib_images`` with observers on and the model
    in eval mode (BatchNorm uses its running statistics); for ``w_bits <= 4`` MQBench's layer-wise AdaRound
    reconstruction of every conv/linear, the 8-bit first conv and classifier included as in the reference (output MSE
    against the float model, Adam on the rounding variables, regulariser 0.01 after a 20 % warm-up with beta decaying
    from 20 to 2, no QDrop; rounding hardened into the stored weights at the end); then
    observers off and fake quantization on, so every interval is frozen. BatchNorm stays a separate float layer.

    AdaRound data: the reference *intends* 1,024 training images in batches of 64 but, through a loader caching bug,
    reconstructs on its 32 calibration images as a single batch (spec §9). Without ``adaround_images`` this function
    reproduces the reference (the calibration images, one batch); pass ``adaround_images`` for the evident intent
    (they are split into batches of ``adaround_batch_size``). Batches are drawn with a fixed NumPy seed; the global
    NumPy RNG state is restored afterwards.

    Works from ``torch.no_grad()`` callers (gradients are switched on inside for AdaRound). ``model`` is not
    modified.

    Args:
        model: a timm or torchvision ``ResNet`` in its final (pretrained) state.
        calib_images: calibration batch ``(N, C, H, W)``, normalised like the test data (spec: 32 training images).
        w_bits: weight bit width, 2..8 (first conv and classifier: 8).
        a_bits: activation bit width, 2..8 (input and classifier input: 8); ``None`` takes
            :func:`default_activation_bits` (W2 → A4).
        observer: ``"mse"`` (specification) or ``"minmax"`` (fast; tests).
        adaround_iters: AdaRound iterations per layer (spec: 20,000); only used for ``w_bits <= 4``.
        adaround_images: images for AdaRound; ``None`` reuses ``calib_images`` (reference behaviour).
        adaround_batch_size: batch size when ``adaround_images`` is given (spec intent: 64).

    Returns:
        The calibrated, frozen fake-quantized ``GraphModule`` in eval mode, with ``zoa_layout`` set.

    Raises:
        RuntimeError: under ``torch.inference_mode()`` (observer buffers would become inference tensors that a later
            ``load_state_dict`` or in-place update cannot touch; disable inference mode, e.g.
            ``Trainer(inference_mode=False)``), or if MQBench folded a BatchNorm.
        ValueError: for bad bit widths, observer, image tensors or iteration counts.

    Example::

        qmodel = quantize_cnn(resnet, calib_images, w_bits=4, observer="minmax", adaround_iters=50)
        torch.save(qmodel.state_dict(), "w4a4.pt")  # calibration cache
        again = prepare_cnn_quantization(resnet, w_bits=4, observer="minmax")
        again.load_state_dict(torch.load("w4a4.pt"))
    """
    _check_not_inference_mode("quantize_cnn")
    _check_images(calib_images, "calib_images")
    if adaround_images is not None:
        _check_images(adaround_images, "adaround_images")
    if adaround_iters < 1:
        raise ValueError(f"adaround_iters must be >= 1, got {adaround_iters}")
    if adaround_batch_size < 1:
        raise ValueError(f"adaround_batch_size must be >= 1, got {adaround_batch_size}")

    graph_module = prepare_cnn_quantization(model, w_bits, a_bits, observer=observer)
    layout = resolve_layout(graph_module)  # the zoa_layout just attached
    device = next(graph_module.parameters()).device

    from mqbench.utils.state import enable_calibration, enable_quantization

    with _quiet_mqbench():
        enable_calibration(graph_module)
        with torch.no_grad():
            graph_module(calib_images.to(device))
        if w_bits <= ADAROUND_MAX_BITS:
            if adaround_images is None:
                batches = [calib_images.to(device)]
            else:
                batches = list(adaround_images.to(device).split(adaround_batch_size))
            graph_module = _adaround(graph_module, batches, adaround_iters)
        enable_quantization(graph_module)
    graph_module.eval()
    _attach_layout(graph_module, layout)
    return graph_module


def _adaround(graph_module: fx.GraphModule, batches: list[Tensor], iterations: int) -> fx.GraphModule:
    """Run MQBench's layer-wise AdaRound reconstruction and return its (new) quantized model."""
    from mqbench.advanced_ptq import ptq_reconstruction
    from mqbench.fake_quantize import AdaRoundFakeQuantize

    config = _AttrDict(_ADAROUND_CONFIG, max_count=iterations)
    log.info("AdaRound reconstruction: %d iterations per layer on %d batch(es)", iterations, len(batches))
    numpy_state = np.random.get_state()
    np.random.seed(0)  # MQBench draws the batch of each iteration from NumPy's global RNG
    stdout = io.StringIO()  # MQBench prints one line per initialised layer
    try:
        with torch.enable_grad(), contextlib.redirect_stdout(stdout):
            quantized = ptq_reconstruction(graph_module, batches, config)
    finally:
        np.random.set_state(numpy_state)
    for name, module in quantized.named_modules():
        if isinstance(module, AdaRoundFakeQuantize):
            # The hardened rounding now lives in the layer's weight; the rounding variables are spent, and dropping
            # them keeps the state dict loadable into a freshly prepared graph.
            module.adaround = False
            if "alpha" in module._parameters:
                del module._parameters["alpha"]
            log.debug("AdaRound done for %s", name)
    return quantized


class _AttrDict(dict):
    """The attribute-access dict MQBench's ``ptq_reconstruction`` expects as its config."""

    def __getattr__(self, item: str) -> Any:
        try:
            return self[item]
        except KeyError as err:
            raise AttributeError(item) from err


def _prepare_config(w_bits: int, a_bits: int, observer: str) -> dict[str, Any]:
    """The ``prepare_custom_config_dict`` of spec §7.2 (the Academic backend needs both full qscheme dicts)."""
    w_observer, a_observer = _OBSERVERS[observer]
    return {
        "extra_qconfig_dict": {
            "w_observer": w_observer,
            "a_observer": a_observer,
            "w_fakequantize": "AdaRoundFakeQuantize" if w_bits <= ADAROUND_MAX_BITS else "FixedFakeQuantize",
            "a_fakequantize": "FixedFakeQuantize",
            "w_qscheme": {"bit": w_bits, "symmetry": False, "per_channel": True, "pot_scale": False},
            "a_qscheme": {"bit": a_bits, "symmetry": False, "per_channel": False, "pot_scale": False},
        }
    }


def _quantized_layout(graph_module: fx.GraphModule, plain: ModelLayout) -> ModelLayout:
    """Translate the float model's layout into module names of the prepared graph."""
    modules = dict(graph_module.named_modules())
    for name in dict.fromkeys((*plain.norms, *plain.batch_norms)):
        if not isinstance(modules.get(name), nn.BatchNorm2d):
            raise RuntimeError(
                f"BatchNorm {name!r} is missing from the quantized graph (found {type(modules.get(name)).__name__}): "
                "MQBench must not fold BatchNorm for ZOA; use the Academic backend"
            )
    nodes = list(graph_module.graph.nodes)
    detector = _output_node(nodes, plain.detector)
    if detector.op != "call_module":
        raise RuntimeError(f"the output of {plain.detector!r} is not produced by a module, so no hook can read it")
    taps = tuple(_after_fake_quantizer(_output_node(nodes, name), modules) for name in plain.taps)
    head = [n for n in nodes if n.op == "call_module" and n.target == plain.head]
    if len(head) != 1:
        raise RuntimeError(f"classifier {plain.head!r} is called {len(head)} times in the quantized graph, expected 1")
    head_input = head[0].args[0]
    if not (
        isinstance(head_input, fx.Node)
        and head_input.op == "call_module"
        and _is_fake_quantizer(modules[str(head_input.target)])
    ):
        log.warning("the input of %r is not fake-quantized; ZOA's final feature is then a float tensor", plain.head)
    layout = ModelLayout(
        kind="cnn",
        norms=plain.norms,
        detector=str(detector.target),
        taps=taps,
        head=plain.head,
        batch_norms=plain.batch_norms,
    )
    layout.check(graph_module)
    return layout


def _output_node(nodes: list[fx.Node], name: str) -> fx.Node:
    """The graph node that produces the output of the float model's module ``name`` (the last node traced in it)."""
    inside = [
        n
        for n in nodes
        if n.target == name
        or name in n.meta.get("nn_module_stack", {})
        or (n.op == "call_module" and str(n.target).startswith(f"{name}."))
    ]
    if not inside:
        raise RuntimeError(f"module {name!r} does not appear in the quantized graph")
    return inside[-1]


def _after_fake_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Name of the activation fake-quantizer that reads ``node``, or ``node``'s own module if none does."""
    quantizers = [u for u in node.users if u.op == "call_module" and _is_fake_quantizer(modules[str(u.target)])]
    if len(quantizers) == 1:
        return str(quantizers[0].target)
    if node.op == "call_module" and not quantizers:
        log.debug("no activation quantizer follows %s; tapping the module itself", node.target)
        return str(node.target)
    raise RuntimeError(f"cannot hook the output of graph node {node.name!r} ({len(quantizers)} quantizers follow it)")


def _attach_layout(graph_module: fx.GraphModule, layout: ModelLayout) -> None:
    """Set ``zoa_layout`` so that it also survives ``copy.deepcopy`` (which rebuilds a GraphModule from its graph)."""
    graph_module.zoa_layout = layout  # type: ignore[assignment]  # nn.Module.__getattr__ types attributes as tensors
    graph_module.meta.setdefault(_FX_PRESERVED_ATTRIBUTES_KEY, {})["zoa_layout"] = layout


def _is_fake_quantizer(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.quantization.FakeQuantizeBase)


def _is_observer(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.quantization.ObserverBase)


def _resize_observer_buffers(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: give an observer's ``min_val``/``max_val`` the saved shape (per-channel after calibration)."""
    for key in ("min_val", "max_val"):
        saved = state_dict.get(prefix + key)
        current = module._buffers.get(key)
        if isinstance(saved, Tensor) and current is not None and current.shape != saved.shape:
            module._buffers[key] = torch.empty_like(saved, dtype=current.dtype, device=current.device)


def _check_not_inference_mode(caller: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{caller} cannot run under torch.inference_mode(): the quantizer buffers it writes would become "
            "inference tensors that a later load_state_dict or in-place update rejects. Call it under "
            "torch.no_grad() instead (in Lightning: Trainer(inference_mode=False))"
        )


def _check_bits(w_bits: int, a_bits: int) -> None:
    low, high = MQBENCH_BITS
    for label, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
            raise ValueError(f"{label} must be an integer in {low}..{high}, got {bits!r}")


def _check_images(images: Tensor, label: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError(f"{label} must be a non-empty float tensor of shape (N, C, H, W)")


@contextlib.contextmanager
def _quiet_mqbench() -> Iterator[None]:
    """Lower MQBench's chatty stdout logger to warnings for the duration, unless this module logs at DEBUG."""
    from mqbench.utils.logger import logger as mqbench_logger

    level = mqbench_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        mqbench_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mqbench_logger.setLevel(level)
