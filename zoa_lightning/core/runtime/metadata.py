"""What an exported graph carries about itself, and the checks a run makes before trusting it.

A graph exported by :func:`~zoa_lightning.core.runtime.export.export_graph` holds one JSON entry, ``zoa``, in the ONNX
model's ``metadata_props``: :class:`GraphMetadata`. It names the adapted layers and the rest of the
:class:`~zoa_lightning.core.layout.ModelLayout` (``None``: a plain graph, images to logits), the class count, the
image size, the width of every loss tap, the detector's size, the pretrained affine values of the adapted layers and
the running statistics every BatchNorm starts from (the engine's bank and running estimates start there, exactly as
they start from a torch network's own parameters), and whether the graph is float or int8.

The graph's inputs and outputs (:data:`ADAPTATION_INPUTS`, :data:`ADAPTATION_OUTPUTS`; CNNs add
:data:`BATCH_NORM_INPUTS` and ``bn_stats``) have one row per image, ``rows`` being one dynamic dimension shared by all
of them; a plain graph has ``images`` and ``logits`` only.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from zoa_lightning.core.layout import ModelLayout

__all__ = [
    "ADAPTATION_INPUTS",
    "ADAPTATION_OUTPUTS",
    "BATCH_NORM_INPUTS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "GraphMetadata",
    "missing_io",
    "write_metadata",
]

METADATA_KEY = "zoa"
"""The ``metadata_props`` entry holding :class:`GraphMetadata` as JSON."""
FORMAT_VERSION = 1
ADAPTATION_INPUTS = ("images", "params", "shift")
"""Inputs of an adaptable graph: images ``(rows, C, H, W)``, the adapted affine values ``(rows, P)`` (the knowledge
bank's flat layout), the activation shift ``(rows, D)``."""
BATCH_NORM_INPUTS = ("running", "prior")
"""A BatchNorm graph's extra inputs: the running estimates ``(S,)`` float64 and the prior strength ``(1,)`` float64."""
ADAPTATION_OUTPUTS = ("logits", "shifted_logits", "features", "det_sum", "det_sumsq")
"""Outputs of an adaptable graph: logits, ``head(final + shift)``, the loss features ``(rows, F)`` (taps, then the
head input), the detector tensor's per-image channel sums and sums of squares ``(rows, C)`` float64."""


def _encode(values: Tensor) -> str:
    return base64.b64encode(values.detach().cpu().contiguous().numpy().tobytes()).decode("ascii")


def _decode(text: str, dtype: type) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=dtype).copy())


@dataclass(frozen=True)
class GraphMetadata:
    """What an exported graph says about itself (stored as JSON in the graph).

    Args:
        precision: ``"float"`` or ``"int8"``.
        num_classes: the classifier's outputs.
        input_size: ``(C, H, W)`` of the images the graph takes.
        network: the exported network's class name (for messages).
        layout: where the engine acts (``None``: a plain graph without adaptation inputs and outputs).
        tap_dims: the width of each loss tap, the head input last.
        detector_channels: channels of the detector tensor.
        detector_values: values per channel and image the detector sums cover (tokens or pixels).
        widths: channels of each adapted layer (the bank's layout).
        base: the adapted layers' pretrained affine values, float32, base64.
        batch_norm_channels: channels of every BatchNorm, in the order of the ``running`` input and ``bn_stats``.
        running: every BatchNorm's source ``[mean, var]``, float32, base64 (where the running estimates start).
        first_taps: for each adapted layer, the index of the first loss tap computed after it (tap attribution).
        key: the export cache key (empty for a graph exported without a cache).
        version: the metadata format.
    """

    precision: Literal["float", "int8"]
    num_classes: int
    input_size: tuple[int, int, int]
    network: str
    layout: ModelLayout | None = None
    tap_dims: tuple[int, ...] = ()
    detector_channels: int = 0
    detector_values: int = 0
    widths: tuple[int, ...] = ()
    base: str = ""
    batch_norm_channels: tuple[int, ...] = ()
    running: str = ""
    first_taps: tuple[int, ...] = ()
    key: str = ""
    version: int = FORMAT_VERSION

    @property
    def adaptable(self) -> bool:
        """Whether the graph has the adaptation inputs and outputs (a plain graph maps images to logits only)."""
        return self.layout is not None

    def base_values(self) -> Tensor:
        """The adapted layers' pretrained affine values ``(P,)``, float32."""
        return _decode(self.base, np.float32)

    def running_starts(self) -> list[tuple[Tensor, Tensor]]:
        """Every BatchNorm's source ``(mean, var)``, float32, in the graph's order."""
        values, starts, offset = _decode(self.running, np.float32), [], 0
        for c in self.batch_norm_channels:
            starts.append((values[offset : offset + c], values[offset + c : offset + 2 * c]))
            offset += 2 * c
        return starts

    @staticmethod
    def encode(values: Tensor) -> str:
        """``values`` as the base64 text of their float32 bytes (for ``base`` and ``running``)."""
        return _encode(values.float())

    def to_json(self) -> str:
        """The JSON text stored in the graph."""
        data = dataclasses.asdict(self)
        data["layout"] = None if self.layout is None else dataclasses.asdict(self.layout)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> GraphMetadata:
        """Parse :meth:`to_json`'s text.

        Raises:
            ValueError: naming ``source`` for text that is not this format (another version, missing fields).
        """
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')}, this code reads {FORMAT_VERSION}")
            layout = data.pop("layout")
            if layout is not None:
                fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in layout.items()}
                layout = ModelLayout(**fields)
            tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
            return cls(**{**data, **tuples, "layout": layout})
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{source}: its zoa metadata cannot be read ({error}); export the graph again") from error

    def describe(self) -> dict[str, Any]:
        """Plain values for a JSON sidecar or a message (without the binary values)."""
        data = json.loads(self.to_json())
        return {k: v for k, v in data.items() if k not in ("base", "running")}


def missing_io(metadata: GraphMetadata, inputs: list[str], outputs: list[str]) -> list[str]:
    """The inputs and outputs an adaptable graph needs (for its metadata's kind) that ``inputs``/``outputs`` lack."""
    if not metadata.adaptable:
        needed_in, needed_out = ["images"], ["logits"]
    else:
        cnn = bool(metadata.batch_norm_channels)
        needed_in = [*ADAPTATION_INPUTS, *(BATCH_NORM_INPUTS if cnn else ())]
        needed_out = [*ADAPTATION_OUTPUTS, *(("bn_stats",) if cnn else ())]
    missing = [f"input {n}" for n in needed_in if n not in inputs]
    return missing + [f"output {n}" for n in needed_out if n not in outputs]


def write_metadata(graph: Any, metadata: GraphMetadata) -> None:
    """Set (replace) the ``zoa`` metadata entry of an ONNX ``ModelProto``."""
    for prop in list(graph.metadata_props):
        if prop.key == METADATA_KEY:
            graph.metadata_props.remove(prop)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
