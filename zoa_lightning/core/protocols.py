"""The contracts between the pieces, as structural protocols (checked with ``isinstance`` where they are used).

* Core to glue: every method's adapter is a :class:`~zoa_lightning.core.methods.base.Adapter`; what some adapters
  offer beyond it is a protocol here: :class:`SourceStatisticsAdapter` (clean-data statistics before the stream) and
  :class:`BankAdapter` (a knowledge bank whose events are reported).
* Glue to glue: callbacks never import the LightningModule and the module never imports callbacks; each side checks
  in ``setup`` that the other implements what it needs (:class:`QuantizableModule`, :class:`RuntimeModule`,
  :class:`ResultsModule`, :class:`AdaptationModule`, :class:`StreamDataModule`, :class:`ResumableDataModule`) and fails
  early with a message naming what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from zoa_lightning.core.layout import ModelLayout

__all__ = [
    "AdaptationModule",
    "BankAdapter",
    "FingerprintedModule",
    "MixingBank",
    "PrecisionCallback",
    "QuantizableModule",
    "ResultsModule",
    "ResumableDataModule",
    "RuntimeModule",
    "SourceDataModule",
    "SourceStatisticsAdapter",
    "StreamDataModule",
    "missing_members",
]


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


class MixingBank(Protocol):
    """A knowledge bank that mixes stored adaptation states with softmax weights."""

    def mixing_weights(self) -> Tensor:
        """The current mixing weights over the stored entries."""
        ...


@runtime_checkable
class BankAdapter(Protocol):
    """An adapter with a knowledge bank whose events a callback reports (ZOA)."""

    events: list[dict[str, Any]]
    """Adaptation events (stores, evictions, detections), oldest first; the stream module drains it."""

    bank: MixingBank
    """The knowledge bank."""


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
class RuntimeModule(QuantizableModule, Protocol):
    """A module whose method can run on a network an inference engine runs (``callbacks.OnnxRuntimeCallback``)."""

    def runtime_layout(self, network: nn.Module) -> ModelLayout | None:
        """Where the method acts in ``network``: the layout an exported graph must serve, or ``None`` (plain graph).

        Raises:
            ValueError: if the method's settings cannot run on an inference engine (the message says why).
        """
        ...


@runtime_checkable
class ResultsModule(Protocol):
    """What a results callback reads from a stream module: the finished domains and the run's description."""

    def stream_results(self) -> list[dict[str, Any]]:
        """One row per finished domain, in stream order, keyed like :class:`zoa_lightning.reporting.DomainRow`."""
        ...

    def run_info(self) -> dict[str, Any]:
        """``method``, ``model`` and ``bits`` strings, plus optional extra scalar entries."""
        ...


@runtime_checkable
class FingerprintedModule(Protocol):
    """A stream module that can say what identifies its run (stream, method, precision) in plain values."""

    def stream_fingerprint(self) -> dict[str, Any]:
        """``{"data": ..., "method": ..., "precision": ...}`` (see :mod:`zoa_lightning.resume`)."""
        ...


@runtime_checkable
class PrecisionCallback(Protocol):
    """A callback that sets the network's precision before the method runs (a quantizer)."""

    @property
    def precision(self) -> str:
        """The precision tag it gives the network, e.g. ``"W8A8"``."""
        ...


@runtime_checkable
class AdaptationModule(ResultsModule, Protocol):
    """What the adaptation monitor and the stream checkpoint read from a stream module (``StreamModule``)."""

    run_name: str
    """The run's method label (result folders, tables)."""

    start_domain: int
    """Index of the first domain this run tests (a resumed run starts after the finished ones)."""

    def pop_adaptation_events(self) -> list[dict[str, Any]]:
        """Events since the last call (knowledge stores, evictions, detections), oldest first."""
        ...

    def mixing_weights(self) -> Tensor | None:
        """Current knowledge-mixing weights, or ``None`` for a method without a bank."""
        ...

    def skipped_batches(self) -> int:
        """Batches whose adaptation was rolled back so far."""
        ...

    def last_losses(self) -> tuple[float, ...]:
        """The last batch's loss values (empty for a method without a loss)."""
        ...


@runtime_checkable
class SourceDataModule(Protocol):
    """What a method's setup reads from a data module: the clean source images."""

    def source_dataloader(self) -> Any:
        """Clean images for source statistics (batches of images, or tuples/lists whose first element is them)."""
        ...


@runtime_checkable
class StreamDataModule(Protocol):
    """What the stream modules need from a data module."""

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


@runtime_checkable
class ResumableDataModule(Protocol):
    """A stream data module that can start a run after the domains a checkpoint finished, and name its stream."""

    start_domain: int
    """Index of the first domain ``test_dataloader()`` yields."""

    stop_domain: int | None
    """Index after the last domain to run (``None``: the end of the stream)."""

    def resume_from(self, next_domain: int) -> tuple[str, ...]:
        """Start the stream at ``next_domain``; returns the domains left to run (empty: the stream is finished)."""
        ...

    def stream_fingerprint(self) -> dict[str, Any]:
        """Plain values that identify the stream (images, corruptions and their order, batch size, ...)."""
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Names of the protocol's public members (methods, properties and annotated attributes) that ``obj`` lacks.

    Members a protocol inherits from the protocols it extends count too.

    For error messages, e.g. ``missing_members(object(), SourceDataModule) == ["source_dataloader"]``.
    """
    protocols = [c for c in reversed(protocol.__mro__) if getattr(c, "_is_protocol", False) and c is not Protocol]
    names = [n for c in protocols for n in (*vars(c), *vars(c).get("__annotations__", {}))]
    members = [n for n in dict.fromkeys(names) if not n.startswith("_") or n == "__call__"]
    return [n for n in members if not hasattr(obj, n)]
