"""``norm_adapt`` (``bn_adapt``, spec §8): every BatchNorm2d normalises with the test batch's statistics."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from zoa_lightning.core.methods.norm_adapt import NormAdapt
from zoa_lightning.methods.base import StreamModule

__all__ = ["NormAdaptModule", "report_batch_norms"]

log = logging.getLogger(__name__)


def report_batch_norms(names: list[str], method: str, network_name: str, *, warn_if_none: bool) -> None:
    """Say what ``bn_adapt`` did (a warning if it was the method and changed nothing)."""
    if names:
        rank_zero_info(f"{method}: {len(names)} BatchNorm2d layers normalise with test-batch statistics")
    elif warn_if_none:
        log.warning(
            "%s: network %s has no BatchNorm2d layer, so batch-statistics normalisation changes nothing: "
            "for this network (a ViT, say) norm_adapt is identical to no_adapt",
            method,
            network_name,
        )
    else:
        log.info("%s: network %s has no BatchNorm2d layer; the bn_adapt step does nothing", method, network_name)


class NormAdaptModule(StreamModule):
    """``bn_adapt``: every BatchNorm2d normalises with the test batch's statistics; no parameter is updated.

    Builds :class:`~zoa_lightning.core.methods.norm_adapt.NormAdapt`. The running statistics are discarded at setup
    (after quantization), so this also holds in eval mode. A vision transformer has no BatchNorm (its LayerNorms are
    untouched): for it this method is **identical to no_adapt**; the setup logs a warning saying so. One forward pass
    per batch.
    """

    method_name = "norm_adapt"

    @override
    def build_adapter(self, network: nn.Module) -> NormAdapt:
        adapter = NormAdapt(network)
        report_batch_norms(adapter.batch_norms, self.method_name, self.network_name, warn_if_none=True)
        return adapter
