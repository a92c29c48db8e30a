"""Pure-torch ZOA engine: no Lightning import anywhere below this package."""

from zoa_lightning.core.bank import FusedLayerNorm, KnowledgeBank
from zoa_lightning.core.batch_norm import BatchStatistics, FusedBatchNorm2d
from zoa_lightning.core.config import ZOAConfig
from zoa_lightning.core.layout import ModelLayout, resolve_layout
from zoa_lightning.core.spsa import adamw_first_step_, estimate_gradient, segmented_uniform, sgd_step_, spsa_estimate
from zoa_lightning.core.stats import ReduceFn, softmax_entropy
from zoa_lightning.core.zoa import ZOA, AdaptationDiverged

__all__ = [
    "ZOA",
    "AdaptationDiverged",
    "BatchStatistics",
    "FusedBatchNorm2d",
    "FusedLayerNorm",
    "KnowledgeBank",
    "ModelLayout",
    "ReduceFn",
    "ZOAConfig",
    "adamw_first_step_",
    "estimate_gradient",
    "resolve_layout",
    "segmented_uniform",
    "sgd_step_",
    "softmax_entropy",
    "spsa_estimate",
]
