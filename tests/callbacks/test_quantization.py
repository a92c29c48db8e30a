"""QuantizationCallback: quantizes before the method's setup, keeps norms adaptable, caches calibrated models."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from callbacks import QuantizationCallback
from tests.helpers import make_resnet, make_stream, make_trainer, make_vit
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


def _unfit_state(kind: str, quantized: nn.Module, make: Callable[[int], nn.Module]) -> dict[str, torch.Tensor]:
    if kind == "truncated":  # the first half of the right state dict
        state = quantized.state_dict()
        return dict(list(state.items())[: len(state) // 2])
    return make(0).state_dict()  # another model's: the float network's


@pytest.mark.parametrize(
    ("make", "options", "kind"),
    [
        (make_vit, {"num_candidates": 4, "search_rounds": 1}, "truncated"),
        (make_vit, {"num_candidates": 4, "search_rounds": 1}, "other_model"),
        (make_resnet, {"observer": "minmax"}, "truncated"),
    ],
    ids=["vit-truncated", "vit-other_model", "resnet-truncated"],
)
def test_unfit_cache_file_is_recalibrated_with_a_warning(
    make: Callable[[int], nn.Module],
    options: dict[str, Any],
    kind: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # before the fix the ViT path prepared the network in place while trying the file, so recalibrating it then
    # failed with "model is already quantised"
    images = torch.linspace(-1, 1, 8 * 3 * 32 * 32).reshape(8, 3, 32, 32)
    callback = QuantizationCallback(bits=8, calib_images=8, cache_dir=str(tmp_path), **options)
    first, hit = callback.quantize(make(0), images)
    assert hit is False
    (path,) = tmp_path.glob("*.pt")
    torch.save(_unfit_state(kind, first, make), path)

    with caplog.at_level("WARNING", logger="callbacks.quantization"):
        again, hit = callback.quantize(make(0), images)
    assert hit is False
    assert any(str(path) in r.getMessage() and "recalibrating" in r.getMessage() for r in caplog.records)
    probe = torch.linspace(1, -1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(probe), first(probe))
    assert callback.quantize(make(0), images)[1] is True  # the file was overwritten with a fitting one


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"bits": 1},
            "bits=1 is not a supported bit width: the quantizers support 2 to 16 for ptq4vit, 2 to 8 for mqbench",
        ),
        ({"bits": 17}, "bits=17 is not a supported bit width"),
        (
            {"bits": 9, "method": "mqbench"},
            "bits=9 is not a supported bit width: the quantizers support 2 to 8 for mqbench;",
        ),
        (
            {"bits": 17, "method": "ptq4vit"},
            "bits=17 is not a supported bit width: the quantizers support 2 to 16 for ptq4vit;",
        ),
        ({"act_bits": 0}, "act_bits=0 is not a supported bit width"),
        ({"act_bits": 1, "method": "ptq4vit"}, "act_bits=1 is not a supported bit width"),
        ({"act_bits": 10, "method": "mqbench"}, "act_bits=10 is not a supported bit width"),
        ({"bits": True}, "bits=True is not a supported bit width"),
    ],
)
def test_bit_widths_outside_the_quantizers_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"QuantizationCallback {message}")):
        QuantizationCallback(**options)


def test_bit_widths_at_the_limits_are_accepted() -> None:
    for low, high, method in ((2, 16, "ptq4vit"), (2, 8, "mqbench"), (2, 16, "auto")):
        QuantizationCallback(bits=low, act_bits=high, method=method)  # type: ignore[arg-type]
        QuantizationCallback(bits=high, act_bits=low, method=method)  # type: ignore[arg-type]


def test_auto_method_checks_the_bit_width_of_the_chosen_quantizer(tmp_path: Path) -> None:
    # 12 bits is fine for a ViT, so "auto" accepts it until the network turns out to be a CNN (MQBench: 2..8)
    callback = QuantizationCallback(bits=12, cache_dir=str(tmp_path))
    message = (
        "QuantizationCallback bits=12 is not a supported bit width (method mqbench for ResNet): the quantizers support "
        "2 to 8 for mqbench"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        callback.quantize(make_resnet(0), torch.zeros(2, 3, 32, 32))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["other_weights", "flipped_byte", "uncalibrated", "old_format"])
def test_a_cache_file_is_taken_only_for_the_network_it_was_calibrated_from(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file at the right name is checked: checksum, format, the network and settings it holds, calibration."""
    from zoa_lightning.core.quant import prepare_vit_quantization
    from zoa_lightning.files import checksum_path, write_verified

    images = torch.linspace(-1, 1, 8 * 3 * 32 * 32).reshape(8, 3, 32, 32)
    callback = QuantizationCallback(bits=8, calib_images=8, cache_dir=str(tmp_path), num_candidates=8, search_rounds=1)
    reference, _ = callback.quantize(make_vit(0), images)
    callback.quantize(make_vit(1), images)  # another network's file, beside it
    path, other_path = callback.cache_path(make_vit(0), images), callback.cache_path(make_vit(1), images)
    assert path != other_path
    if damage == "other_weights":  # the other network's calibration copied to this network's name
        path.write_bytes(other_path.read_bytes())
        checksum_path(path).write_bytes(checksum_path(other_path).read_bytes())
    elif damage == "flipped_byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "uncalibrated":
        key = torch.load(path, weights_only=True)["key"]
        state = prepare_vit_quantization(make_vit(0), 8, 8).state_dict()  # prepared, never calibrated
        buffer = io.BytesIO()
        torch.save({"format": 2, "key": key, "state_dict": state}, buffer)
        write_verified(path, buffer.getvalue())
    else:  # a plain state dict, as the cache held before it kept its key and checksum
        buffer = io.BytesIO()
        torch.save(reference.state_dict(), buffer)
        write_verified(path, buffer.getvalue())
    with caplog.at_level("WARNING", logger="callbacks.quantization"):
        again, hit = callback.quantize(make_vit(0), images)
    assert hit is False, "the unfit file must not be taken"
    assert any(str(path) in r.getMessage() and "recalibrating" in r.getMessage() for r in caplog.records)
    probe = torch.linspace(1, -1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(probe), reference(probe))
