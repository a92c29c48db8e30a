"""``no_adapt``: the (quantized) network as it is, one forward pass per batch; the reference of every comparison."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.methods.no_adapt import NoAdapt
from zoa_lightning.methods.base import StreamModule

__all__ = ["NoAdaptModule"]


class NoAdaptModule(StreamModule):
    """No adaptation: the (quantized) network in eval mode; BatchNorm keeps its running statistics."""

    method_name = "no_adapt"

    @override
    def build_adapter(self, network: nn.Module) -> NoAdapt:
        return NoAdapt(network)

    def runtime_layout(self, network: nn.Module) -> ModelLayout | None:
        """``None``: on an inference engine no_adapt runs the plain graph (``callbacks.OnnxRuntimeCallback``)."""
        return None
