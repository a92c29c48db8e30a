"""PTQ4ViT-style simulated post-training quantisation of timm vision transformers (spec §7.1).

Two parts: :mod:`~zoa_lightning.core.quant.vit.modules`, the fake-quantised modules and the rewrite of a timm
``VisionTransformer`` into them (:func:`prepare_vit_quantization`), and
:mod:`~zoa_lightning.core.quant.vit.calibration`, the interval search (:func:`calibrate_vit_quantization`, and
:func:`quantize_vit`, which does both). Every interval is a buffer with the same state-dict key as before the split,
so calibration caches keep loading::

    cache = quantize_vit(model, images, 8, 8).state_dict()
    fresh = prepare_vit_quantization(build_model(), 8, 8)
    fresh.load_state_dict(cache)  # same logits as the calibrated model
"""

from zoa_lightning.core.quant.vit.calibration import Criterion, calibrate_vit_quantization, quantize_vit
from zoa_lightning.core.quant.vit.modules import (
    FakeQuantModule,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    SoftmaxQuantMatMul,
    prepare_vit_quantization,
    quantization_disabled,
    set_quantization_enabled,
    vit_quant_modules,
)

__all__ = [
    "Criterion",
    "FakeQuantModule",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "SoftmaxQuantMatMul",
    "calibrate_vit_quantization",
    "prepare_vit_quantization",
    "quantization_disabled",
    "quantize_vit",
    "set_quantization_enabled",
    "vit_quant_modules",
]
