"""Simulated ("fake") post-training quantization: PTQ4ViT-style for vision transformers, MQBench for CNNs.

Every MQBench call lives in :mod:`zoa_lightning.core.quant.cnn`, so the dependency can be swapped in one place.
Norm layers stay float modules at their original names, so the ZOA engine can adapt them.
"""

from zoa_lightning.core.quant._common import PTQ4VIT_BITS
from zoa_lightning.core.quant.cnn import MQBENCH_BITS, default_activation_bits, prepare_cnn_quantization, quantize_cnn
from zoa_lightning.core.quant.vit import (
    calibrate_vit_quantization,
    prepare_vit_quantization,
    quantization_disabled,
    quantize_vit,
    set_quantization_enabled,
    vit_quant_modules,
)

__all__ = [
    "MQBENCH_BITS",
    "PTQ4VIT_BITS",
    "calibrate_vit_quantization",
    "default_activation_bits",
    "prepare_cnn_quantization",
    "prepare_vit_quantization",
    "quantization_disabled",
    "quantize_cnn",
    "quantize_vit",
    "set_quantization_enabled",
    "vit_quant_modules",
]
