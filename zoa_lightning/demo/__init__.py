"""The offline demo's small source models: a 32-pixel ViT and a narrow ResNet trained on the embedded MNIST split.

:func:`build_demo_vit` and :func:`build_demo_cnn` build the (weightless) timm architectures; :func:`load_demo_model`
builds one and loads its shipped ``safetensors`` weights, which ``python -m zoa_lightning.demo.train`` creates.
"""

from zoa_lightning.demo import models
from zoa_lightning.demo.models import *  # noqa: F403  (the public names of models.py, listed once there)

__all__ = models.__all__
