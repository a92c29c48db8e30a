"""``tent``: Tent, one gradient step of entropy minimisation on the norm layers per batch (first order)."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from zoa_lightning.core.methods.tent import Tent
from zoa_lightning.methods.base import StreamModule

__all__ = ["TentModule"]


class TentModule(StreamModule):
    """Tent: one SGD step of entropy minimisation on the norm layers' affine parameters per batch (first order).

    Setup wraps the network in :class:`~zoa_lightning.core.methods.tent.Tent` (BatchNorm batch statistics; every
    BatchNorm/LayerNorm/GroupNorm ``weight`` and ``bias`` trainable). Per batch: one forward with autograd whose logits
    are the prediction, one backward, one step (1 forward + 1 backward pass; :meth:`run_info` reports
    ``backward_passes``). Unlike the forward-only methods it stores the activations for the backward pass.

    Needs autograd: set ``trainer.inference_mode: false`` (``configs/methods/tent.yaml`` does); under Lightning's
    default inference mode the test refuses to start with a ``RuntimeError`` naming that flag.

    Quantized networks adapt too: the fake quantizers of both back-ends (PTQ4ViT for ViTs, MQBench for CNNs) pass
    gradients straight through their rounding. A network that blocks every gradient cannot be adapted; Tent counts such
    steps in ``zero_gradient_steps`` (also in :meth:`run_info`) and warns once.

    Args:
        lr: SGD learning rate (0.001: FOA's Tent setting for ViT-B, batch 64; Tent's ResNet-50 one is 0.00025).
        momentum: SGD momentum (0.9).
    """

    method_name = "tent"

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        lr: float = 0.001,
        momentum: float = 0.9,
        name: str | None = None,
    ) -> None:
        super().__init__(network, weights, num_classes, name)
        if lr < 0 or momentum < 0:
            raise ValueError(f"lr and momentum must be >= 0, got lr={lr}, momentum={momentum}")

    @override
    def build_adapter(self, network: nn.Module) -> Tent:
        return Tent(network, lr=self.hparams["lr"], momentum=self.hparams["momentum"])
