"""Export a network ZOA adapts to an ONNX graph that reads the adapted values from its inputs (docs/runtime.md).

The graph is stateless: the engine keeps every piece of ZOA's state (bank, detector, shift, source statistics) and
gives the graph, per call, what its adapted layers use. :class:`ExportedNetwork` is the network as the graph computes
it, a copy of the torch network with

* every adapted LayerNorm normalising without affine and then applying one affine per row of ``params``
  (:class:`RowAffineLayerNorm`, the engine's fused layer with one value row per image);
* every BatchNorm normalising with the statistics of the call's images, mixed with the running estimate ``running``
  by the prior strength ``prior`` (0: the batch alone; one value per channel: a prior of 1), its affine from the
  first row of ``params`` if it is adapted (:class:`GraphBatchNorm`, the engine's
  :class:`~zoa_lightning.core.batch_norm.BatchStatistics` rules), and its batch mean and variance an output;
* forward hooks on the layout's taps, head and detector (as :class:`~zoa_lightning.core.taps.NetworkTaps`) that make
  the loss features, the shifted logits and the detector's per-image sums outputs.

One call is one pass: pass A and pass B are two calls, so the BatchNorm statistics of a call are those of its pass.
:func:`export_graph` writes it with the TorchScript exporter (opset 17, one dynamic ``rows`` dimension), together
with its :class:`~zoa_lightning.core.runtime.metadata.GraphMetadata`; ``layout=None`` exports the plain network
(images to logits: what runs without adaptation).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.batch_norm import post_norm, running_statistics
from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.runtime import require
from zoa_lightning.core.runtime.metadata import (
    ADAPTATION_INPUTS,
    ADAPTATION_OUTPUTS,
    BATCH_NORM_INPUTS,
    GraphMetadata,
    write_metadata,
)
from zoa_lightning.core.taps import NetworkTaps

__all__ = ["OPSET", "ExportedNetwork", "GraphBatchNorm", "RowAffineLayerNorm", "export_graph"]

OPSET = 17
"""ONNX opset of the exported graphs (the first with ``LayerNormalization``)."""


class _Pass:
    """What the graph's modules read and write during one traced forward (a plain holder, not a module)."""

    def __init__(self) -> None:
        self.params: Tensor | None = None
        self.running: Tensor | None = None
        self.prior: Tensor | None = None
        self.taps: list[Tensor] = []
        self.head_input: Tensor | None = None
        self.detector: Tensor | None = None
        self.bn_stats: list[tuple[int, Tensor]] = []  # (running offset, [mean, var])
        self.recording = False


def _row_values(inputs: _Pass, offset: int, width: int) -> tuple[Tensor, Tensor]:
    """The ``(rows, width)`` weight and bias columns of one adapted layer in ``params``."""
    assert inputs.params is not None
    return inputs.params[:, offset : offset + width], inputs.params[:, offset + width : offset + 2 * width]


class RowAffineLayerNorm(nn.Module):
    """A LayerNorm without affine, then one affine per row read from the graph's ``params`` input.

    Args:
        norm: the replaced LayerNorm.
        inputs: the traced pass's inputs.
        offset: where the layer's values start in ``params``.
    """

    _inputs: _Pass

    def __init__(self, norm: nn.LayerNorm, inputs: _Pass, offset: int) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), float(norm.eps)
        self.width, self.offset = int(norm.normalized_shape[-1]), offset
        object.__setattr__(self, "_inputs", inputs)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dimension, then ``x · weight[row] + bias[row]``."""
        weight, bias = _row_values(self._inputs, self.offset, self.width)
        shape = (-1,) + (1,) * (x.ndim - 2) + (self.width,)
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * weight.reshape(shape) + bias.reshape(
            shape
        )


class _BatchMoments(torch.autograd.Function):
    """The per-channel mean and biased variance of ``x`` ``(rows, C, H, W)`` over its rows and positions, float32.

    Exported as one ``BatchNormalization`` node in training mode with momentum 0, whose running mean and variance
    outputs are then the batch's own: ONNX Runtime computes both in one float32 kernel (about 0.8 ms per million
    values on one core, against about 4 ms for the same moments as casts, squares and float64 reductions), within
    1e-6 of float64 on activations whose mean is a few standard deviations. The node's normalised output is left
    unused: in training mode ONNX Runtime 1.32's CPU kernel does not compute it reliably once a later node reads it
    (its values drift from call to call); the moments are checked over repeated calls by
    ``tests/core/runtime/test_export.py``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, channels: int) -> tuple[Tensor, Tensor]:
        """The moments as the graph computes them (accumulated in float64 here)."""
        wide = x.double()
        mean = wide.mean((0, 2, 3))
        var = (wide - mean.view(1, channels, 1, 1)).square().mean((0, 2, 3))
        return mean.to(x.dtype), var.to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, channels: int) -> tuple[Any, Any]:
        """One ``BatchNormalization`` (training mode, momentum 0); its running mean and variance are the moments."""
        ones = g.op("Constant", value_t=torch.ones(channels))
        zeros = g.op("Constant", value_t=torch.zeros(channels))
        _, mean, var = g.op(
            "BatchNormalization", x, ones, zeros, zeros, ones,
            epsilon_f=1e-5, momentum_f=0.0, training_mode_i=1, outputs=3,
        )  # fmt: skip
        return mean, var


class GraphBatchNorm(nn.Module):
    """A BatchNorm2d on the statistics of the call's images, mixed with a running estimate by a prior.

    ``prior = 0`` normalises with the batch's mean and biased variance; ``prior = N₀ > 0`` mixes them with the
    running estimate ``r`` as :meth:`~zoa_lightning.core.batch_norm.BatchStatistics.normalize` does,
    ``(N₀·r + n·batch) / (N₀ + n)`` with the spread of the two means in the variance; a call with one value per
    channel and no prior uses a prior of 1. The batch's ``[mean, var]`` (float64) is appended to the ``bn_stats``
    output.

    In the graph the layer is two kernels over the activation: the batch moments (:class:`_BatchMoments`) and an
    inference ``BatchNormalization`` with the mixed statistics and the affine; the mixing runs on the ``(C,)``
    statistics in float64. An adapted layer reads its affine from the **first row** of ``params``: a BatchNorm
    normalises the whole call with one set of statistics, and ZOA gives every image of a pass the same values on
    BatchNorm networks (the per-sample estimator, whose rows differ, is refused there), so one affine per call keeps
    the layer a single kernel instead of a per-row ``Mul`` and ``Add`` over the activation.

    Args:
        norm: the replaced BatchNorm2d.
        inputs: the traced pass's inputs.
        running_offset: where the layer's ``[mean C, var C]`` sit in ``running``.
        param_offset: where an adapted layer's values start in ``params`` (``None``: the layer's own affine).
    """

    _inputs: _Pass

    def __init__(self, norm: nn.BatchNorm2d, inputs: _Pass, running_offset: int, param_offset: int | None) -> None:
        super().__init__()
        self.channels, self.eps = int(norm.num_features), float(norm.eps)
        self.running_offset, self.param_offset = running_offset, param_offset
        own = param_offset is None and norm.weight is not None and norm.bias is not None
        weight = norm.weight.detach().clone() if own else torch.ones(self.channels)
        bias = norm.bias.detach().clone() if own else torch.zeros(self.channels)
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.post = post_norm(norm)
        object.__setattr__(self, "_inputs", inputs)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``(rows, C, H, W)``, then the affine and what the replaced layer applied after it."""
        inputs, c = self._inputs, self.channels
        assert inputs.running is not None
        assert inputs.prior is not None
        batch_mean, batch_var = (m.double() for m in _BatchMoments.apply(x, c))
        inputs.bn_stats.append((self.running_offset, torch.cat([batch_mean, batch_var])))
        images = torch.ones_like(x[:, 0, 0, 0]).double().sum()  # the row count as a tensor, so it stays dynamic
        prior = inputs.prior
        if x.shape[2] * x.shape[3] == 1:  # (the image size is fixed in the graph) one image is one value per channel
            prior = prior + (prior == 0).double() * (images == 1).double()
        running = inputs.running[self.running_offset : self.running_offset + 2 * c]
        weight = images / (images + prior)
        spread = weight * (1 - weight) * (batch_mean - running[:c]).square()
        mean = weight * batch_mean + (1 - weight) * running[:c]
        var = weight * batch_var + (1 - weight) * running[c:] + spread
        if self.param_offset is not None:
            scale, shift = (values[0] for values in _row_values(inputs, self.param_offset, c))  # the first row's
        else:
            scale, shift = self.weight, self.bias
        out = F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), scale, shift, False, 0.0, self.eps)
        return out if self.post is None else self.post(out)


class ExportedNetwork(nn.Module):
    """The network as an adaptable graph computes it: ``forward(images, params, shift[, running, prior])``.

    Returns the outputs named by :data:`~zoa_lightning.core.runtime.metadata.ADAPTATION_OUTPUTS` (and ``bn_stats``
    for a network with BatchNorms). The torch network is copied, not modified.

    Args:
        model: the (float) network.
        layout: where ZOA acts in it.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout) -> None:
        super().__init__()
        layout.check(model)
        model = copy.deepcopy(model).eval().requires_grad_(False)
        self.layout, self.inputs = layout, _Pass()
        modules = dict(model.named_modules())
        widths, bases, offsets, offset = [], [], {}, 0
        for name in layout.norms:
            norm = modules[name]
            if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
                raise ValueError(f"norm layer {name!r} has no affine weight and bias to adapt")
            widths.append(int(norm.weight.numel()))
            bases.append(torch.cat([norm.weight.detach().reshape(-1), norm.bias.detach().reshape(-1)]).float())
            offsets[name] = offset
            offset += 2 * widths[-1]
        # BatchNorms in the engine's order: the adapted ones (layout order), then the others (network order)
        batch_norms = [n for n in layout.norms if isinstance(modules[n], nn.BatchNorm2d)]
        others = [n for n in layout.batch_norms if n not in batch_norms]
        batch_norms += [n for n in others if isinstance(modules[n], nn.BatchNorm2d)]
        starts, running_offset = [], 0
        for name in dict.fromkeys([*layout.norms, *batch_norms]):
            norm = modules[name]
            replacement: nn.Module
            if isinstance(norm, nn.LayerNorm):
                replacement = RowAffineLayerNorm(norm, self.inputs, offsets[name])
            else:
                assert isinstance(norm, nn.BatchNorm2d)
                replacement = GraphBatchNorm(norm, self.inputs, running_offset, offsets.get(name))
                source = running_statistics(norm)
                c = norm.num_features
                mean, var = source if source is not None else (torch.zeros(c), torch.ones(c))
                starts.append(torch.cat([mean.detach().reshape(-1), var.detach().reshape(-1)]).float())
                running_offset += 2 * c
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
        self.model, self.widths = model, tuple(widths)
        self.base = torch.cat(bases)
        self.batch_norm_channels = tuple(int(s.numel()) // 2 for s in starts)
        self.running = torch.cat(starts).double() if starts else torch.zeros(0, dtype=torch.float64)
        get = model.get_submodule
        get(layout.detector).register_forward_hook(self._detector_hook)
        for name in layout.taps:
            get(name).register_forward_hook(self._tap_hook)
        get(layout.head).register_forward_pre_hook(self._head_hook)
        self.head = get(layout.head)
        self.eval()

    @property
    def uses_batch_norm(self) -> bool:
        """Whether the graph has BatchNorms (the ``running`` and ``prior`` inputs, the ``bn_stats`` output)."""
        return bool(self.batch_norm_channels)

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs, in ``forward`` order."""
        return [*ADAPTATION_INPUTS, *(BATCH_NORM_INPUTS if self.uses_batch_norm else ())]

    @property
    def output_names(self) -> list[str]:
        """The graph's outputs, in ``forward`` order."""
        return [*ADAPTATION_OUTPUTS, *(("bn_stats",) if self.uses_batch_norm else ())]

    def _tap_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self.inputs.recording:
            self.inputs.taps.append(NetworkTaps.tap_feature(self.layout, output))

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.inputs.recording and self.inputs.head_input is None:
            self.inputs.head_input = args[0].flatten(1)

    def _detector_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self.inputs.recording:
            self.inputs.detector = output

    def forward(self, images: Tensor, params: Tensor, shift: Tensor, *running_prior: Tensor) -> tuple[Tensor, ...]:
        """The graph's outputs for one pass (see the class docstring)."""
        inputs = self.inputs
        inputs.params, inputs.taps, inputs.head_input, inputs.detector, inputs.bn_stats = params, [], None, None, []
        inputs.running, inputs.prior = running_prior if running_prior else (None, None)
        inputs.recording = True
        try:
            logits = self.model(images)
        finally:
            inputs.recording = False
        final, detector = inputs.head_input, inputs.detector
        assert final is not None
        assert detector is not None
        shifted = self.head(final + shift)
        features = torch.cat([*inputs.taps, final], 1)
        if self.layout.kind == "vit":
            detector, dims = detector[:, self.layout.num_prefix_tokens :], (1,)
        else:
            dims = (2, 3)
        detector = detector.float()  # float32 squares, float64 sums (as stats.channel_moments)
        sums = detector.double().sum(dims), (detector * detector).double().sum(dims)
        outputs = (logits, shifted, features, *sums)
        if not self.uses_batch_norm:
            return outputs
        return (*outputs, torch.cat([stats for _, stats in sorted(inputs.bn_stats, key=lambda s: s[0])]))

    def example(self, rows: int, images: Tensor) -> tuple[Tensor, ...]:
        """Example inputs of ``rows`` rows: ``images`` (repeated to ``rows``), the base values, no shift, no prior."""
        x = images[:1].expand(rows, *images.shape[1:]).contiguous()
        args: tuple[Tensor, ...] = (x, self.base.expand(rows, -1).contiguous(), torch.zeros(rows, self.head_width))
        if self.uses_batch_norm:
            args += (self.running.clone(), torch.zeros(1, dtype=torch.float64))
        return args

    @property
    def head_width(self) -> int:
        """``D``: the width of the head input (the final features and the activation shift)."""
        weight = getattr(self.head, "in_features", None)
        if weight is None:
            raise ValueError(f"the head {self.layout.head!r} is not a Linear layer; cannot size the shift input")
        return int(weight)


def export_graph(
    model: nn.Module,
    layout: ModelLayout | None,
    images: Tensor,
    path: str | Path,
    *,
    first_taps: list[int] | None = None,
    key: str = "",
) -> GraphMetadata:
    """Write ``model`` as a float ONNX graph (adaptable for ``layout``, plain for ``None``) with its metadata.

    Args:
        model: the float torch network (not modified).
        layout: where ZOA acts, or ``None`` for the plain network (images to logits).
        images: one or more example images ``(N, C, H, W)``: the graph takes this image size.
        path: the ``.onnx`` file to write.
        first_taps: for each adapted layer, the first loss tap computed after it (default: found with the network).
        key: the cache key to record.

    Returns:
        The metadata written into the graph.

    Raises:
        ImportError: without onnx (naming the extra).
    """
    onnx = require("onnx")
    model = model.eval()
    size = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    with torch.no_grad():
        logits = model(images[:2])
    common: dict[str, Any] = {"num_classes": int(logits.shape[-1]), "input_size": size, "key": key}
    common["network"] = type(model).__name__
    if layout is None:
        metadata = GraphMetadata(precision="float", **common)
        _export(model, (images[:2],), path, ["images"], ["logits"], {"images": {0: "rows"}, "logits": {0: "rows"}})
    else:
        wrapper = ExportedNetwork(model, layout)
        with torch.no_grad():
            outs = wrapper(*wrapper.example(2, images))
        taps = [int(NetworkTaps.tap_feature(layout, t).shape[1]) for t in _tap_outputs(model, layout, images[:2])]
        rows = [*wrapper.input_names[:3], *wrapper.output_names[:5]]
        axes = {name: {0: "rows"} for name in rows}
        _export(wrapper, wrapper.example(2, images), path, wrapper.input_names, wrapper.output_names, axes)
        if first_taps is None:
            first_taps = NetworkTaps(copy.deepcopy(model), layout, lambda *_: None).first_taps(images[:2], layout.norms)
        metadata = GraphMetadata(
            precision="float", **common, layout=layout, tap_dims=(*taps, int(outs[2].shape[1]) - sum(taps)),
            detector_channels=int(outs[3].shape[1]), detector_values=_detector_values(model, layout, images[:1]),
            widths=wrapper.widths, base=GraphMetadata.encode(wrapper.base),
            batch_norm_channels=wrapper.batch_norm_channels, running=GraphMetadata.encode(wrapper.running),
            first_taps=tuple(first_taps),
        )  # fmt: skip
    graph = onnx.load(str(path))
    write_metadata(graph, metadata)
    onnx.save(graph, str(path))
    return metadata


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: str | Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    """``torch.onnx.export`` with the TorchScript exporter at :data:`OPSET`, its warnings silenced."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and timm's trace-time size assertions
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs, output_names=outputs,
            dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip


def _tap_outputs(model: nn.Module, layout: ModelLayout, images: Tensor) -> list[Tensor]:
    """The raw outputs of the layout's tap modules on ``images``, in network order."""
    seen: list[Tensor] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out: seen.append(out)) for n in layout.taps]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _detector_values(model: nn.Module, layout: ModelLayout, image: Tensor) -> int:
    """Values per channel and image in the detector sums: patch tokens (ViT) or pixels (CNN)."""
    seen: list[Tensor] = []
    handle = model.get_submodule(layout.detector).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(image)
    finally:
        handle.remove()
    out = seen[0]
    return int(out.shape[1] - layout.num_prefix_tokens) if layout.kind == "vit" else int(out.shape[2] * out.shape[3])
