import copy
import io
import warnings
from typing import Literal

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from tests import helpers
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.quant import (
    prepare_vit_quantization,
    quantization_disabled,
    quantize_vit,
    set_quantization_enabled,
    vit_quant_modules,
)
from zoa_lightning.core.quant._common import (
    fake_quant_post_gelu,
    fake_quant_post_softmax,
    fake_quant_uniform,
    interval_candidate_scales,
    post_gelu_negative_interval,
)
from zoa_lightning.core.quant.vit import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, SoftmaxQuantMatMul
from zoa_lightning.core.quant.vit import calibration as vq

Quantized = dict[int, VisionTransformer]


def _float_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32, patch_size=4).eval()
    assert isinstance(model, VisionTransformer)
    return model


@pytest.fixture(scope="module")
def calib() -> Tensor:
    return helpers.images(16, seed=1)


@pytest.fixture(scope="module")
def images() -> Tensor:
    return helpers.images(16, seed=2)


@pytest.fixture(scope="module")
def float_vit() -> VisionTransformer:
    return _float_vit()


@pytest.fixture(scope="module")
def quantized(float_vit: VisionTransformer, calib: Tensor) -> Quantized:
    """W8A8 and W4A4 models calibrated with the full search (100 candidates, 3 rounds)."""
    models: dict[int, VisionTransformer] = {}
    for bits in (8, 4):
        with torch.no_grad():  # calibration must not depend on the caller's grad mode
            models[bits] = quantize_vit(copy.deepcopy(float_vit), calib, bits, bits)
    return models


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


# Primitives --------------------------------------------------------------------------------------------------------


def test_uniform_quantizer_rounds_half_to_even_and_clamps() -> None:
    x = torch.tensor([-9.0, -0.75, -0.25, 0.25, 0.75, 1.25, 7.0])
    assert fake_quant_uniform(x, 0.5, bits=3).tolist() == [-2.0, -1.0, -0.0, 0.0, 1.0, 1.0, 1.5]


def test_post_softmax_quantizer_is_the_reference_formula() -> None:
    probs = torch.rand(4, 3, 17, 17, generator=torch.Generator().manual_seed(0)).softmax(-1)
    for bits in (8, 6, 4):
        q = 2 ** (bits - 1) - 1
        for split in (1.0, 2.0**-3, 2.0**-7, 2.0**-19):
            expected = (probs.clamp(split, 1) * q).round().clamp(0, q) / q + (
                probs.clamp(0, split) / (split / q)
            ).round().clamp(0, q) * (split / q)
            got = fake_quant_post_softmax(probs, torch.tensor(split), bits)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
            assert got.unique().numel() <= 2**bits


def test_post_gelu_quantizer_grids() -> None:
    x = F.gelu(torch.linspace(-6, 6, 10_001))
    for bits in (8, 4):
        y = fake_quant_post_gelu(x, 0.01, bits)
        neg, pos = y[x < 0], y[x >= 0]
        step = post_gelu_negative_interval(bits)
        assert step == pytest.approx(0.16997124254703522 / 2 ** (bits - 1))
        torch.testing.assert_close(neg / step, (neg / step).round())
        assert neg.min().item() >= -0.16997124254703522
        assert pos.max().item() == pytest.approx(0.01 * (2 ** (bits - 1) - 1))  # clipped at the top of the grid
        assert y.unique().numel() <= 2**bits


def test_candidate_grid_matches_spec() -> None:
    scales = interval_candidate_scales(100)
    assert scales.shape == (100,)
    torch.testing.assert_close(scales, 0.01 + 0.0119 * torch.arange(100.0))


def test_pruned_search_equals_exhaustive_argmin() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(40, 13, 3, generator=gen) ** 4 * 10  # (candidate, sample, interval), non-negative
    table[7] = table[3]  # an exact tie: the first index must win
    table[:, :, 1] += torch.linspace(5, 0, 40)[:, None] / 13
    candidates = torch.arange(40.0)[:, None].expand(40, 3).contiguous()

    def error(cand: Tensor, samples: slice) -> Tensor:
        return table[cand[:, 0].long(), samples].sum(1)

    best = vq._best_candidate(candidates, error, num_samples=13, per_sample=1)
    torch.testing.assert_close(best, table.sum(1).argmin(0).float())


@pytest.mark.parametrize("input_quant", ["uniform", "post_gelu"])
def test_gram_shortcuts_match_brute_force(input_quant: Literal["uniform", "post_gelu"]) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(16, 48, weight_groups=3, w_bits=4, a_bits=4, input_quant=input_quant)  # D < R: Gram paths
    x = torch.randn(6, 10, 16, generator=gen)
    if input_quant == "post_gelu":
        x = F.gelu(2 * x)
    with torch.no_grad():
        out = F.linear(x, layer.weight, layer.bias)
        layer.a_delta.fill_(x.abs().amax().item() / 7.5)
        init = layer.weight.reshape(3, -1).abs().amax(1) / 7.5
        w_cands = interval_candidate_scales(100)[:, None] * init
        a_cands = interval_candidate_scales(100) * layer.a_delta
        ones = torch.ones_like(out)  # the brute-force (Hessian) path with G = 1 is plain MSE
        w_gram = vq._search_weight(layer, x, out, None, w_cands)
        torch.testing.assert_close(w_gram, vq._search_weight(layer, x, out, ones, w_cands), rtol=0, atol=0)
        layer.w_delta.copy_(w_gram)
        a_gram = vq._search_input(layer, x, out, None, a_cands)
        torch.testing.assert_close(a_gram, vq._search_input(layer, x, out, ones, a_cands), rtol=0, atol=0)


# Structure ---------------------------------------------------------------------------------------------------------


def test_quantization_off_reproduces_float_logits(float_vit: VisionTransformer, images: Tensor) -> None:
    model = prepare_vit_quantization(copy.deepcopy(float_vit), 8, 8)
    with quantization_disabled(model):
        torch.testing.assert_close(_logits(model, images), _logits(float_vit, images), rtol=0, atol=1e-5)
    assert all(m.quant_enabled for _, m in vit_quant_modules(model))


def test_calibrated_model_without_quantization_is_float(
    float_vit: nn.Module, quantized: Quantized, images: Tensor
) -> None:
    model = quantized[8]
    set_quantization_enabled(model, False)
    try:
        torch.testing.assert_close(_logits(model, images), _logits(float_vit, images), rtol=0, atol=1e-5)
    finally:
        set_quantization_enabled(model, True)


def test_rewritten_structure_keeps_names_and_float_layernorms(float_vit: nn.Module, quantized: Quantized) -> None:
    model = quantized[8]
    float_names = {n for n, _ in float_vit.named_modules()}
    quant_names = {n for n, _ in model.named_modules()}
    assert float_names <= quant_names
    assert isinstance(model.get_submodule("patch_embed.proj"), QuantConv2d)
    for i in range(6):
        attn = model.get_submodule(f"blocks.{i}.attn")
        assert isinstance(attn, QuantAttention)
        assert isinstance(attn.matmul_qk, QuantMatMul)
        assert isinstance(attn.matmul_av, SoftmaxQuantMatMul)
        assert attn.qkv.w_delta.shape == (3,)
        assert attn.matmul_qk.a_delta.shape == (attn.num_heads,)
        assert model.get_submodule(f"blocks.{i}.mlp.fc2").input_quant == "post_gelu"
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 13
    float_norms = dict(float_vit.named_modules())
    for name, norm in model.named_modules():
        if not isinstance(norm, nn.LayerNorm):
            continue
        assert type(norm) is type(float_norms[name])  # the same (timm) LayerNorm class, untouched
        assert isinstance(norm.weight, nn.Parameter)
        assert norm.weight.dtype == torch.float32
        assert isinstance(norm.bias, nn.Parameter)
        assert norm.bias.dtype == torch.float32
    for name in ("blocks.0.norm1", "blocks.5.norm2", "norm", "norm_pre", "head", "patch_embed"):
        model.get_submodule(name)
    layout = resolve_layout(model)
    assert all(isinstance(model.get_submodule(n), nn.LayerNorm) for n in layout.norms)
    feature = torch.randn(3, 64)  # test_vit's width
    assert isinstance(model.head, QuantLinear)
    assert model.head(feature).shape == (3, 10)


def test_calibration_leaves_float_parameters_and_modes(float_vit: nn.Module, quantized: Quantized) -> None:
    model = quantized[4]
    float_params = dict(float_vit.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, float_params[name]), name
        assert param.grad is None
    assert not model.training
    assert all(m.is_calibrated for _, m in vit_quant_modules(model))


# Quantisation grids --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_take_at_most_2_pow_bits_values_per_interval(quantized: Quantized, bits: int) -> None:
    model = quantized[bits]
    for name, module in vit_quant_modules(model):
        if isinstance(module, QuantLinear | QuantConv2d):
            groups = module.quantized_weight().reshape(module.weight_groups, -1)  # conv: per output channel
            levels = max(g.unique().numel() for g in groups)
            assert levels <= 2**bits, (name, levels)


@pytest.mark.parametrize("bits", [8, 4])
def test_activations_take_at_most_2_pow_bits_levels(quantized: Quantized, images: Tensor, bits: int) -> None:
    model = quantized[bits]
    seen: dict[str, tuple[Tensor, ...]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args))
        for name, module in vit_quant_modules(model)
    ]
    try:
        _logits(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    checked = 0
    for name, module in vit_quant_modules(model):
        args = seen[name]
        if isinstance(module, QuantLinear):
            levels = module.quantize_input(args[0]).unique().numel()
            assert levels <= 2**bits, (name, levels)  # post-GELU twin: 2**(b-1) negative + 2**(b-1) non-negative
            checked += 1
        elif isinstance(module, QuantMatMul):
            a_hat, b_hat = module.quantize_a(args[0]), module.quantize_b(args[1])
            if isinstance(module, SoftmaxQuantMatMul):
                assert a_hat.unique().numel() <= 2**bits, name  # twin range: 2**(b-1) levels on each side
            else:
                assert max(a_hat[:, h].unique().numel() for h in range(module.num_heads)) <= 2**bits, name
            assert max(b_hat[:, h].unique().numel() for h in range(module.num_heads)) <= 2**bits, name
            checked += 1
    assert checked == 6 * 6 + 1


def test_8bit_is_close_to_float_and_4bit_is_worse(float_vit: nn.Module, quantized: Quantized, images: Tensor) -> None:
    ref = _logits(float_vit, images)
    cos = {b: F.cosine_similarity(_logits(m, images), ref, dim=-1).mean().item() for b, m in quantized.items()}
    assert cos[8] > 0.99
    assert cos[4] < cos[8]
    assert not torch.equal(_logits(quantized[8], images), ref)


# Persistence -------------------------------------------------------------------------------------------------------


def test_state_dict_reloads_into_prepared_model(quantized: Quantized, images: Tensor) -> None:
    model = quantized[8]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = prepare_vit_quantization(_float_vit(seed=123), 8, 8)  # other float weights: all come from the state
    assert list(fresh.state_dict()) == list(state)
    with pytest.raises(RuntimeError, match="not calibrated"):
        _logits(fresh, images)
    fresh.load_state_dict(state)
    assert torch.equal(_logits(fresh, images), _logits(model, images))


def test_loading_other_bit_widths_fails(quantized: Quantized) -> None:
    fresh = prepare_vit_quantization(_float_vit(), 8, 8)
    with pytest.raises(RuntimeError, match="bit widths"):
        fresh.load_state_dict(quantized[4].state_dict())


def test_prepare_rejects_a_quantized_model(quantized: Quantized) -> None:
    with pytest.raises(ValueError, match="already quantised"):
        prepare_vit_quantization(quantized[8], 8, 8)


# Grad modes and criteria -------------------------------------------------------------------------------------------


def test_inference_mode_is_refused(calib: Tensor) -> None:
    model = _float_vit()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        quantize_vit(model, calib, 8, 8)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_hessian_criterion_runs_under_no_grad(float_vit: VisionTransformer, calib: Tensor, images: Tensor) -> None:
    model = copy.deepcopy(float_vit).train()
    dict(model.named_parameters())["blocks.0.norm1.weight"].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers whose G is exactly zero fall back to MSE
        quantize_vit(model, calib[:8], 8, 8, criterion="hessian", num_candidates=12, search_rounds=2)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    out = _logits(model, images)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out, _logits(float_vit, images), dim=-1).mean() > 0.95


def test_zero_gradient_falls_back_to_mse() -> None:
    with pytest.warns(RuntimeWarning, match="falls back to output MSE"):
        assert vq._prepare_grad(torch.zeros(2, 3), "layer") is None
    grad = vq._prepare_grad(torch.tensor([1e-9, -4e-9]), "layer")
    torch.testing.assert_close(grad, torch.tensor([0.25, -1.0]))


def test_invalid_arguments(calib: Tensor) -> None:
    with pytest.raises(ValueError, match="criterion"):
        quantize_vit(_float_vit(), calib, 8, 8, criterion="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w_bits"):
        prepare_vit_quantization(_float_vit(), 1, 8)
    with pytest.raises(TypeError, match="VisionTransformer"):
        prepare_vit_quantization(nn.Linear(2, 2), 8, 8)  # type: ignore[arg-type]
