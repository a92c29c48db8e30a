"""Baseline LightningModules of the evaluation (spec §8): each builds one adapter of :mod:`zoa_lightning.core.methods`.

Each runs the data config's (quantized) network over the same domain stream as :class:`~zoa_lightning.ZOAModule`
and reports the same per-domain results; compose a method config after a data/model config, e.g.
``zoa test -c configs/demo.yaml -c configs/methods/t3a.yaml``. :class:`~zoa_lightning.module.StreamModule` does
everything the methods share; a module here only declares its hyperparameters and builds its adapter
(``CONTRIBUTING.md`` shows how to add one).

| Module | ``method_name`` | forward passes per batch | notes |
|---|---|---|---|
| :class:`NormAdaptModule` | ``norm_adapt`` | 1 | BatchNorm batch statistics; a ViT has none (= ``no_adapt``) |
| :class:`T3AModule` | ``t3a`` | 1 | prototype classifier over filtered supports |
| :class:`FOAModule` | ``foa`` | ``popsize + 1`` (28) | ViT only; CMA-ES over prompt tokens |
| :class:`TentModule` | ``tent`` | 1 (+ 1 backward) | needs ``trainer.inference_mode: false`` |

The ZOA ablations (no bank, no shift, shift only) are configs of :class:`~zoa_lightning.ZOAModule`
(``configs/methods/zoa_*.yaml``).
"""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from zoa_lightning.core.methods.foa import FOA, check_prompt_vit
from zoa_lightning.core.methods.norm_adapt import NormAdapt, use_batch_statistics
from zoa_lightning.core.methods.t3a import T3A
from zoa_lightning.core.methods.tent import Tent
from zoa_lightning.module import StreamModule

__all__ = ["FOAModule", "NormAdaptModule", "T3AModule", "TentModule"]

log = logging.getLogger(__name__)


def _report_batch_norms(names: list[str], method: str, network_name: str, *, warn_if_none: bool) -> None:
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

    Args:
        network: see :class:`~zoa_lightning.module.StreamModule`.
        weights: see :class:`~zoa_lightning.module.StreamModule`.
        num_classes: see :class:`~zoa_lightning.module.StreamModule`.
        name: see :class:`~zoa_lightning.module.StreamModule`.
    """

    method_name = "norm_adapt"

    @override
    def build_adapter(self, network: nn.Module) -> NormAdapt:
        adapter = NormAdapt(network)
        _report_batch_norms(adapter.batch_norms, self.method_name, self.network_name, warn_if_none=True)
        return adapter


class T3AModule(StreamModule):
    """T3A (Test-Time Template Adjuster): classify by prototypes of filtered, pseudo-labelled test features.

    Setup applies ``bn_adapt`` (BatchNorm batch statistics, CNNs only) and wraps the network in
    :class:`~zoa_lightning.core.methods.t3a.T3A`: the head input is the feature, the (quantized) head the classifier,
    the support set starts from the head's weight rows and keeps per class the ``filter_k`` lowest-entropy supports.
    One forward pass per batch; the support set carries over across domains (no reset) and is part of the checkpoint
    (fixed-size buffers). Per-process state: meant for one device.

    Args:
        network: see :class:`~zoa_lightning.module.StreamModule`.
        weights: see :class:`~zoa_lightning.module.StreamModule`.
        num_classes: see :class:`~zoa_lightning.module.StreamModule`.
        filter_k: supports kept per pseudo-class (20).
        name: see :class:`~zoa_lightning.module.StreamModule`.
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
        _report_batch_norms(names, self.method_name, self.network_name, warn_if_none=False)
        return T3A(network, self.hparams["filter_k"])


class FOAModule(StreamModule):
    """FOA (forward-optimization adaptation, ICML 2024) of a ViT: CMA-ES over input prompts, plus activation shifting.

    Setup wraps the network in :class:`~zoa_lightning.core.methods.foa.FOA` and computes the source statistics of its
    per-block CLS features **without** prompts from the data module's ``source_dataloader()``. Each batch evaluates
    ``popsize`` CMA-ES candidates plus the previous best (``popsize + 1`` = 28 forward passes), predicts with the best
    candidate's activation-shifted logits and tells CMA-ES all candidates. Continual: no reset between domains; no
    class mask.

    Vision transformers only (timm ``VisionTransformer`` with a class token): a CNN raises ``TypeError`` at
    construction (FOA's convolutional-prompt variant ``foa_resnet`` is not implemented).

    Checkpoints: the CMA-ES state is pickled into the adapter's extra state (a ``uint8`` tensor in the
    ``state_dict``), so a stream checkpoint resumes the search exactly; it holds a few covariance-sized matrices
    (``(num_prompts · width)²`` floats each; about 90 MB for ViT-B). Loading unpickles it: load only checkpoints you
    trust.

    Args:
        network: see :class:`~zoa_lightning.module.StreamModule`.
        weights: see :class:`~zoa_lightning.module.StreamModule`.
        num_classes: see :class:`~zoa_lightning.module.StreamModule`.
        num_prompts: prompt tokens inserted after the class token (3).
        popsize: CMA-ES population (27); a batch costs ``popsize + 1`` forward passes.
        sigma0: CMA-ES initial step size (1).
        fitness_lambda: weight of the feature-statistics discrepancy in the fitness (0.4).
        reference_batch: batch size the discrepancy is scaled to (64).
        use_shift: apply the back-to-source activation shift to predictions.
        seed: seed of the CMA-ES sampling and the initial prompts.
        source_batches: clean batches used for source statistics (``None``: the whole source loader).
        compile_blocks: ``torch.compile`` each transformer block in place (``nn.Module.compile``, static shapes)
            before the stream. The 28 forward passes per batch dominate FOA's cost; on a 2-core CPU the fake-quantised
            demo ViT's forward runs about 2× faster compiled. The first batch pays the compilation (about 30 s on
            that CPU), a CPU needs a C++ compiler, and the numbers equal the eager ones up to float rounding (which
            can move a value across a quantisation step). State-dict keys are unchanged.
        name: see :class:`~zoa_lightning.module.StreamModule`.
    """

    method_name = "foa"
    reported_hparams = ("popsize", "num_prompts", "compile_blocks")

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        num_prompts: int = 3,
        popsize: int = 27,
        sigma0: float = 1.0,
        fitness_lambda: float = 0.4,
        reference_batch: int = 64,
        use_shift: bool = True,
        seed: int = 2020,
        source_batches: int | None = None,
        compile_blocks: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(network, weights, num_classes, name)
        check_prompt_vit(self.net)

    @override
    def build_adapter(self, network: nn.Module) -> FOA:
        h = self.hparams
        adapter = FOA(
            network,
            num_prompts=h["num_prompts"],
            popsize=h["popsize"],
            sigma0=h["sigma0"],
            fitness_lambda=h["fitness_lambda"],
            reference_batch=h["reference_batch"],
            use_shift=h["use_shift"],
            seed=h["seed"],
            reduce_fn=self.reduce_sum,
        )
        if h["compile_blocks"]:
            for block in network.blocks:  # type: ignore[union-attr]
                block.compile(dynamic=False)
        return adapter


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
        network: see :class:`~zoa_lightning.module.StreamModule`.
        weights: see :class:`~zoa_lightning.module.StreamModule`.
        num_classes: see :class:`~zoa_lightning.module.StreamModule`.
        lr: SGD learning rate (0.001: FOA's Tent setting for ViT-B, batch 64; Tent's ResNet-50 one is 0.00025).
        momentum: SGD momentum (0.9).
        name: see :class:`~zoa_lightning.module.StreamModule`.
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
