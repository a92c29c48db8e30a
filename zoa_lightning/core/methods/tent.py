"""Tent: first-order entropy minimisation of the norm layers' affine parameters, one SGD step per batch.

The one baseline that back-propagates: it needs autograd (not ``torch.inference_mode``) and keeps the forward's
activations for the backward pass. Per-process state (gradients, momentum buffers): meant for one device.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.methods.base import Adapter
from zoa_lightning.core.methods.norm_adapt import use_batch_statistics
from zoa_lightning.core.stats import softmax_entropy

__all__ = ["Tent"]

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class Tent(Adapter):
    """Tent: one gradient step of prediction-entropy minimisation on the norm layers' affine parameters per batch.

    Configuration: every ``BatchNorm2d`` uses batch statistics (:func:`use_batch_statistics`); the network stays in
    eval mode otherwise (so dropout and stochastic depth are off, unlike Tent's ``model.train()``, which only matters
    for BatchNorm here); all parameters are frozen except the ``weight``/``bias`` of every ``BatchNorm2d``,
    ``LayerNorm`` and ``GroupNorm``. Per batch: **one** forward with autograd, loss = mean softmax entropy, one
    backward, one SGD step; the logits of that forward (parameters from before the step) are the prediction. Unlike the
    zeroth-order methods, Tent keeps the activations of the forward for the backward pass (the memory contrast).

    Fake-quantized networks: gradients reach the norm parameters through the quantizers' straight-through
    estimators (the rounding's gradient taken as the identity). MQBench's fake quantizers (the CNN back-end) and the
    PTQ4ViT quantizers of :mod:`zoa_lightning.core.quant.vit` both have them, so Tent adapts quantized ResNets and
    ViTs alike, while the forward values stay those of the quantized network. A network that blocks every gradient
    (rounding without a straight-through estimator, such as a plain ``torch.round`` in a quantizer of your own, or
    every value clamped at the quantization range) gives an all-zero gradient, and Tent cannot adapt it: such steps
    are counted (:attr:`zero_gradient_steps`) and the first one is reported with a warning.

    The optimizer state (momentum buffers) is part of the module's extra state, so ``state_dict`` resumes it.

    Args:
        model: the network (modified in place; its norm parameters are the adapted state).
        lr: SGD learning rate (default 0.001, FOA's setting for Tent on ViT-B at batch 64; Tent's own ImageNet
            ResNet-50 setting is 0.00025 at batch 64).
        momentum: SGD momentum (0.9).

    Raises:
        ValueError: for a negative ``lr``/``momentum`` or a network without affine norm layers.
    """

    COUNTERS = ("batches", "forward_passes", "backward_passes", "zero_gradient_steps", "skipped_batches")

    def __init__(self, model: nn.Module, lr: float = 0.001, momentum: float = 0.9) -> None:
        if lr < 0 or momentum < 0:
            raise ValueError(f"lr and momentum must be >= 0, got lr={lr}, momentum={momentum}")
        super().__init__(model)
        use_batch_statistics(model)
        model.requires_grad_(False)
        self.param_names: list[str] = []
        params: list[nn.Parameter] = []
        for name, module in model.named_modules():
            if isinstance(module, _NORM_TYPES):
                for kind in ("weight", "bias"):
                    p = getattr(module, kind, None)
                    if isinstance(p, nn.Parameter):
                        p.requires_grad_(True)
                        params.append(p)
                        self.param_names.append(f"{name}.{kind}")
        if not params:
            raise ValueError(f"Tent adapts affine normalization layers; {type(model).__name__} has none")
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        self._warned = False

    @property
    def requires_autograd(self) -> bool:
        """Tent back-propagates: a stream module refuses to run it under ``torch.inference_mode``."""
        return True

    @property
    def backward_passes(self) -> int:
        """Backward passes (one per batch)."""
        return self.counters["backward_passes"]

    @property
    def zero_gradient_steps(self) -> int:
        """Steps in which every adapted parameter got a zero gradient (e.g. rounding without straight-through)."""
        return self.counters["zero_gradient_steps"]

    def run_info(self) -> dict[str, Any]:
        """Backward passes and zero-gradient steps, for the run's summary."""
        return {"backward_passes": self.backward_passes, "zero_gradient_steps": self.zero_gradient_steps}

    def get_extra_state(self) -> dict[str, Any]:
        """The SGD state (momentum buffers and hyperparameters)."""
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the SGD state saved by :meth:`get_extra_state` (copied: nothing is shared with ``state``)."""
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def forward(self, images: Tensor) -> Tensor:
        """Predict ``images`` and take one entropy-minimisation step on the same forward; returns detached logits.

        Raises:
            RuntimeError: under ``torch.inference_mode()``, where no gradient can be computed.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Tent back-propagates and cannot run under torch.inference_mode(); run it outside")
        with torch.enable_grad():
            logits = self.model(images)
            loss = softmax_entropy(logits.float()).mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.counters.add("batches")
            self.counters.add("forward_passes")
            if not bool(torch.isfinite(loss)):
                self.counters.add("skipped_batches")
                log.warning("Tent skipped batch %d: the entropy loss is not finite", self.batches)
                return logits.detach()
            loss.backward()
            self.counters.add("backward_passes")
            grads = [p.grad for p in self.params if p.grad is not None]
            if not grads or not bool(torch.stack([g.ne(0).any() for g in grads]).any()):
                self.counters.add("zero_gradient_steps")
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "Tent got a zero gradient for all %d norm parameters: the network blocks every gradient (e.g. "
                        "fake quantizers rounding without a straight-through estimator, or every value clamped at the "
                        "quantization range), so Tent cannot adapt it; such steps are counted in zero_gradient_steps "
                        "(see zoa_lightning.core.methods.tent.Tent)",
                        len(self.params),
                    )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()
