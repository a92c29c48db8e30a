"""zoa-lightning: ZOA zeroth-order test-time adaptation of quantized networks, on PyTorch Lightning.

The pure-torch engine lives in :mod:`zoa_lightning.core` (``from zoa_lightning.core import ZOA``), the baselines'
adapters in :mod:`zoa_lightning.core.methods`. The LightningModules, one per method, are in
:mod:`zoa_lightning.methods`, all built on one template, :class:`StreamModule`; they are exported here.
"""

from zoa_lightning.methods import (
    FOAModule,
    NoAdaptModule,
    NormAdaptModule,
    StreamModule,
    T3AModule,
    TentModule,
    ZOAModule,
)

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
