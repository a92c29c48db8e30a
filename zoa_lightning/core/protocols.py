"""The contracts between the pieces, as structural protocols (checked with ``isinstance`` where they are used).

* Glue to glue: callbacks never import the LightningModule and the module never imports callbacks; each side checks
  in ``setup`` that the other implements what it needs (:class:`QuantizableModule`, :class:`AdaptationModule`,
  :class:`StreamDataModule`) and fails early with a message naming the missing method.
* Core to glue: a method's pure-torch adapter is a :class:`StreamAdapter` (call it on images, get logits; it counts
  its forward passes). What else it offers is optional and detected: :class:`SourceStatisticsAdapter`,
  :class:`RollbackAdapter`, :class:`BankAdapter`, :class:`ReportingAdapter`, and a ``requires_autograd`` flag.
  :class:`~zoa_lightning.module.StreamModule` handles each capability once for every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "AdaptationModule",
    "BankAdapter",
    "MixingBank",
    "QuantizableModule",
    "ReportingAdapter",
    "RollbackAdapter",
    "SourceDataModule",
    "SourceStatisticsAdapter",
    "StreamAdapter",
    "StreamDataModule",
    "missing_members",
]


@runtime_checkable
class StreamAdapter(Protocol):
    """A test-time adaptation method in pure torch, as a stream module runs it.

    Calling it on a batch of images ``(B, C, H, W)`` returns the logits ``(B, classes)`` it predicts for them, adapting
    on the batch first or afterwards as the method does. The stream module calls it under ``torch.no_grad`` (an adapter
    that back-propagates enables grad itself and sets ``requires_autograd = True``: the module then refuses to run it
    under ``torch.inference_mode``, naming the Trainer flag).

    Ownership of the network: an adapter that is an ``nn.Module`` owns it (as its ``model``); the stream module
    registers the adapter as its child ``adapter``, so the adapter's whole state, network included, is checkpointed
    under ``adapter.*``. An adapter that holds no tensor of its own may be a plain object; the network then stays the
    stream module's child ``net`` (checkpoint keys ``net.*``).

    Examples: :class:`~zoa_lightning.core.ZOA`, :class:`~zoa_lightning.core.methods.t3a.T3A`,
    :class:`~zoa_lightning.core.methods.no_adapt.NoAdapt`.
    """

    model: nn.Module
    """The network it adapts (quantized or not)."""

    @property
    def forward_passes(self) -> int:
        """Network forward passes spent so far (the cost reports' unit)."""
        ...

    def __call__(self, images: Tensor) -> Tensor:
        """Predict the logits of ``images``, adapting on them if the method adapts."""
        ...


@runtime_checkable
class SourceStatisticsAdapter(Protocol):
    """An adapter that needs statistics of clean source images before the stream starts (ZOA, FOA)."""

    def collect_source_statistics(self, loader: Iterable[Any], max_batches: int | None = None) -> None:
        """Compute the source statistics from ``loader`` (image tensors, on the network's device).

        Args:
            loader: clean image batches.
            max_batches: use only the first ``max_batches`` batches (``None``: all).
        """
        ...


@runtime_checkable
class RollbackAdapter(Protocol):
    """An adapter that can decline to adapt on a batch (a rolled-back or skipped update), still predicting it."""

    @property
    def skipped_batches(self) -> int:
        """Batches predicted but not adapted on, so far."""
        ...


class MixingBank(Protocol):
    """A knowledge bank that mixes stored adaptation states with softmax weights."""

    def mixing_weights(self) -> Tensor:
        """The current mixing weights over the stored entries."""
        ...


@runtime_checkable
class BankAdapter(Protocol):
    """An adapter with a knowledge bank whose events a bank callback reports (ZOA)."""

    events: list[dict[str, Any]]
    """Adaptation events (stores, evictions, detections), oldest first; the stream module drains it."""

    bank: MixingBank
    """The knowledge bank."""


@runtime_checkable
class ReportingAdapter(Protocol):
    """An adapter with facts of its own for the run's summary (support counts, backward passes, ...)."""

    def run_info(self) -> dict[str, Any]:
        """Plain values to add to the stream module's ``run_info()``."""
        ...


@runtime_checkable
class QuantizableModule(Protocol):
    """A module whose network a quantization callback may replace before testing."""

    def get_network(self) -> nn.Module:
        """The float network to quantize."""
        ...

    def set_network(self, network: nn.Module, precision: str) -> None:
        """Install the quantized network; ``precision`` is a tag such as ``"W8A8"``."""
        ...


@runtime_checkable
class AdaptationModule(Protocol):
    """A module whose adaptation events a bank callback reports."""

    def pop_adaptation_events(self) -> list[dict[str, Any]]:
        """Events since the last call (knowledge stores, evictions, detections), oldest first."""
        ...

    def mixing_weights(self) -> Tensor | None:
        """Current knowledge-mixing weights, or ``None`` for a method without a bank."""
        ...


@runtime_checkable
class SourceDataModule(Protocol):
    """What a method's setup reads from a data module: the clean source images."""

    def source_dataloader(self) -> Any:
        """Clean images for source statistics (batches of images, or tuples/lists whose first element is them)."""
        ...


@runtime_checkable
class StreamDataModule(Protocol):
    """What the adaptation modules need from a data module."""

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain of the stream, in order (``"r1/gaussian_noise"``, ...)."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        ...

    def source_dataloader(self) -> Any:
        """Clean images for source statistics."""
        ...

    def calibration_images(self, n: int = 32) -> Tensor:
        """``n`` clean, normalised images for quantization calibration."""
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Names of the protocol's public members (methods, properties and annotated attributes) that ``obj`` lacks.

    For error messages, e.g. ``missing_members(adapter, StreamAdapter) == ["forward_passes"]``.
    """
    names = [*vars(protocol), *getattr(protocol, "__annotations__", {})]
    members = [n for n in dict.fromkeys(names) if not n.startswith("_") or n == "__call__"]
    return [n for n in members if not hasattr(obj, n)]
