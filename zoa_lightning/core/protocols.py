"""The contracts between the Lightning glue pieces, as structural protocols (checked with ``isinstance``).

Callbacks never import the LightningModule and the module never imports callbacks; each side checks in ``setup``
that the other implements what it needs and fails early with a message naming the missing method.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["AdaptationModule", "QuantizableModule", "StreamDataModule", "missing_members"]


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
    """Names of the protocol's members that ``obj`` lacks (for error messages)."""
    members = [n for n in vars(protocol) if not n.startswith("_")]
    return [n for n in members if not hasattr(obj, n)]
