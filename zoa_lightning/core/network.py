"""How the engine meets its network, whatever runs it: recorded passes through one small interface (spec §2, §5.1).

The engine (:class:`~zoa_lightning.core.zoa.ZOA`) never calls its network directly: it asks a :class:`Forward` for
recorded passes (logits and a :class:`~zoa_lightning.core.taps.PassRecord` of the loss taps, the head input and, with
a shift, the shifted logits), gets the detector's statistics through a callback, and sets the values the adapted norm
layers use through its :class:`~zoa_lightning.core.bank.KnowledgeBank` (``fused()``; per-image values inside
``evaluated_at``; the pretrained ones inside ``pretrained``). Two kinds of network implement it:

* a torch network (``nn.Module``): :func:`~zoa_lightning.core.bank.fuse_norms` replaces its adapted norm layers by
  fused layers reading the bank, every BatchNorm follows :class:`~zoa_lightning.core.batch_norm.BatchStatistics`,
  and :class:`~zoa_lightning.core.taps.NetworkTaps` records the passes with forward hooks;
* an :class:`EngineNetwork`: a network run by an inference engine (an ONNX Runtime session,
  :mod:`zoa_lightning.core.runtime`) whose graph reads the adapted values from its inputs, one row per image. Its
  ``bind`` builds the bank from the graph's pretrained values and returns a :class:`Forward` that turns the bank's
  state into those rows at every pass.

Everything else, the per-batch algorithm included, is the same code for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from zoa_lightning.core.bank import KnowledgeBank, fuse_norms
from zoa_lightning.core.batch_norm import BatchStatistics
from zoa_lightning.core.detector import DetectorSums
from zoa_lightning.core.layout import ModelLayout, default_input_size, resolve_layout
from zoa_lightning.core.taps import NetworkTaps, PassMode, PassRecord

__all__ = ["DetectorCallback", "EngineNetwork", "Forward", "bind_network", "network_input_size", "network_layout"]

DetectorCallback = Callable[[Tensor | DetectorSums, PassRecord], None]
"""Called once per recorded pass (not probes, not predictions) with the detector tensor or its sums, and the record."""


class Forward(Protocol):
    """Recorded passes of the network the engine adapts."""

    def run(
        self, images: Tensor, mode: PassMode, pass_index: int = 0, shift: Tensor | None = None
    ) -> tuple[Tensor, PassRecord]:
        """One pass on ``images`` with the bank's current values; ``(logits, record)``.

        Args:
            images: the batch ``(B, C, H, W)``.
            mode: ``"probe"`` (sizes only), ``"source"``, ``"adapt"`` (both call the detector callback) or
                ``"predict"``.
            pass_index: 0 for the prediction pass, 1 for a perturbed pass.
            shift: the activation shift ``(D,)``; the record then holds ``head(final + shift)`` in ``shifted``.
        """
        ...

    def first_taps(self, images: Tensor, modules: Sequence[str]) -> list[int]:
        """For each named module, the index of the first loss tap computed after it (tap attribution)."""
        ...


@runtime_checkable
class EngineNetwork(Protocol):
    """A network run by an inference engine, which the engine adapts through the graph's inputs."""

    input_size: tuple[int, int, int]
    """``(C, H, W)`` of the images the graph takes."""

    def adapted_layout(self) -> ModelLayout:
        """The layout the graph was exported for (its adapted layers, taps, detector and head).

        Raises:
            ValueError: for a graph without the adaptation inputs and outputs (the message names them).
        """
        ...

    def bind(
        self, statistics: BatchStatistics, on_detector: DetectorCallback, world_size: int, estimator: str, **bank: Any
    ) -> tuple[KnowledgeBank, Forward]:
        """The bank of the graph's adapted values and the :class:`Forward` that runs the graph with them.

        Args:
            statistics: the engine's BatchNorm settings; every BatchNorm of the graph registers its running estimate.
            on_detector: the engine's detector callback.
            world_size: the number of processes adapting together.
            estimator: the engine's gradient estimator (an inference engine cannot back-propagate).
            **bank: keyword arguments of :class:`~zoa_lightning.core.bank.KnowledgeBank`.

        Raises:
            ValueError: for what the graph cannot do (the first-order oracle; BatchNorm statistics over processes).
        """
        ...


def network_layout(model: nn.Module, layout: ModelLayout | None) -> ModelLayout:
    """The checked layout the engine adapts ``model`` with (``layout``, or the model's own).

    Raises:
        ValueError: if ``layout`` names missing modules, or differs from the layout an engine network's graph was
            exported for (the message names both).
    """
    if isinstance(model, EngineNetwork):
        own = model.adapted_layout()
        if layout is not None and layout != own:
            what = (
                f"adapted layers {list(own.norms)}, but this run adapts {list(layout.norms)}"
                if layout.norms != own.norms
                else f"the layout {own}, but this run uses {layout}"
            )
            raise ValueError(f"the graph was exported for {what}: export it again for this run's layers")
        return own
    layout = layout if layout is not None else resolve_layout(model)
    layout.check(model)
    return layout


def bind_network(
    model: nn.Module,
    layout: ModelLayout,
    statistics: BatchStatistics,
    on_detector: DetectorCallback,
    *,
    world_size: int = 1,
    estimator: str = "spsa",
    **bank_options: Any,
) -> tuple[KnowledgeBank, Forward]:
    """Connect the network to a new knowledge bank and return ``(bank, forward)``.

    A torch network is modified in place (:func:`~zoa_lightning.core.bank.fuse_norms`) and recorded by hooks
    (:class:`~zoa_lightning.core.taps.NetworkTaps`); an :class:`EngineNetwork` binds itself.

    Args:
        model: the network.
        layout: its checked layout (:func:`network_layout`).
        statistics: the BatchNorm settings and running estimates the engine keeps.
        on_detector: the engine's detector callback.
        world_size: the number of processes adapting together.
        estimator: the gradient estimator.
        **bank_options: keyword arguments of :class:`~zoa_lightning.core.bank.KnowledgeBank`.
    """
    if isinstance(model, EngineNetwork):
        return model.bind(statistics, on_detector, world_size, estimator, **bank_options)
    bank = fuse_norms(model, layout, statistics, **bank_options)
    return bank, NetworkTaps(model, layout, on_detector)


def network_input_size(model: nn.Module, layout: ModelLayout) -> tuple[int, int, int]:
    """``(C, H, W)`` for the engine's probe pass: an engine network's graph size, else the model's default size."""
    if isinstance(model, EngineNetwork):
        return model.input_size
    return default_input_size(model, layout)
