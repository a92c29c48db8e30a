"""zoa-lightning: ZOA zeroth-order test-time adaptation of quantized networks, on PyTorch Lightning.

The pure-torch engine lives in :mod:`zoa_lightning.core` (``from zoa_lightning.core import ZOA``), the baselines'
adapters in :mod:`zoa_lightning.core.methods`. The Lightning modules are built on one template, :class:`StreamModule`:
:class:`ZOAModule`, :class:`NoAdaptModule` and the baselines (:mod:`zoa_lightning.baselines`).
"""

from zoa_lightning.baselines import FOAModule, NormAdaptModule, T3AModule, TentModule
from zoa_lightning.module import NoAdaptModule, StreamModule, ZOAModule

__version__ = "0.1.0"

__all__ = [
    "FOAModule",
    "NoAdaptModule",
    "NormAdaptModule",
    "StreamModule",
    "T3AModule",
    "TentModule",
    "ZOAModule",
    "__version__",
]
