"""Baseline LightningModules under Trainer.test on a small real stream (configs: test_method_configs.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from callbacks import StreamCheckpoint
from tests.helpers import STREAM_CORRUPTIONS, RecordLogits, make_resnet, make_stream, make_trainer, make_vit
from zoa_lightning import NoAdaptModule
from zoa_lightning.methods import FOAModule, NormAdaptModule, T3AModule, TentModule

CORRUPTIONS = STREAM_CORRUPTIONS


def _module(method: str, make: Any) -> pl.LightningModule:
    if method == "norm_adapt":
        return NormAdaptModule(network=make(0))
    if method == "t3a":
        return T3AModule(network=make(0), filter_k=5)
    if method == "foa":
        return FOAModule(network=make(0), popsize=27, source_batches=2)
    return TentModule(network=make(0), lr=0.01)


@pytest.mark.parametrize(
    ("method", "make", "passes"),
    [
        ("norm_adapt", make_resnet, 1),
        ("t3a", make_vit, 1),
        ("t3a", make_resnet, 1),
        ("foa", make_vit, 28),
        ("tent", make_vit, 1),
        ("tent", make_resnet, 1),
    ],
)
def test_baseline_runs_the_stream_with_its_pass_count(method: str, make: Any, passes: int, cache_dir: Path) -> None:
    module = _module(method, make)
    batch_size = 16 if method == "foa" else 32
    batches = 1 if method == "foa" else 2
    results = make_trainer(batches=batches).test(module, datamodule=make_stream(cache_dir, batch_size=batch_size))
    assert len(results) == 3
    rows = module.stream_results()
    assert [r["domain"] for r in rows] == [f"r1/{c}" for c in CORRUPTIONS]
    assert all(r["batches"] == batches and r["forward_passes"] == passes * batches for r in rows)
    assert all(r["n"] == batch_size * batches and 0 <= r["acc1"] <= r["acc5"] <= 100 for r in rows)
    info = module.run_info()
    assert info["method"] == method
    if method == "tent":
        assert info["backward_passes"] == 3 * batches
        assert info["zero_gradient_steps"] == 0


def test_norm_adapt_on_a_vit_is_no_adapt_and_says_so(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain, adapted = RecordLogits(), RecordLogits()
    make_trainer([plain], batches=1).test(NoAdaptModule(network=make_vit(0)), datamodule=make_stream(cache_dir))
    with caplog.at_level(logging.WARNING, logger="zoa_lightning.methods.norm_adapt"):
        make_trainer([adapted], batches=1).test(NormAdaptModule(network=make_vit(0)), datamodule=make_stream(cache_dir))
    assert any("identical to no_adapt" in r.message for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, adapted.logits, strict=True))


def test_norm_adapt_changes_resnet_predictions_without_changing_parameters(cache_dir: Path) -> None:
    plain, adapted = RecordLogits(), RecordLogits()
    make_trainer([plain], batches=1).test(NoAdaptModule(network=make_resnet(0)), datamodule=make_stream(cache_dir))
    net = make_resnet(0)
    params = {k: v.clone() for k, v in net.named_parameters()}
    make_trainer([adapted], batches=1).test(NormAdaptModule(network=net), datamodule=make_stream(cache_dir))
    assert not torch.allclose(plain.logits[0], adapted.logits[0])
    assert all(torch.equal(params[k], v) for k, v in net.named_parameters())


def test_tent_under_default_inference_mode_names_the_flag_before_the_first_batch(cache_dir: Path) -> None:
    module, record = TentModule(network=make_vit(0)), RecordLogits()
    with pytest.raises(RuntimeError, match=r"TentModule back-propagates.*trainer\.inference_mode: false"):
        make_trainer([record], batches=1, inference_mode=True).test(module, datamodule=make_stream(cache_dir))
    assert not record.logits


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: T3AModule(network=make_vit(0), filter_k=0), "filter_k must be an integer >= 1, got 0"),
        (lambda: TentModule(network=make_vit(0), lr=-1.0), "lr and momentum must be >= 0"),
        (lambda: FOAModule(network=make_vit(0), source_batches=0), "source_batches must be >= 1 or None, got 0"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("method", ["norm_adapt", "t3a", "foa"])
def test_forward_only_baselines_work_under_default_inference_mode(method: str, cache_dir: Path) -> None:
    foa = method == "foa"
    module = FOAModule(network=make_vit(0), popsize=2, source_batches=1) if foa else _module(method, make_vit)
    make_trainer(batches=1, inference_mode=True).test(module, datamodule=make_stream(cache_dir, batch_size=16))
    assert len(module.stream_results()) == 3
    module.load_state_dict(module.state_dict())  # the adaptation state stays made of ordinary tensors


def test_foa_rejects_a_cnn_at_construction() -> None:
    with pytest.raises(TypeError, match="ViT"):
        FOAModule(network=make_resnet(0))


@pytest.mark.parametrize("method", ["t3a", "tent", "foa"])
def test_stream_split_in_two_runs_gives_the_same_predictions(method: str, cache_dir: Path, tmp_path: Path) -> None:
    def build() -> pl.LightningModule:
        if method == "foa":
            return FOAModule(network=make_vit(0), popsize=4, source_batches=1)
        return _module(method, make_vit)

    kwargs = {"batch_size": 16}
    full = RecordLogits()
    make_trainer([full], batches=2).test(build(), datamodule=make_stream(cache_dir, **kwargs))
    first = RecordLogits()
    make_trainer([first, StreamCheckpoint(dirpath=str(tmp_path))], batches=2).test(
        build(), datamodule=make_stream(cache_dir, stop_domain=2, **kwargs)
    )
    second = RecordLogits()
    make_trainer([second, StreamCheckpoint(dirpath=str(tmp_path / "b"))], batches=2).test(
        build(), datamodule=make_stream(cache_dir, **kwargs), ckpt_path=str(tmp_path / "stream-last.ckpt")
    )
    split = first.logits + second.logits
    assert len(split) == len(full.logits) == 6
    for got, want in zip(split, full.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_foa_with_compiled_blocks_matches_eager(cache_dir: Path) -> None:
    runs = {}
    for compiled in (False, True):
        record = RecordLogits()
        module = FOAModule(network=make_vit(0), popsize=4, source_batches=1, compile_blocks=compiled)
        make_trainer([record], batches=2).test(module, datamodule=make_stream(cache_dir, batch_size=16))
        runs[compiled] = (record.logits, module)
    (eager, eager_module), (compiled, compiled_module) = runs[False], runs[True]
    assert compiled_module.run_info()["compile_blocks"] is True
    assert compiled_module.forward_passes() == eager_module.forward_passes() == 5 * len(eager)
    # Same search and predictions up to float rounding in the fused kernels; the same state-dict keys.
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(eager, compiled, strict=True))
    assert compiled_module.state_dict().keys() == eager_module.state_dict().keys()
