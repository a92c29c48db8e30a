"""The pure-torch adapters of the baseline methods, one file per method (spec §8); no Lightning import.

Each adapter is an :class:`~zoa_lightning.core.methods.base.Adapter`: called on a batch of images it returns the
logits it predicts (adapting on the batch if it adapts) and counts its ``forward_passes``. The LightningModules of
:mod:`zoa_lightning.methods` only build them; ZOA's own engine is :class:`zoa_lightning.core.ZOA`, an ``Adapter`` too.

* :mod:`~zoa_lightning.core.methods.no_adapt`: :class:`NoAdapt`, the network as it is.
* :mod:`~zoa_lightning.core.methods.norm_adapt`: :func:`use_batch_statistics` and :class:`NormAdapt` (``bn_adapt``).
* :mod:`~zoa_lightning.core.methods.t3a`: :class:`T3A`, the Test-Time Template Adjuster.
* :mod:`~zoa_lightning.core.methods.foa`: :class:`FOA`, CMA-ES over ViT input prompts plus the activation shift.
* :mod:`~zoa_lightning.core.methods.tent`: :class:`Tent`, first-order entropy minimisation (needs autograd).
"""

from zoa_lightning.core.methods.base import Adapter, device_of
from zoa_lightning.core.methods.foa import FOA, PromptOutput, check_prompt_vit, foa_fitness, prompt_forward
from zoa_lightning.core.methods.no_adapt import NoAdapt
from zoa_lightning.core.methods.norm_adapt import NormAdapt, use_batch_statistics
from zoa_lightning.core.methods.t3a import T3A, t3a_prototypes, t3a_select
from zoa_lightning.core.methods.tent import Tent

__all__ = [
    "FOA",
    "T3A",
    "Adapter",
    "NoAdapt",
    "NormAdapt",
    "PromptOutput",
    "Tent",
    "check_prompt_vit",
    "device_of",
    "foa_fitness",
    "prompt_forward",
    "t3a_prototypes",
    "t3a_select",
    "use_batch_statistics",
]
