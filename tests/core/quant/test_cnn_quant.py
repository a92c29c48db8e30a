import copy
import io
from collections import Counter

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import Tensor, fx, nn

from tests import helpers
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.quant.cnn import (
    default_activation_bits,
    prepare_cnn_quantization,
    quantize_cnn,
)

FakeQuantizeBase = torch.ao.quantization.FakeQuantizeBase


def _float_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "test_resnet":
        return timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return helpers.images(8, seed=1)


@pytest.fixture(scope="module")
def timm_resnet() -> nn.Module:
    return _float_model("test_resnet")


@pytest.fixture(scope="module")
def q8(timm_resnet: nn.Module, images: Tensor) -> fx.GraphModule:
    return quantize_cnn(timm_resnet, images, 8, observer="minmax")


@pytest.fixture(scope="module")
def q4(timm_resnet: nn.Module, images: Tensor) -> fx.GraphModule:
    before = copy.deepcopy(timm_resnet.state_dict())
    with torch.no_grad():  # AdaRound must switch gradients back on by itself
        model = quantize_cnn(timm_resnet, images[:4], 4, observer="minmax", adaround_iters=10)
    after = timm_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "quantize_cnn modified the float model"
    return model


def _first_conv_and_head(model: fx.GraphModule) -> set[str]:
    nodes = list(model.graph.nodes)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    input_quantizer = next(iter(placeholder.users))
    first_conv = next(iter(input_quantizer.users))
    return {str(first_conv.target), "fc"}


def _fc_input_quantizer(model: fx.GraphModule) -> str:
    fc = next(n for n in model.graph.nodes if n.op == "call_module" and n.target == "fc")
    return str(fc.args[0].target)


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantizeBase)
    }


def _activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizeBase]:
    return {n: m for n, m in model.named_modules() if n.endswith("_post_act_fake_quantizer")}


def _assert_frozen(quantizer: FakeQuantizeBase) -> None:
    assert quantizer.observer_enabled.item() == 0
    assert quantizer.fake_quant_enabled.item() == 1


def _assert_on_grid(values: Tensor, quantizer: FakeQuantizeBase, ch_axis: int | None) -> None:
    shape = [1] * values.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    scale = quantizer.scale.reshape(shape)
    zero_point = quantizer.zero_point.reshape(shape).to(values.dtype)
    levels = values / scale + zero_point
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert levels.round().min() >= quantizer.quant_min
    assert levels.round().max() <= quantizer.quant_max


# --------------------------------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_batchnorm_is_not_folded(name: str, images: Tensor) -> None:
    model = _float_model(name)
    quantized = prepare_cnn_quantization(model, 4, observer="minmax")
    original = dict(model.named_modules())
    modules = dict(quantized.named_modules())
    called = {n.target for n in quantized.graph.nodes if n.op == "call_module"}
    batch_norms = resolve_layout(model).batch_norms
    assert batch_norms
    for bn_name in batch_norms:
        assert type(modules[bn_name]) is nn.BatchNorm2d
        assert bn_name in called
        assert modules[bn_name].weight.dtype == torch.float32
        assert torch.equal(modules[bn_name].weight, original[bn_name].weight)
        assert torch.equal(modules[bn_name].running_var, original[bn_name].running_var)
    fused = torch.ao.nn.intrinsic.qat.ConvBn2d, torch.ao.nn.intrinsic.qat.ConvBnReLU2d
    assert not any(isinstance(m, fused) for m in quantized.modules())


def test_bit_widths_and_w2a4(timm_resnet: nn.Module) -> None:
    assert [default_activation_bits(b) for b in (8, 4, 3, 2)] == [8, 4, 3, 4]
    quantized = prepare_cnn_quantization(timm_resnet, 2, observer="minmax")
    eight_bit = _first_conv_and_head(quantized)
    assert eight_bit == {"conv1.0", "fc"}
    for name, layer in _weight_layers(quantized).items():
        quantizer = layer.weight_fake_quant
        assert quantizer.quant_max == (255 if name in eight_bit else 3), name
        assert quantizer.quant_min == 0
        assert quantizer.is_per_channel
        assert type(quantizer).__name__ == "AdaRoundFakeQuantize"
    eight_bit_inputs = {"x_post_act_fake_quantizer", _fc_input_quantizer(quantized)}
    for name, quantizer in _activation_quantizers(quantized).items():
        assert quantizer.quant_max == (255 if name in eight_bit_inputs else 15), name
        assert not quantizer.is_per_channel
        assert type(quantizer).__name__ == "FixedFakeQuantize"


def test_observer_choice(timm_resnet: nn.Module) -> None:
    for observer, (w_obs, a_obs) in {
        "mse": ("MSEObserver", "EMAMSEObserver"),
        "minmax": ("MinMaxObserver", "EMAMinMaxObserver"),
    }.items():
        quantized = prepare_cnn_quantization(timm_resnet, 8, observer=observer)
        assert type(quantized.fc.weight_fake_quant.activation_post_process).__name__ == w_obs
        assert type(quantized.x_post_act_fake_quantizer.activation_post_process).__name__ == a_obs
        assert type(quantized.fc.weight_fake_quant).__name__ == "FixedFakeQuantize"


# --------------------------------------------------------------------------------------------------------------------
# calibrated values


def _check_quantized_values(quantized: fx.GraphModule, images: Tensor, bits: int, a_bits: int | None = None) -> None:
    a_bits = bits if a_bits is None else a_bits
    eight_bit = _first_conv_and_head(quantized)
    for name, layer in _weight_layers(quantized).items():
        quantizer = layer.weight_fake_quant
        _assert_frozen(quantizer)
        with torch.no_grad():
            weight = quantizer(layer.weight)
        _assert_on_grid(weight, quantizer, ch_axis=0)
        levels = 256 if name in eight_bit else 2**bits
        per_channel = max(len(torch.unique(channel)) for channel in weight.flatten(1))
        assert per_channel <= levels, name

    eight_bit_inputs = {"x_post_act_fake_quantizer", _fc_input_quantizer(quantized)}
    outputs: dict[str, Tensor] = {}
    quantizers = _activation_quantizers(quantized)
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=n: outputs.__setitem__(name, out))
        for n, m in quantizers.items()
    ]
    with torch.no_grad():
        quantized(images)
    for handle in handles:
        handle.remove()
    assert set(outputs) == set(quantizers)
    for name, out in outputs.items():
        quantizer = quantizers[name]
        _assert_frozen(quantizer)
        _assert_on_grid(out, quantizer, ch_axis=None)
        assert len(torch.unique(out)) <= (256 if name in eight_bit_inputs else 2**a_bits), name


def test_8bit_values_on_grid(q8: fx.GraphModule, images: Tensor) -> None:
    _check_quantized_values(q8, images, 8)


def test_8bit_logits_close_to_float(q8: fx.GraphModule, timm_resnet: nn.Module, images: Tensor) -> None:
    with torch.no_grad():
        reference = timm_resnet(images)
        logits = q8(images)
    assert not torch.equal(logits, reference)  # fake quantization is on
    torch.testing.assert_close(logits, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_4bit_adaround(q4: fx.GraphModule, images: Tensor) -> None:
    _check_quantized_values(q4, images, 4)
    for name, layer in _weight_layers(q4).items():
        quantizer = layer.weight_fake_quant
        assert not quantizer.adaround
        assert "alpha" not in dict(quantizer.named_parameters()), name
        # AdaRound hardened its rounding into the stored weight, so fake quantization leaves it unchanged
        with torch.no_grad():
            torch.testing.assert_close(quantizer(layer.weight), layer.weight, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(q4(images)).all()


@pytest.mark.slow
def test_w2a4_adaround_on_separate_images(timm_resnet: nn.Module, images: Tensor) -> None:
    numpy_state = np.random.get_state()
    quantized = quantize_cnn(
        timm_resnet,
        images[:4],
        2,
        observer="minmax",
        adaround_iters=5,
        adaround_images=images[2:8],
        adaround_batch_size=4,
    )
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])  # MQBench's batch sampling left no trace
    assert quantized.layer1_0_aa_post_act_fake_quantizer.quant_max == 15  # W2 pairs with A4
    _check_quantized_values(quantized, images, 2, a_bits=4)


@pytest.mark.slow
def test_mse_observer_calibrates(timm_resnet: nn.Module, images: Tensor) -> None:
    quantized = quantize_cnn(timm_resnet, images[:4], 8)
    _check_quantized_values(quantized, images[:4], 8)


# --------------------------------------------------------------------------------------------------------------------
# what the ZOA engine needs


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_layout_hooks(name: str, images: Tensor) -> None:
    model = _float_model(name)
    quantized = quantize_cnn(model, images, 8, observer="minmax")
    layout = quantized.zoa_layout
    plain = resolve_layout(model)
    assert resolve_layout(quantized) is layout
    assert layout.kind == "cnn"
    assert layout.norms == plain.norms
    assert layout.batch_norms == plain.batch_norms
    assert layout.head == "fc"
    assert len(layout.taps) == len(plain.taps) == 3
    assert all(tap.endswith("_post_act_fake_quantizer") for tap in layout.taps)
    assert layout.detector == ("conv1.0" if name == "test_resnet" else "conv1")  # a deep stem: its first conv
    modules = dict(quantized.named_modules())

    calls: Counter[str] = Counter()
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def record(module_name: str) -> None:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            calls[module_name] += 1
            inputs[module_name] = args[0]
            outputs[module_name] = out

        modules[module_name].register_forward_hook(hook)

    fc_quantizer = _fc_input_quantizer(quantized)
    next_stage_convs = [f"layer{s + 2}.0.conv1" for s in range(3)]
    watched = (layout.detector, *layout.taps, layout.head, *layout.norms, *layout.batch_norms, fc_quantizer, "bn1")
    for module_name in dict.fromkeys((*watched, *next_stage_convs)):
        record(module_name)

    with torch.no_grad():
        quantized(images)
    assert all(calls[n] == 1 for n in watched), calls

    # detector: the (first) stem conv's raw output, straight into the stem's first BatchNorm
    first_bn = "conv1.1" if name == "test_resnet" else "bn1"
    record(first_bn)
    with torch.no_grad():
        quantized(images)
    assert torch.equal(outputs[layout.detector], inputs[first_bn])
    assert outputs[layout.detector].shape[:2] == (len(images), modules[first_bn].num_features)
    # taps: the quantized stage outputs, i.e. what the next stage reads
    for tap, conv in zip(layout.taps, next_stage_convs, strict=True):
        assert outputs[tap].dim() == 4
        assert torch.equal(outputs[tap], inputs[conv])
        assert len(torch.unique(outputs[tap])) <= 2**8
    # head: fc reads the output of the 8-bit fc-input quantizer
    assert modules[fc_quantizer].quant_max == 255
    assert torch.equal(inputs[layout.head], outputs[fc_quantizer])
    assert inputs[layout.head].shape == (len(images), modules["fc"].in_features)


def test_batchnorm_replaceable(q8: fx.GraphModule, images: Tensor) -> None:
    model = copy.deepcopy(q8)
    assert model.zoa_layout == q8.zoa_layout  # survives deepcopy
    name = model.zoa_layout.norms[0]
    parent_name, _, child = name.rpartition(".")
    original = model.get_submodule(name)

    class Counting(nn.Module):
        def __init__(self, bn: nn.Module) -> None:
            super().__init__()
            self.bn = bn
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return self.bn(x)

    replacement = Counting(original)
    setattr(model.get_submodule(parent_name), child, replacement)
    with torch.no_grad():
        torch.testing.assert_close(model(images), q8(images))
    assert replacement.calls == 1


# --------------------------------------------------------------------------------------------------------------------
# calibration cache, guards


def _round_trip(quantized: fx.GraphModule, model: nn.Module, images: Tensor, bits: int) -> None:
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    restored = prepare_cnn_quantization(model, bits, observer="minmax")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for module in restored.modules():
        if isinstance(module, FakeQuantizeBase):
            _assert_frozen(module)
    with torch.no_grad():
        assert torch.equal(restored(images), quantized(images))
    assert restored.zoa_layout == quantized.zoa_layout


def test_state_dict_round_trip(q8: fx.GraphModule, timm_resnet: nn.Module, images: Tensor) -> None:
    _round_trip(q8, timm_resnet, images, 8)


@pytest.mark.slow
def test_state_dict_round_trip_adaround(q4: fx.GraphModule, timm_resnet: nn.Module, images: Tensor) -> None:
    _round_trip(q4, timm_resnet, images, 4)


def test_inference_mode_is_refused(timm_resnet: nn.Module, images: Tensor) -> None:
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        quantize_cnn(timm_resnet, images, 8, observer="minmax")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        prepare_cnn_quantization(timm_resnet, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w_bits": 1}, "w_bits"),
        ({"w_bits": 8, "a_bits": 9}, "a_bits"),
        ({"observer": "kl"}, "observer"),
        ({"adaround_iters": 0}, "adaround_iters"),
        ({"calib_images": torch.randn(3, 32, 32)}, "calib_images"),
        ({"adaround_images": torch.zeros(2, 3, 32, 32, dtype=torch.long)}, "adaround_images"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str, timm_resnet: nn.Module, images: Tensor) -> None:
    kwargs = {"calib_images": images, "observer": "minmax", **kwargs}
    with pytest.raises(ValueError, match=match):
        quantize_cnn(timm_resnet, **kwargs)


def test_rejects_vision_transformer() -> None:
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="ViT"):
        prepare_cnn_quantization(vit, 8, observer="minmax")
