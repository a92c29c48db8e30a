"""zoa-lightning: ZOA zeroth-order test-time adaptation of quantized networks, on PyTorch Lightning.

The pure-torch engine lives in :mod:`zoa_lightning.core` (``from zoa_lightning.core import ZOA``).
"""

__version__ = "0.1.0"
