"""The ONNX Runtime backend under Lightning: Trainer.test, the CLI (zoa export, zoa test), resume, refusals, DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import yaml

from callbacks import OnnxRuntimeCallback, QuantizationCallback, StreamCheckpoint
from cli import main, resolved_config
from tests.helpers import make_resnet, make_stream, make_trainer, make_vit
from zoa_lightning import NoAdaptModule, ZOAModule
from zoa_lightning.core.runtime.network import RuntimeNetwork
from zoa_lightning.methods.tent import TentModule

ROOT = Path(__file__).resolve().parents[2]


class _Record(pl.Callback):
    """Keep every batch's logits, and the adapted values after it."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.theta: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.logits.append(outputs.detach().clone())
        bank = getattr(pl_module.adapter, "bank", None)  # type: ignore[attr-defined]
        if bank is not None:
            self.theta.append(bank.theta.clone())


def _zoa(net: str = "vit", **options: Any) -> ZOAModule:
    network = make_vit(0) if net == "vit" else make_resnet(0)
    return ZOAModule(network=network, detector_min_batch=16, source_batches=2, **options)


def test_zoa_and_no_adapt_run_on_the_int8_graph(cache_dir: Path, tmp_path: Path) -> None:
    runtime = OnnxRuntimeCallback(cache_dir=str(tmp_path))
    module = _zoa()
    make_trainer([runtime], batches=2).test(module, datamodule=make_stream(cache_dir, batch_size=32))
    assert isinstance(module.get_network(), RuntimeNetwork)
    assert module.run_info()["bits"] == "W8A8-ORT"
    assert runtime.last_cache_hit is False
    assert all(r["forward_passes"] == 4 and r["batches"] == 2 for r in module.stream_results())
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.glob("*.onnx")) == ["float.onnx", "int8.onnx"]

    again = OnnxRuntimeCallback(cache_dir=str(tmp_path))
    make_trainer([again], batches=1).test(_zoa(), datamodule=make_stream(cache_dir, batch_size=32))
    assert again.last_cache_hit is True

    plain = NoAdaptModule(network=make_vit(0))
    make_trainer([OnnxRuntimeCallback(cache_dir=str(tmp_path))], batches=1).test(
        plain, datamodule=make_stream(cache_dir)
    )
    assert plain.get_network().metadata.layout is None  # the plain graph  # type: ignore[union-attr]
    assert [r["forward_passes"] for r in plain.stream_results()] == [1, 1, 1]


def test_float_graph_under_a_trainer_follows_the_torch_run(cache_dir: Path, tmp_path: Path) -> None:
    runs = []
    for callbacks in ([], [OnnxRuntimeCallback(precision="float", cache_dir=str(tmp_path))]):
        record = _Record()
        make_trainer([record, *callbacks], batches=3).test(
            _zoa("resnet"), datamodule=make_stream(cache_dir, batch_size=16)
        )
        runs.append(record)
    for want, got in zip(runs[0].theta, runs[1].theta, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for want, got in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_resuming_a_killed_run_on_the_runtime_backend_is_exact(cache_dir: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "graphs")
    full = _Record()
    make_trainer([full, OnnxRuntimeCallback(cache_dir=cache)], batches=3).test(
        _zoa(), datamodule=make_stream(cache_dir, batch_size=32)
    )
    first = _Record()
    stop = [first, OnnxRuntimeCallback(cache_dir=cache), StreamCheckpoint(dirpath=str(tmp_path / "a"))]
    make_trainer(stop, batches=3).test(_zoa(), datamodule=make_stream(cache_dir, batch_size=32, stop_domain=2))
    second = _Record()
    resume = [second, OnnxRuntimeCallback(cache_dir=cache), StreamCheckpoint(dirpath=str(tmp_path / "b"))]
    make_trainer(resume, batches=3).test(
        _zoa(), datamodule=make_stream(cache_dir, batch_size=32), ckpt_path=str(tmp_path / "a" / "stream-last.ckpt")
    )
    split = first.logits + second.logits
    assert len(split) == len(full.logits) == 9
    for got, want in zip(split, full.logits, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(second.theta[-1], full.theta[-1])


_KILLED_RUN = """
import os, signal, sys
import lightning.pytorch as pl
from pathlib import Path
from callbacks import OnnxRuntimeCallback, StreamCheckpoint
from tests.helpers import make_stream, make_trainer
from tests.integration.test_runtime import _zoa

class KillMidDomain(pl.Callback):
    def __init__(self):
        self.batches = 0
    def on_test_batch_end(self, *args):
        self.batches += 1
        if self.batches == 5:  # the second batch of the second domain: SIGKILL, no clean-up of any kind
            os.kill(os.getpid(), signal.SIGKILL)

cache, graphs, out, net = sys.argv[1:5]
callbacks = [OnnxRuntimeCallback(cache_dir=graphs), StreamCheckpoint(dirpath=out), KillMidDomain()]
make_trainer(callbacks, batches=3).test(_zoa(net), datamodule=make_stream(Path(cache), batch_size=32))
"""


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vit", "resnet"])
def test_a_run_killed_mid_domain_resumes_exactly_on_the_int8_graph(cache_dir: Path, tmp_path: Path, net: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    graphs = str(tmp_path / "graphs")
    full = _Record()
    uninterrupted = _zoa(net)
    make_trainer([full, OnnxRuntimeCallback(cache_dir=graphs)], batches=3).test(
        uninterrupted, datamodule=make_stream(cache_dir, batch_size=32)
    )
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(cache_dir), graphs, str(tmp_path / "killed"), net],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = tmp_path / "killed" / "stream-last.ckpt"
    assert checkpoint.is_file()  # written when the first domain ended, before the kill
    resumed, second = _zoa(net), _Record()
    callbacks = [second, OnnxRuntimeCallback(cache_dir=graphs), StreamCheckpoint(dirpath=str(tmp_path / "killed"))]
    make_trainer(callbacks, batches=3).test(
        resumed, datamodule=make_stream(cache_dir, batch_size=32), ckpt_path=str(checkpoint)
    )
    assert len(second.logits) == 6  # the second and third domains again, from the first domain's checkpoint
    for got, want in zip(second.logits, full.logits[3:], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(second.theta[-1], full.theta[-1])
    keys = ("domain", "acc1", "acc5", "batches", "forward_passes")
    assert [{k: r[k] for k in keys} for r in resumed.stream_results()] == [
        {k: r[k] for k in keys} for r in uninterrupted.stream_results()
    ]


def _graph_for(tmp_path: Path, module: Any, callback: OnnxRuntimeCallback, cache_dir: Path) -> dict[str, Path]:
    """Export the graphs of a run of ``module`` through ``callback``'s cache; return them."""
    make_trainer([callback], batches=1).test(module, datamodule=make_stream(cache_dir, stop_domain=1))
    return {p.name.split(".")[-2]: p for p in Path(callback.cache_dir).glob("*.onnx")}


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other-layers", r"was exported for adapted layers \[.*\]; this run adapts \['blocks.1.norm1'\]"),
        ("other-classes", "has 7 classes but the data has 10"),
        ("float-for-int8", r"is the float graph, but OnnxRuntimeCallback\(precision='int8'\) runs the int8 graph"),
        ("int8-for-float", r"is the int8 graph, but OnnxRuntimeCallback\(precision='float'\) runs the float graph"),
        ("plain-for-zoa", "is a plain graph without the adaptation inputs params, shift"),
        ("zoa-for-no-adapt", "is an adaptable graph, but this method runs the plain network"),
    ],
)
def test_a_graph_that_does_not_fit_the_run_is_refused(cache_dir: Path, tmp_path: Path, case: str, match: str) -> None:
    callback = OnnxRuntimeCallback(cache_dir=str(tmp_path / "c"))
    if case == "other-classes":
        torch.manual_seed(0)
        seven = timm.create_model("test_vit", num_classes=7, img_size=32, patch_size=8).eval()
        from zoa_lightning.core.layout import resolve_layout
        from zoa_lightning.core.runtime.graphs import write_graphs

        images = make_stream(cache_dir).calibration_images(8)
        graphs = write_graphs(seven, resolve_layout(seven), images, tmp_path / "c", "seven", sidecar=False)
    else:
        plain = case == "plain-for-zoa"
        graphs = _graph_for(tmp_path, NoAdaptModule(network=make_vit(0)) if plain else _zoa(), callback, cache_dir)
    chosen = {"float-for-int8": "float", "int8-for-float": "int8"}.get(case, "int8")
    precision = "float" if case == "int8-for-float" else "int8"
    module = {
        "other-layers": _zoa(adapt_norms=["blocks.1.norm1"]),
        "zoa-for-no-adapt": NoAdaptModule(network=make_vit(0)),
    }
    run = module.get(case, _zoa())
    given = OnnxRuntimeCallback(precision=precision, graph=str(graphs[chosen]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match) as info:
        make_trainer([given], batches=1).test(run, datamodule=make_stream(cache_dir, stop_domain=1))
    assert str(graphs[chosen]) in str(info.value)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("tent", TypeError, r"runs no_adapt and ZOA .* TentModule lacks \['runtime_layout'\]"),
        ("first-order", ValueError, "uses estimator='first_order', which back-propagates"),
        ("w4a4", ValueError, "quantizes to W8A8 only, but the config's QuantizationCallback asks for W4A4"),
        ("float-and-quantized", ValueError, r"precision='float'\) runs the float graph, but the config also quantizes"),
    ],
)
def test_what_cannot_run_on_onnx_runtime_is_refused(
    cache_dir: Path, tmp_path: Path, case: str, error: type, match: str
) -> None:
    callbacks: list[pl.Callback] = [OnnxRuntimeCallback(precision="float" if case == "float-and-quantized" else "int8",
                                                        cache_dir=str(tmp_path))]  # fmt: skip
    if case in ("w4a4", "float-and-quantized"):
        callbacks.insert(0, QuantizationCallback(bits=4 if case == "w4a4" else 8, cache_dir=str(tmp_path)))
    modules = {"tent": lambda: TentModule(network=make_vit(0)), "first-order": lambda: _zoa(estimator="first_order")}
    module = modules.get(case, _zoa)()
    with pytest.raises(error, match=match):
        make_trainer(callbacks, batches=1).test(module, datamodule=make_stream(cache_dir, stop_domain=1))
    assert not list(tmp_path.glob("*.pt")), "the fake quantizer stepped aside: nothing was calibrated"


@pytest.mark.slow
def test_zoa_export_writes_graphs_that_zoa_test_runs(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["zoa"])
    monkeypatch.setenv("ZOA_CACHE_DIR", str(tmp_path / "cache"))
    config = resolved_config(["-c", str(ROOT / "configs" / "demo.yaml")])  # W8A8 with the fake quantizer
    config = {k: v for k, v in config.items() if k in ("seed_everything", "trainer", "model", "data")}
    corruptions = ["gaussian_noise", "brightness", "contrast"]
    config["data"]["init_args"].update(corruptions=corruptions, cache_dir=str(cache_dir), num_source_images=256)
    callbacks = [c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]]
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), limit_test_batches=1, logger=False,
                             callbacks=callbacks, enable_progress_bar=False)  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["export", "-c", str(path), "--out", str(tmp_path / "graphs")])
    written = sorted(p.name for p in (tmp_path / "graphs").iterdir())
    assert written == ["demo_vit-zoa.float.onnx", "demo_vit-zoa.int8.onnx", "demo_vit-zoa.json"]
    sidecar = yaml.safe_load((tmp_path / "graphs" / "demo_vit-zoa.json").read_text())
    assert sidecar["int8"]["precision"] == "int8"
    assert sidecar["float"]["layout"]["kind"] == "vit"
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    flags = hint.split("run one with: ", 1)[1].split()
    assert flags[-1] == str(tmp_path / "graphs" / "demo_vit-zoa.int8.onnx")
    main(["test", "-c", str(path), *flags])
    results = yaml.safe_load((tmp_path / "run" / "zoa" / "results.json").read_text())
    assert results["summary"]["bits"] == "W8A8-ORT"
    assert not (tmp_path / "cache").exists()  # the given graph ran: nothing exported, nothing fake-quantized


# ---------------------------------------------------------------------------------------------------- Lightning DDP
class _SaveEachBatch(pl.Callback):
    """Save the adapted values and logits after every batch from inside each process."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag, self.step = str(out), tag, 0

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        adapter = pl_module.adapter  # type: ignore[attr-defined]
        state = {"theta": adapter.bank.theta.clone(), "count": int(adapter.bank.count), "logits": outputs.clone()}
        torch.save(state, f"{self.out}/{self.tag}{trainer.global_rank}_{self.step}.pt")
        self.step += 1


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["spsa", "per_sample"])
def test_two_gloo_processes_on_the_int8_graph_adapt_exactly_as_one(
    cache_dir: Path, tmp_path: Path, estimator: str
) -> None:
    # On an INT8 graph one rounding of difference moves an activation into another 8-bit bin now and then, and the
    # finite difference makes a different step of it: only bit-identical statistics keep two processes with one.
    batch, batches = 43, 3
    options = {"lr": 0.005, "spsa_c": 0.05, "domain_t": 0.1, "detector_min_batch": batch, "estimator": estimator}
    cache = str(tmp_path / "graphs")
    make_trainer([_SaveEachBatch(tmp_path, "one"), OnnxRuntimeCallback(cache_dir=cache)], batches=batches).test(
        ZOAModule(network=make_vit(0), **options), datamodule=make_stream(cache_dir, batch_size=batch)
    )
    ddp = make_trainer(
        [_SaveEachBatch(tmp_path, "ddp"), OnnxRuntimeCallback(cache_dir=cache)],
        batches=batches, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
    )  # fmt: skip
    ddp.test(ZOAModule(network=make_vit(0), **options), datamodule=make_stream(cache_dir, batch_size=batch))
    for i in range(3 * batches):
        want = torch.load(tmp_path / f"one0_{i}.pt")
        r0, r1 = torch.load(tmp_path / f"ddp0_{i}.pt"), torch.load(tmp_path / f"ddp1_{i}.pt")
        assert torch.equal(r0["theta"], r1["theta"]), f"ranks differ after batch {i}"
        assert torch.equal(r0["theta"], want["theta"]), f"two processes and one differ after batch {i}"
        assert r0["count"] == want["count"]
        assert torch.equal(torch.cat([r0["logits"], r1["logits"]]), want["logits"]), f"predictions differ at {i}"
    assert want["count"] >= 2, "the corruption changes should store knowledge"
    assert float(want["theta"].abs().max()) > 0, "the run should adapt"


def test_the_per_sample_estimator_takes_a_vit_graph_and_refuses_a_batchnorm_graph(
    cache_dir: Path, tmp_path: Path
) -> None:
    callback = OnnxRuntimeCallback(precision="float", cache_dir=str(tmp_path))
    vit = _graph_for(tmp_path / "vit", _zoa(), callback, cache_dir)
    module = ZOAModule(network=RuntimeNetwork(vit["float"]), estimator="per_sample", source_batches=2)
    make_trainer(batches=1).test(module, datamodule=make_stream(cache_dir, batch_size=16))
    assert [r["forward_passes"] for r in module.stream_results()] == [2, 2, 2]
    resnet = _graph_for(
        tmp_path / "resnet", _zoa("resnet"), OnnxRuntimeCallback(cache_dir=str(tmp_path / "r")), cache_dir
    )
    with pytest.raises(TypeError, match="estimator='per_sample' needs a network whose images do not interact"):
        ZOAModule(network=RuntimeNetwork(resnet["float"]), estimator="per_sample")


def test_a_batchnorm_graph_on_two_processes_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    callback = OnnxRuntimeCallback(precision="float", cache_dir=str(tmp_path))
    graphs = _graph_for(tmp_path, _zoa("resnet"), callback, cache_dir)
    module = ZOAModule(network=RuntimeNetwork(graphs["float"]))
    module._trainer = SimpleNamespace(world_size=2, global_rank=0)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"summed over the 2 processes .* an ONNX Runtime session cannot"):
        module.setup_method(None)  # type: ignore[arg-type]
