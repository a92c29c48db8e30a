"""``t3a``: the Test-Time Template Adjuster (spec §8), prototypes of filtered, pseudo-labelled test features."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from zoa_lightning.core.methods.norm_adapt import use_batch_statistics
from zoa_lightning.core.methods.t3a import T3A
from zoa_lightning.methods.base import StreamModule
from zoa_lightning.methods.norm_adapt import report_batch_norms

__all__ = ["T3AModule"]


class T3AModule(StreamModule):
    """T3A (Test-Time Template Adjuster): classify by prototypes of filtered, pseudo-labelled test features.

    Setup applies ``bn_adapt`` (BatchNorm batch statistics, CNNs only) and wraps the network in
    :class:`~zoa_lightning.core.methods.t3a.T3A`: the head input is the feature, the (quantized) head the classifier,
    the support set starts from the head's weight rows and keeps per class the ``filter_k`` lowest-entropy supports.
    One forward pass per batch; the support set carries over across domains (no reset) and is part of the checkpoint
    (fixed-size buffers). Per-process state: meant for one device.

    Args:
        filter_k: supports kept per pseudo-class (20).
    """

    method_name = "t3a"
    reported_hparams = ("filter_k",)

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        filter_k: int = 20,
        name: str | None = None,
    ) -> None:
        super().__init__(network, weights, num_classes, name)
        if isinstance(filter_k, bool) or not isinstance(filter_k, int) or filter_k < 1:
            raise ValueError(f"filter_k must be an integer >= 1, got {filter_k!r}")

    @override
    def build_adapter(self, network: nn.Module) -> T3A:
        names = use_batch_statistics(network)
        report_batch_norms(names, self.method_name, self.network_name, warn_if_none=False)
        return T3A(network, self.hparams["filter_k"])
