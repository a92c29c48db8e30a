"""QuantizationCallback: quantizes before the method's setup, keeps norms adaptable, caches calibrated models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks import QuantizationCallback
from tests.conftest import make_resnet, make_stream, make_trainer, make_vit
from zoa_lightning import NoAdaptModule, ZOAModule


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (make_resnet, {"observer": "minmax"}),
        (make_vit, {"num_candidates": 8, "search_rounds": 1}),
    ],
)
def test_quantizes_then_zoa_adapts_the_float_norms(make, options, cache_dir: Path, tmp_path: Path) -> None:
    callback = QuantizationCallback(bits=8, calib_images=16, cache_dir=str(tmp_path), **options)
    module = ZOAModule(network=make(0), lr=0.005, spsa_c=0.05)
    make_trainer([callback], batches=1).test(module, datamodule=make_stream(cache_dir))
    assert module.run_info()["bits"] == "W8A8"
    assert module.adapter is not None
    assert callback.last_cache_hit is False
    names = module.adapter.layout.norms
    fused = [module.adapter.model.get_submodule(n) for n in names]
    assert all(type(m).__name__.startswith("Fused") for m in fused)
    assert all(r["forward_passes"] == 2 for r in module.stream_results())


def test_calibration_cache_is_reused_with_identical_predictions(cache_dir: Path, tmp_path: Path) -> None:
    logits = []
    hits = []
    for _ in range(2):
        callback = QuantizationCallback(bits=8, calib_images=16, cache_dir=str(tmp_path), observer="minmax")
        module = NoAdaptModule(network=make_resnet(0))
        make_trainer([callback], batches=1).test(module, datamodule=make_stream(cache_dir, stop_domain=1))
        hits.append(callback.last_cache_hit)
        with torch.no_grad():
            logits.append(module.get_network()(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)))
    assert hits == [False, True]
    assert len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(logits[0], logits[1])


def test_protocol_and_argument_errors() -> None:
    with pytest.raises(ValueError, match="method"):
        QuantizationCallback(method="gptq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calib_images"):
        QuantizationCallback(calib_images=0)

    import lightning.pytorch as pl

    with pytest.raises(TypeError, match="set_network"):
        QuantizationCallback().setup(pl.Trainer(logger=False), pl.LightningModule(), "test")
