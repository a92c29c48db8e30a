"""INT8 graphs: quantized where ONNX Runtime runs integer kernels, float where the engine reads or writes values."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from tests.core.runtime.conftest import GraphFactory
from tests.helpers import corrupt_noise
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.runtime.network import QUANTIZED_OPS, RuntimeNetwork
from zoa_lightning.core.runtime.quantize import quantize_graph, quantized_value_paths


def _nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("net", ["vit", "resnet"])
def test_int8_graph_quantizes_weights_and_leaves_the_adapted_values_float(graph: GraphFactory, net: str) -> None:
    path = graph(net, "int8")
    nodes = _nodes(path)
    producer = {o: n for n in nodes for o in n.output}
    assert sum(n.op_type == "DequantizeLinear" for n in nodes) > 10
    assert quantized_value_paths(path) == []  # params, shift, running, prior meet float operators only
    assert quantized_value_paths(graph(net, "float")) == []
    read_outs = [n for n in nodes if n.op_type == "Concat" and "features" in n.output]
    for node in read_outs:  # the loss features read float tensors, not dequantized 8-bit ones
        assert not any(producer[i].op_type == "DequantizeLinear" for i in node.input if i in producer)
    heads = [n for n in nodes if n.op_type == "Gemm"]
    assert heads, "the classifier head stays a float Gemm"
    assert not any(producer.get(n.input[1]) is not None and "Quant" in producer[n.input[1]].op_type for n in heads)
    assert not any(n.op_type in QUANTIZED_OPS for n in _nodes(graph(net, "float")))


@pytest.mark.parametrize("net", ["vit", "resnet"])
def test_int8_engine_adapts_and_predicts_like_the_float_graph(
    graph: GraphFactory, digits: torch.Tensor, net: str
) -> None:
    config = ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, detector_min_batch=32)
    engines = [ZOA(RuntimeNetwork(graph(net, precision)), config) for precision in ("float", "int8")]
    for engine in engines:
        engine.collect_source_statistics(digits[:128].split(32))
    similar = []
    for i in range(8):
        images = digits[256 + 32 * i :][:32]
        images = corrupt_noise(images, seed=i) if i >= 3 else images
        logits = [engine(images) for engine in engines]
        assert bool(torch.isfinite(logits[1]).all())
        if i < 3:  # (noise takes the images out of the calibrated range: there INT8 differs by design)
            similar.append(float(torch.nn.functional.cosine_similarity(logits[0], logits[1]).mean()))
    assert min(similar) > 0.95, similar  # (tiny random networks: near ties make argmax agreement a poor measure)
    assert engines[1].counter("stores") >= 1
    assert engines[1].counter("forward_passes") == 16
    assert float(engines[1].bank.theta.abs().max()) > 0


def test_quantizing_an_int8_graph_again_is_refused(graph: GraphFactory, digits: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is quantized already: quantize its float graph"):
        quantize_graph(graph("vit", "int8"), tmp_path / "x.onnx", digits[:8])
