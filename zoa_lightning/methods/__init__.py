"""The LightningModules of the stream methods, one file per method, all built on :class:`StreamModule`.

Each method is three files: its pure-torch adapter in :mod:`zoa_lightning.core.methods` (ZOA's is the engine,
:class:`zoa_lightning.core.ZOA`), its LightningModule here and its config in ``configs/methods/<name>.yaml``
(``CONTRIBUTING.md`` shows how to add one).

| Module | ``method_name`` | forward passes per batch | notes |
|---|---|---|---|
| :class:`ZOAModule` | ``zoa`` | 2 | two-pass zeroth-order adaptation with a knowledge bank |
| :class:`NoAdaptModule` | ``no_adapt`` | 1 | the network as it is |
| :class:`NormAdaptModule` | ``norm_adapt`` | 1 | BatchNorm batch statistics; a ViT has none (= ``no_adapt``) |
| :class:`T3AModule` | ``t3a`` | 1 | prototype classifier over filtered supports |
| :class:`FOAModule` | ``foa`` | ``popsize + 1`` (28) | ViT only; CMA-ES over prompt tokens |
| :class:`TentModule` | ``tent`` | 1 (+ 1 backward) | needs ``trainer.inference_mode: false`` |

The ZOA ablations (no bank, no shift, shift only), the per-sample estimator and the first-order oracle are configs of
:class:`ZOAModule` (``configs/methods/zoa_*.yaml``).
"""

from zoa_lightning.methods.base import StreamModule
from zoa_lightning.methods.foa import FOAModule
from zoa_lightning.methods.no_adapt import NoAdaptModule
from zoa_lightning.methods.norm_adapt import NormAdaptModule
from zoa_lightning.methods.t3a import T3AModule
from zoa_lightning.methods.tent import TentModule
from zoa_lightning.methods.zoa import ZOAModule

__all__ = ["FOAModule", "NoAdaptModule", "NormAdaptModule", "StreamModule", "T3AModule", "TentModule", "ZOAModule"]
