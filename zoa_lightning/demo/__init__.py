"""The offline demo's small source models: a 32-pixel ViT and a narrow ResNet trained on the embedded MNIST split.

:func:`build_demo_vit` and :func:`build_demo_cnn` build the (weightless) timm architectures; :func:`load_demo_model`
builds one and loads its shipped ``safetensors`` weights, which ``python -m zoa_lightning.demo.train`` creates.
"""

from zoa_lightning.demo.models import (
    DEMO_MEAN,
    DEMO_MODEL_NAMES,
    DEMO_STD,
    build_demo_cnn,
    build_demo_model,
    build_demo_vit,
    default_weights_path,
    load_demo_model,
)

__all__ = [
    "DEMO_MEAN",
    "DEMO_MODEL_NAMES",
    "DEMO_STD",
    "build_demo_cnn",
    "build_demo_model",
    "build_demo_vit",
    "default_weights_path",
    "load_demo_model",
]
