"""A network's float and INT8 graphs written together, with a JSON sidecar of their metadata (``zoa export``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import Tensor, nn

from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.runtime.export import export_graph
from zoa_lightning.core.runtime.quantize import quantize_graph
from zoa_lightning.files import atomic_write

__all__ = ["PRECISIONS", "graph_paths", "write_graphs"]

PRECISIONS = ("float", "int8")


def graph_paths(folder: str | Path, stem: str) -> dict[str, Path]:
    """Where :func:`write_graphs` puts the graphs of ``stem``: ``<folder>/<stem>.<precision>.onnx``."""
    return {precision: Path(folder) / f"{stem}.{precision}.onnx" for precision in PRECISIONS}


def write_graphs(
    model: nn.Module,
    layout: ModelLayout | None,
    images: Tensor,
    folder: str | Path,
    stem: str,
    *,
    key: str = "",
    sidecar: bool = True,
) -> dict[str, Path]:
    """Export ``model``'s float graph, quantize it to INT8 on ``images``, and write both (and a JSON sidecar).

    Every file is written whole (a temporary file renamed into place), so processes that build the same graphs at once
    never read half a file.

    Args:
        model: the float torch network (not modified).
        layout: where ZOA acts (``None``: the plain network).
        images: clean calibration images ``(N, C, H, W)``; the graphs take their size.
        folder: where to write.
        stem: the files' common name.
        key: a cache key recorded in the metadata.
        sidecar: also write ``<stem>.json``: both graphs' metadata, without the binary values.

    Returns:
        ``{"float": path, "int8": path}``.
    """
    paths = graph_paths(folder, stem)
    Path(folder).mkdir(parents=True, exist_ok=True)
    described = {}
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        staged = graph_paths(scratch, stem)
        described["float"] = export_graph(model, layout, images, staged["float"], key=key).describe()
        described["int8"] = quantize_graph(staged["float"], staged["int8"], images, key=key).describe()
        for precision, path in paths.items():
            atomic_write(path, staged[precision].read_bytes())
    if sidecar:
        files = {precision: path.name for precision, path in paths.items()}
        atomic_write(Path(folder) / f"{stem}.json", json.dumps({"files": files, **described}, indent=2) + "\n")
    return paths
