"""``zoa``: ZOA's LightningModule, two forward passes and a manual zeroth-order update per batch (the engine's).

Every hyperparameter is a field of :class:`~zoa_lightning.core.config.ZOAConfig`, which holds its default and its
description once: :class:`ZOAModule` takes each field as an ``__init__`` argument of the same name and type, its
default read from the dataclass, and its ``Args:`` text (``zoa test --help``) is the dataclass's, inserted when the
class is built. A test keeps the names and types in step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.estimators import check_estimator
from zoa_lightning.core.layout import ModelLayout, resolve_layout
from zoa_lightning.core.network import EngineNetwork
from zoa_lightning.methods.base import StreamModule

__all__ = ["ZOAModule", "config_args_doc"]

_CONFIG_ARGS = "<every ZOAConfig field>"


class ZOAModule(StreamModule):
    """ZOA: each test batch costs two forward passes and one zeroth-order update of the norm layers.

    ``test_step`` runs pass A (prediction with the current parameters, loss ``L0``), pass B (all adapted values
    perturbed, loss ``L+``), and the manual SPSA update of the epsilons and knowledge-mixing logits; a domain-shift
    detector stores the adapted parameters in a knowledge bank. See :class:`zoa_lightning.core.ZOA` and
    ``docs/algorithm.md``.

    Args:
        <every ZOAConfig field>
        source_batches: clean batches used for source statistics (``None``: the whole source loader).
        adapt_norms: qualified names of the normalization layers to adapt (``blocks.4.norm2``, ``layer2.0.bn1``, ...),
            replacing the spec's choice for the model kind (:func:`~zoa_lightning.core.layout.resolve_layout`); any
            order, kept in network order. Fewer adapted values make the one-sample SPSA estimate less noisy. ``None``:
            the spec's layers.
    """

    method_name = "zoa"
    adapter: ZOA | None

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        lr: float = ZOAConfig.lr,
        lr_alpha: float = ZOAConfig.lr_alpha,
        spsa_c: float = ZOAConfig.spsa_c,
        spsa_c_alpha: float = ZOAConfig.spsa_c_alpha,
        momentum: float = ZOAConfig.momentum,
        weight_decay: float = ZOAConfig.weight_decay,
        weight_decay_alpha: float = ZOAConfig.weight_decay_alpha,
        sp_avg: int = ZOAConfig.sp_avg,
        steps: int = ZOAConfig.steps,
        max_weight_nums: int = ZOAConfig.max_weight_nums,
        alpha_scale: float = ZOAConfig.alpha_scale,
        weight_margin: float = ZOAConfig.weight_margin,
        alpha_clip: float = ZOAConfig.alpha_clip,
        domain_t: float = ZOAConfig.domain_t,
        lambda_bp: float = ZOAConfig.lambda_bp,
        detector_min_batch: int = ZOAConfig.detector_min_batch,
        detector_momentum: float = ZOAConfig.detector_momentum,
        shift_momentum: float = ZOAConfig.shift_momentum,
        use_bank: bool = ZOAConfig.use_bank,
        use_shift: bool = ZOAConfig.use_shift,
        loss_on_shifted: bool = ZOAConfig.loss_on_shifted,
        mode: Literal["reference", "corrected"] = ZOAConfig.mode,
        resnet_shift: Literal["scalar", "vector"] | None = ZOAConfig.resnet_shift,
        compact_similarity: bool | None = ZOAConfig.compact_similarity,
        detector_passes: Literal[1, 2] | None = ZOAConfig.detector_passes,
        seed_detector_from_source: bool | None = ZOAConfig.seed_detector_from_source,
        seed: int = ZOAConfig.seed,
        max_abs_epsilon: float | None = ZOAConfig.max_abs_epsilon,
        max_consecutive_skips: int | None = ZOAConfig.max_consecutive_skips,
        estimator: Literal["spsa", "per_sample", "first_order"] = ZOAConfig.estimator,
        perturbation: Literal["segmented_uniform", "rademacher"] | None = ZOAConfig.perturbation,
        normalize_step: bool = ZOAConfig.normalize_step,
        normalize_floor: float = ZOAConfig.normalize_floor,
        normalize_momentum: float = ZOAConfig.normalize_momentum,
        snr_step: bool = ZOAConfig.snr_step,
        snr_reference: float = ZOAConfig.snr_reference,
        snr_momentum: float = ZOAConfig.snr_momentum,
        guard: bool = ZOAConfig.guard,
        guard_every: int | None = ZOAConfig.guard_every,
        guard_ratio: float = ZOAConfig.guard_ratio,
        tap_attribution: bool = ZOAConfig.tap_attribution,
        pool_images: int = ZOAConfig.pool_images,
        bn_prior: float = ZOAConfig.bn_prior,
        source_batches: int | None = None,
        adapt_norms: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        arguments = dict(locals())
        super().__init__(network, weights, num_classes, name)
        if adapt_norms is not None and (not adapt_norms or len(set(adapt_norms)) != len(adapt_norms)):
            raise ValueError(f"adapt_norms must name at least one layer, each once; got {adapt_norms}")
        self.adapt_norms = None if adapt_norms is None else list(adapt_norms)
        self.config = ZOAConfig(**{f.name: arguments[f.name] for f in dataclasses.fields(ZOAConfig)})
        if self.config.estimator == "per_sample":  # refused at once for a BatchNorm network, not after calibration
            check_estimator(self.config, self._layout(self.get_network()), world_size=1)

    @override
    def build_adapter(self, network: nn.Module) -> ZOA:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        # Under DDP every BatchNorm2d normalises with the global batch's all-reduced statistics (exact); other
        # BatchNorm kinds would see only this process's slice.
        inexact = [type(m).__name__ for m in network.modules() if isinstance(m, _BatchNorm) and not isinstance(
            m, nn.BatchNorm2d)]  # fmt: skip
        if world_size > 1 and inexact:
            raise ValueError(
                f"ZOA cannot run {self.network_name} on {world_size} processes exactly: its {sorted(set(inexact))} "
                "layers normalise with the statistics of each process's slice of the batch (only BatchNorm2d layers "
                "are synchronised). Run it with `trainer.devices: 1`"
            )
        layout = self._layout(network)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return ZOA(network, self.config, layout=layout, reduce_fn=self.reduce_sum, rank=rank, world_size=world_size)

    def runtime_layout(self, network: nn.Module) -> ModelLayout:
        """Where ZOA acts in the (float) ``network``: the layout a graph for ``callbacks.OnnxRuntimeCallback`` serves.

        Raises:
            ValueError: for the first-order oracle, which back-propagates (an inference engine cannot).
        """
        if self.config.estimator == "first_order":
            raise ValueError(
                f"{self.run_name} uses estimator='first_order', which back-propagates through the network: an ONNX "
                "Runtime session cannot. Run it on the torch backend (without callbacks.OnnxRuntimeCallback)"
            )
        return self._layout(network)

    def _layout(self, network: nn.Module) -> ModelLayout:
        """The spec's layout of ``network`` with ``adapt_norms`` if given (a graph: its own, checked against them)."""
        if isinstance(network, EngineNetwork):
            layout = network.adapted_layout()
            if self.adapt_norms is not None and set(self.adapt_norms) != set(layout.norms):
                raise ValueError(
                    f"the graph was exported for adapted layers {list(layout.norms)}, but adapt_norms names "
                    f"{self.adapt_norms}: export it again for these layers"
                )
            return layout
        layout = resolve_layout(network)
        if self.adapt_norms is not None:
            order = {name: i for i, (name, _) in enumerate(network.named_modules())}
            unknown = [n for n in self.adapt_norms if n not in order]
            if unknown:
                raise ValueError(
                    f"adapt_norms names {unknown}, which {self.network_name} does not have; adaptable layers are "
                    f"{list(layout.norms)} by default (see print(model) for every module name)"
                )
            layout = dataclasses.replace(layout, norms=tuple(sorted(self.adapt_norms, key=order.__getitem__)))
        return layout

    @override
    def run_info(self) -> dict[str, Any]:
        info = super().run_info()
        if self.adapter is not None:
            info.update(
                adapted_values=self.adapter.bank.size,
                knowledge_entries=self.adapter.bank.num_entries - 1,
                stores=self.adapter.counter("stores"),
                evictions=self.adapter.counter("evictions"),
                unadapted_batches=self.adapter.counter("unadapted_batches"),
                mode=self.config.mode,
                reduced_bytes_per_batch=self.adapter.reduce.last_batch_bytes,
            )
        return info


def config_args_doc(indent: str = "        ") -> str:
    """The ``Args:`` entries of :class:`ZOAConfig`'s docstring, one per field, re-indented to ``indent``.

    Raises:
        RuntimeError: if a field has no entry (each field's description lives in ``ZOAConfig``'s docstring).
    """
    doc = ZOAConfig.__doc__ or ""
    lines = doc.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    entry_indent = len(lines[start]) - len(lines[start].lstrip())
    block: list[str] = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < entry_indent:
            break
        block.append(line)
    while block and not block[-1].strip():
        block.pop()
    documented = {line.strip().split(":", 1)[0] for line in block if len(line) - len(line.lstrip()) == entry_indent}
    missing = [f.name for f in dataclasses.fields(ZOAConfig) if f.name not in documented]
    if missing:
        raise RuntimeError(f"ZOAConfig's docstring documents no {missing}: add them to its Args section")
    return "\n".join(indent + line[entry_indent:] if line.strip() else "" for line in block).lstrip()


ZOAModule.__doc__ = (ZOAModule.__doc__ or "").replace(_CONFIG_ARGS, config_args_doc())
