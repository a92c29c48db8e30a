"""The exported graph computes the engine's pass: per-row values, shift, taps, detector sums, BatchNorm statistics."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import onnx
import pytest
import torch

from tests.core.runtime.conftest import GraphFactory
from tests.helpers import make_resnet, make_vit
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.detector import DetectorSums, detector_sums
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.runtime import INSTALL_HINT
from zoa_lightning.core.runtime.metadata import METADATA_KEY, GraphMetadata, write_metadata
from zoa_lightning.core.runtime.network import RuntimeNetwork
from zoa_lightning.core.stats import identity_reduce

MAKE = {"vit": make_vit, "resnet": make_resnet}


def _passes(engine: ZOA, images: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """One recorded pass of ``engine`` with per-image values ``rows`` (theta) and a shift: what the graph outputs."""
    seen: list[torch.Tensor] = []
    engine.taps.on_detector = lambda out, record: seen.append(detector_sums(  # type: ignore[attr-defined]
        out, engine.layout.kind, engine.layout.num_prefix_tokens, identity_reduce))  # fmt: skip
    k = engine.bank.num_entries
    with torch.no_grad(), engine.bank.evaluated_at(engine.bank.alpha[:k].expand(len(images), k), rows):
        logits, record = engine.taps.run(images, "source", 0, shift)
    assert record.shifted is not None
    return {"logits": logits, "shifted": record.shifted, "features": record.features(), "detector": seen[0]}


@pytest.mark.parametrize(("net", "prior"), [("vit", None), ("resnet", None), ("resnet", 16.0)])
def test_graph_pass_equals_the_torch_engines_pass(
    graph: GraphFactory, digits: torch.Tensor, net: str, prior: float | None
) -> None:
    torch_engine = ZOA(MAKE[net](0), ZOAConfig())
    runtime_engine = ZOA(RuntimeNetwork(graph(net, "float")), ZOAConfig())
    images = digits[:12]
    theta = 0.05 * torch.randn(12, torch_engine.bank.size, generator=torch.Generator().manual_seed(1))
    if net == "resnet":  # a BatchNorm graph takes one affine per call (the per-sample estimator is refused there)
        theta = theta[:1].expand(12, -1)
    shift = 0.1 * torch.randn(torch_engine.final_dim, generator=torch.Generator().manual_seed(2))
    got = {}
    for engine in (torch_engine, runtime_engine):
        engine.batch_statistics.prior, engine.batch_statistics.record = prior, prior is not None
        got[engine] = _passes(engine, images, theta, shift)
    want, have = got[torch_engine], got[runtime_engine]
    for key in ("logits", "shifted", "features"):
        torch.testing.assert_close(have[key], want[key], rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(have["detector"], want["detector"], rtol=1e-6, atol=1e-4)
    mine, theirs = runtime_engine.batch_statistics._pending, torch_engine.batch_statistics._pending
    assert len(mine) == len(theirs) == (len(torch_engine.layout.batch_norms) if prior else 0)
    pairs = zip(sorted(mine, key=lambda t: t[0]), sorted(theirs, key=lambda t: t[0]), strict=True)
    for (o1, m1, v1, n1), (o2, m2, v2, n2) in pairs:
        assert (o1, n1) == (o2, n2)
        torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-6)


def test_a_batch_norm_graph_refuses_different_values_per_image(graph: GraphFactory, digits: torch.Tensor) -> None:
    engine = ZOA(RuntimeNetwork(graph("resnet", "float")), ZOAConfig())
    k = engine.bank.num_entries
    rows = 0.05 * torch.randn(4, engine.bank.size, generator=torch.Generator().manual_seed(1))
    alpha = engine.bank.alpha[:k].expand(4, k)
    with torch.no_grad(), engine.bank.evaluated_at(alpha, rows), pytest.raises(ValueError, match="one affine per call"):
        engine.taps.run(digits[:4], "source", 0, None)
    with torch.no_grad(), engine.bank.evaluated_at(alpha, rows[:1].expand(4, -1)):
        logits, _ = engine.taps.run(digits[:4], "source", 0, None)  # the same values on every row: one affine
    assert torch.isfinite(logits).all()


def test_batch_moments_stay_exact_over_repeated_calls(graph: GraphFactory, digits: torch.Tensor) -> None:
    # the moments come from an ONNX BatchNormalization node in training mode: pin them against float64 over calls
    # of different batches and sizes (a kernel that kept state between calls, or read a stale buffer, would show)
    network = RuntimeNetwork(graph("resnet", "float"))
    engine = ZOA(make_resnet(0), ZOAConfig())
    runtime_engine = ZOA(network, ZOAConfig())
    for size, start in ((12, 0), (5, 12), (12, 20), (3, 3)):
        images = digits[start : start + size]
        for e in (engine, runtime_engine):
            e.batch_statistics.prior, e.batch_statistics.record = 4.0, True
            with torch.no_grad():
                e.taps.run(images, "source", 0, None)
        mine = sorted(runtime_engine.batch_statistics._pending, key=lambda t: t[0])
        theirs = sorted(engine.batch_statistics._pending, key=lambda t: t[0])
        assert len(mine) == len(theirs) == len(engine.layout.batch_norms) > 0
        for (_, m1, v1, _), (_, m2, v2, _) in zip(mine, theirs, strict=True):
            torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)  # float32 moments in the graph
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
        for e in (engine, runtime_engine):
            e.batch_statistics.end_batch()


def test_one_value_per_channel_uses_a_prior_of_one_as_the_engine(graph: GraphFactory, digits: torch.Tensor) -> None:
    engines = [ZOA(make_resnet(0), ZOAConfig()), ZOA(RuntimeNetwork(graph("resnet", "float")), ZOAConfig())]
    sizes: list[tuple[int, ...]] = []
    engines[0].model.layer4.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape)))
    logits = [e.predict(digits[:1]) for e in engines]
    assert sizes[0][2:] == (1, 1)  # one image of a 1x1 map: one value per channel in the last stage's BatchNorms
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net", ["vit", "resnet"])
def test_metadata_carries_the_pretrained_values_and_source_statistics(graph: GraphFactory, net: str) -> None:
    runtime = RuntimeNetwork(graph(net, "float"))
    engine = ZOA(MAKE[net](0), ZOAConfig())
    meta = runtime.metadata
    assert meta.layout == engine.layout
    assert torch.equal(meta.base_values(), engine.bank.base)
    starts = torch.cat([torch.cat(s) for s in meta.running_starts()]).double() if meta.running_starts() else None
    assert starts is None or torch.equal(starts, engine.batch_statistics.running)
    assert list(meta.tap_dims) == engine.loss.tap_dims
    assert meta.detector_channels == engine.detector.mean.numel()
    assert GraphMetadata.from_json(meta.to_json(), "x") == meta
    assert "base" not in meta.describe()


@pytest.mark.parametrize("net", ["vit", "resnet"])
def test_plain_graph_predicts_as_the_network(graph: GraphFactory, digits: torch.Tensor, net: str) -> None:
    runtime = RuntimeNetwork(graph(f"{net}-plain", "float"))
    with torch.no_grad():
        torch.testing.assert_close(runtime(digits[:9]), MAKE[net](0)(digits[:9]), rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"plain graph .* without the adaptation inputs params, shift"):
        ZOA(runtime, ZOAConfig())
    with pytest.raises(ValueError, match=r"takes images of shape \(B, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        runtime(digits[:2, :, :16, :16])


def _rewrite(source: Path, target: Path, edit: str) -> Path:
    model = onnx.load(str(source))
    meta = GraphMetadata.from_json(next(p.value for p in model.metadata_props if p.key == METADATA_KEY), "x")
    if edit == "no-metadata":
        del model.metadata_props[:]
    elif edit == "no-features":
        outputs = [o for o in model.graph.output if o.name != "features"]
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    elif edit == "says-int8":
        write_metadata(model, dataclasses.replace(meta, precision="int8"))
    elif edit == "says-float":
        write_metadata(model, dataclasses.replace(meta, precision="float"))
    elif edit == "old-version":
        write_metadata(model, dataclasses.replace(meta, version=0))
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    ("edit", "precision", "match"),
    [
        ("no-metadata", "float", "has no zoa metadata: it was not exported by zoa-lightning"),
        ("no-features", "float", "lacks the graph output features: export it again"),
        ("says-int8", "float", "says precision int8 but has no quantized nodes"),
        ("says-float", "int8", r"says precision float but has quantized \(QDQ\) nodes"),
        ("old-version", "float", "its zoa metadata cannot be read .*format version 0"),
    ],
)
def test_graphs_that_do_not_fit_are_refused_naming_what_is_wrong(
    graph: GraphFactory, tmp_path: Path, edit: str, precision: str, match: str
) -> None:
    path = _rewrite(graph("vit", precision), tmp_path / "g.onnx", edit)
    with pytest.raises(ValueError, match=match) as info:
        RuntimeNetwork(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_onnxruntime_is_named_with_the_extra(graph: GraphFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = graph("vit", "float")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs the onnxruntime package, which is not installed") as info:
        RuntimeNetwork(path)
    assert INSTALL_HINT in str(info.value)


def test_detector_sums_pass_through_the_reduce_as_given() -> None:
    values = torch.arange(6, dtype=torch.float64)
    assert torch.equal(detector_sums(DetectorSums(values), "vit", 1, lambda t: 2 * t), 2 * values)


def test_export_leaves_the_torch_network_unchanged(tmp_path: Path, digits: torch.Tensor) -> None:
    from zoa_lightning.core.runtime.export import export_graph

    net = make_resnet(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = [type(m) for m in net.modules()]
    export_graph(net, resolve_layout(net), digits[:4], tmp_path / "g.onnx")
    assert [type(m) for m in net.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_project_imports_without_onnx_and_says_which_extra_runs_the_backend(tmp_path: Path) -> None:
    import subprocess

    script = (
        "import sys\n"
        "sys.modules['onnx'] = sys.modules['onnxruntime'] = None  # as if neither were installed\n"
        "import cli, callbacks, zoa_lightning.core.runtime.graphs, zoa_lightning.core.runtime.network\n"
        "from callbacks import OnnxRuntimeCallback\n"
        "try:\n"
        "    OnnxRuntimeCallback().setup(None, None, 'test')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == (
        f"the ONNX Runtime backend needs the onnxruntime package, which is not installed: {INSTALL_HINT}"
    )
