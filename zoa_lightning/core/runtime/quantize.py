"""INT8 graphs with ONNX Runtime's own static quantizer: QDQ, per-channel int8 weights, uint8 activations.

:func:`quantize_graph` turns a float graph of :func:`~zoa_lightning.core.runtime.export.export_graph` into an integer
one, calibrated (min/max) on clean images fed in chunks of 8 with the pretrained values, no shift and no prior:

1. ``quant_pre_process`` (shape inference with ``auto_merge``, which the TorchScript export needs, and ONNX
   Runtime's graph optimisations);
2. ``quantize_static`` over the ``Conv`` and weight ``MatMul`` nodes: the attention products (activation times
   activation) stay float, and so does the classifier head (a ``Gemm``), so the head input, the activation shift
   and both logits are float. Norm layers, the per-row affine ``Mul``/``Add`` and every BatchNorm statistic are never
   quantized: what the engine sets per pass enters float operators only (:func:`quantized_value_paths` checks it).
   ``MatMul`` outputs are not re-quantized (ONNX Runtime then fuses ``MatMulIntegerToFloat``); ``Conv`` outputs are
   (``QLinearConv``);
3. :func:`float_readouts`: the quantizer points every consumer of a quantized tensor at its ``DequantizeLinear``; the
   read-outs only (the loss taps, the features, the detector sums) are pointed back at the float tensor, so the loss
   sees the network's float activations where they exist.

uint8 activations with int8 weights are what ONNX Runtime's x86 integer kernels (VNNI) run fastest.
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zoa_lightning.core.runtime import require
from zoa_lightning.core.runtime.metadata import METADATA_KEY, GraphMetadata, write_metadata

__all__ = [
    "CALIBRATION_CHUNK",
    "CalibrationFeeds",
    "float_readouts",
    "quantize_graph",
    "quantized_value_paths",
    "read_metadata",
]

CALIBRATION_CHUNK = 8
"""Calibration images per session call (a BatchNorm graph normalises each chunk with its own statistics)."""

_INTEGER_CONSUMERS = frozenset({"MatMul", "Gemm", "Conv", "QuantizeLinear"})


class CalibrationFeeds:
    """The calibration reader: chunks of the images with the pretrained values, no shift and no prior.

    Args:
        metadata: the float graph's metadata.
        images: clean calibration images ``(N, C, H, W)``.
        chunk: images per chunk.
    """

    def __init__(self, metadata: GraphMetadata, images: Tensor, chunk: int = CALIBRATION_CHUNK) -> None:
        self.feeds: list[dict[str, np.ndarray]] = []
        for part in images.float().split(chunk):
            feed = {"images": part.contiguous().numpy()}
            if metadata.adaptable:
                rows = part.shape[0]
                feed["params"] = np.repeat(metadata.base_values().numpy()[None], rows, 0)
                feed["shift"] = np.zeros((rows, metadata.tap_dims[-1]), np.float32)
                if metadata.batch_norm_channels:
                    feed["running"] = torch.cat([torch.cat(s) for s in metadata.running_starts()]).double().numpy()
                    feed["prior"] = np.zeros(1)
            self.feeds.append(feed)
        self._next = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next chunk's inputs (``None`` at the end)."""
        return next(self._next, None)

    def rewind(self) -> None:
        """Start again from the first chunk."""
        self._next = iter(self.feeds)


def _activation_matmuls(graph: Any) -> list[str]:
    """Names of the ``MatMul`` nodes whose operands are both activations (attention products): left float."""
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input[:2])]


def quantize_graph(float_path: str | Path, int8_path: str | Path, images: Tensor, key: str = "") -> GraphMetadata:
    """Write the INT8 (QDQ) version of a float graph, calibrated on ``images`` (see the module docstring).

    Args:
        float_path: a float graph of :func:`~zoa_lightning.core.runtime.export.export_graph`.
        int8_path: where to write the integer graph.
        images: clean calibration images (the data's ``calibration_images``).
        key: the cache key to record.

    Returns:
        The integer graph's metadata.

    Raises:
        ImportError: without onnx or onnxruntime.
        ValueError: if ``float_path`` has no zoa metadata or is quantized already.
    """
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    shape_inference = require("onnxruntime.quantization.shape_inference")
    metadata = read_metadata(float_path)
    if metadata.precision != "float":
        raise ValueError(f"{float_path} is quantized already: quantize its float graph")
    with tempfile.TemporaryDirectory() as folder:
        prepared, staged = Path(folder) / "prepared.onnx", Path(folder) / "qdq.onnx"
        shape_inference.quant_pre_process(str(float_path), str(prepared), auto_merge=True)
        quantization.quantize_static(
            str(prepared), str(staged), CalibrationFeeds(metadata, images),
            quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"], per_channel=True,
            weight_type=quantization.QuantType.QInt8, activation_type=quantization.QuantType.QUInt8,
            nodes_to_exclude=_activation_matmuls(onnx.load(str(prepared)).graph),
            extra_options={"ActivationSymmetric": False, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )  # fmt: skip
        graph = onnx.load(str(staged))
    float_readouts(graph)
    quantized = dataclasses.replace(metadata, precision="int8", key=key or metadata.key)
    write_metadata(graph, quantized)
    onnx.save(graph, str(int8_path))
    return quantized


def read_metadata(path: str | Path) -> GraphMetadata:
    """The :class:`GraphMetadata` of a graph file.

    Raises:
        ValueError: for a graph without zoa metadata.
    """
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False)
    text = next((p.value for p in graph.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        raise ValueError(f"{path} has no zoa metadata: it was not exported by zoa-lightning")
    return GraphMetadata.from_json(text, str(path))


def float_readouts(graph: Any) -> int:
    """Point the read-out consumers of every quantized activation back at its float tensor (in place).

    A consumer is a read-out when no ``QuantizeLinear`` is reachable from it (it feeds no quantized operator: a tap,
    the features, the detector sums). Consumers on the quantized compute path keep the dequantized values, so ONNX
    Runtime still fuses them into integer kernels.

    Args:
        graph: an ONNX ``ModelProto`` in QDQ format.

    Returns:
        How many consumer inputs were re-pointed.
    """
    nodes = list(graph.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    feeds_quantized: set[int] = set()
    stack = [n for n in nodes if n.op_type == "QuantizeLinear"]
    while stack:
        node = stack.pop()
        for name in node.input:
            before = producer.get(name)
            if before is not None and id(before) not in feeds_quantized:
                feeds_quantized.add(id(before))
                stack.append(before)
    changed = 0
    for dq in (n for n in nodes if n.op_type == "DequantizeLinear"):
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear
        for node in consumers[dq.output[0]]:
            if node.op_type in _INTEGER_CONSUMERS or id(node) in feeds_quantized:
                continue
            for k, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[k] = q.input[0]
                    changed += 1
    return changed


def quantized_value_paths(path: str | Path) -> list[str]:
    """Quantize/dequantize nodes between the inputs the engine sets per pass and their first arithmetic operator.

    Walks forward from ``params``, ``shift``, ``running`` and ``prior`` through shape and slicing operators to the
    first ``Mul``/``Add``/``Sub``/``Div`` or ``BatchNormalization``; lists every quantized node met on the way and every
    such arithmetic operator whose other operand is a ``DequantizeLinear`` output. An empty list: the adapted values
    enter float operators only. (A BatchNormalization reads its activation dequantized by design: it normalises the
    convolution's 8-bit output in float, with the statistics and affine the engine sets as float inputs.)
    """
    onnx = require("onnx")
    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    problems: list[str] = []
    for start in ("params", "shift", "running", "prior"):
        seen: set[int] = set()
        frontier = [start]
        while frontier:
            tensor = frontier.pop()
            for node in consumers[tensor]:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if "Quant" in node.op_type or node.op_type.startswith("QLinear") or "Integer" in node.op_type:
                    problems.append(f"{start} reaches {node.op_type} {node.name}")
                elif node.op_type == "BatchNormalization":
                    continue
                elif node.op_type in ("Mul", "Add", "Sub", "Div"):
                    others = (producer.get(i) for i in node.input if i != tensor)
                    if any(o is not None and o.op_type == "DequantizeLinear" for o in others):
                        problems.append(f"{start} meets a dequantized operand at {node.op_type} {node.name}")
                else:
                    frontier.extend(node.output)
    return problems
