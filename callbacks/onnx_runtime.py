"""Run the method's network in ONNX Runtime (INT8 or float) instead of torch: export, quantize, check, hand over.

The callback runs in ``setup("test")``, like :class:`~callbacks.quantization.QuantizationCallback`, before the
method's own setup. It asks the module where its method acts in the network (``runtime_layout``: ZOA's adapted
layers, taps and detector; ``None`` for ``no_adapt``, which runs the plain network), exports the float network for
that layout, quantizes it to INT8 with ONNX Runtime's static quantizer on the data module's calibration images (the
images the quantization callback would use), and hands the module a
:class:`~zoa_lightning.core.runtime.network.RuntimeNetwork`. The engine then adapts that session exactly as it adapts
a torch network (``docs/runtime.md``).

It takes the place of the fake quantizer: a :class:`~callbacks.quantization.QuantizationCallback` in the same run
steps aside (its ``calib_images`` are used; INT8 means W8A8, so its bit widths must be 8). Both graphs are cached
(``$ZOA_CACHE_DIR/onnx`` or ``~/.cache/zoa_lightning/onnx``), keyed by a hash of the network's weights, the layout,
the calibration images and the exporter and quantizer versions, and checked on load; or ``graph`` names a file
written by ``zoa export``, which is checked against the run (adapted layers, class count, image size, precision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from callbacks.quantization import QuantizationCallback
from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.protocols import RuntimeModule, StreamDataModule, missing_members
from zoa_lightning.core.runtime import require
from zoa_lightning.core.runtime.graphs import graph_paths, write_graphs
from zoa_lightning.core.runtime.metadata import GraphMetadata
from zoa_lightning.core.runtime.network import RuntimeNetwork
from zoa_lightning.core.runtime.quantize import read_metadata

__all__ = ["OnnxRuntimeCallback", "check_graph", "default_onnx_cache_dir", "precision_tag"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def default_onnx_cache_dir() -> Path:
    """``$ZOA_CACHE_DIR/onnx`` if the variable is set, else ``~/.cache/zoa_lightning/onnx``."""
    root = os.environ.get("ZOA_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "zoa_lightning") / "onnx"


def precision_tag(precision: str) -> str:
    """The run's precision label (results' ``bits``, the resume fingerprint): ``W8A8-ORT`` or ``float-ORT``."""
    return "W8A8-ORT" if precision == "int8" else "float-ORT"


def check_graph(
    metadata: GraphMetadata,
    path: str,
    layout: ModelLayout | None,
    num_classes: int,
    precision: str,
    input_size: tuple[int, ...] | None = None,
) -> None:
    """Refuse a graph that does not fit the run, with one line naming the difference and the fix.

    Args:
        metadata: the graph's metadata.
        path: its file (for the message).
        layout: where the run's method acts (``None``: the plain network).
        num_classes: the data's class count.
        precision: the precision the run asks for.
        input_size: the data's ``(C, H, W)`` (``None``: not checked).

    Raises:
        ValueError: for another precision, class count, image size or layout.
    """
    fix = "export it with this run's configs (`zoa export`) or drop `graph` to export automatically"
    if metadata.precision != precision:
        raise ValueError(
            f"{path} is the {metadata.precision} graph, but OnnxRuntimeCallback(precision={precision!r}) runs the "
            f"{precision} graph: give that one ({Path(path).name.replace(metadata.precision, precision)})"
        )
    if metadata.num_classes != num_classes:
        raise ValueError(f"{path} has {metadata.num_classes} classes but the data has {num_classes}: {fix}")
    if input_size is not None and tuple(metadata.input_size) != tuple(input_size):
        raise ValueError(f"{path} takes images {tuple(metadata.input_size)} but the data gives {input_size}: {fix}")
    if layout is None and metadata.layout is not None:
        raise ValueError(f"{path} is an adaptable graph, but this method runs the plain network: {fix}")
    if layout is not None and metadata.layout is None:
        raise ValueError(f"{path} is a plain graph without the adaptation inputs params, shift and outputs: {fix}")
    if layout is not None and metadata.layout is not None and metadata.layout != layout:
        if metadata.layout.norms != layout.norms:
            what = f"adapted layers {list(metadata.layout.norms)}; this run adapts {list(layout.norms)}"
        else:
            what = f"the layout {metadata.layout}; this run's is {layout}"
        raise ValueError(f"{path} was exported for {what}: {fix}")


class OnnxRuntimeCallback(Callback):
    """Run the method's network as an ONNX Runtime graph (INT8 or float) instead of a torch module.

    Args:
        precision: ``"int8"`` (ONNX Runtime's static QDQ quantization: W8A8) or ``"float"`` (the exported float graph).
        graph: a graph file written by ``zoa export`` to run instead of exporting; it must fit the run (method's
            adapted layers, class count, image size, ``precision``).
        calib_images: clean calibration images for the INT8 graph (``None``: the config's
            ``QuantizationCallback`` ``calib_images``, else 32).
        intra_op_threads: ONNX Runtime threads inside an operator, per process (1 by default, docs/runtime.md).
        inter_op_threads: ONNX Runtime threads across operators.
        cache: reuse and store exported graphs.
        cache_dir: where graphs are cached (default: see the module docstring).

    Raises:
        ValueError: for an unknown precision or a thread count below 1.
    """

    def __init__(
        self,
        precision: Literal["int8", "float"] = "int8",
        graph: str | None = None,
        calib_images: int | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        if precision not in ("int8", "float"):
            raise ValueError(f"precision must be 'int8' or 'float', got {precision!r}")
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if calib_images is not None and calib_images < 1:
            raise ValueError(f"calib_images must be >= 1 or None, got {calib_images}")
        self.precision, self.graph, self.calib_images = precision, graph, calib_images
        self.threads = (intra_op_threads, inter_op_threads)
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_onnx_cache_dir()
        self.last_cache_hit: bool | None = None
        self.last_graph: Path | None = None

    @property
    def state_key(self) -> str:
        """Unique per setting."""
        return f"OnnxRuntimeCallback[precision={self.precision},graph={self.graph}]"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        require("onnxruntime")
        if not isinstance(pl_module, RuntimeModule):
            raise TypeError(
                f"OnnxRuntimeCallback runs no_adapt and ZOA (zoa, zoa_shift_only, zoa_per_sample, ...); "
                f"{type(pl_module).__name__} lacks {missing_members(pl_module, RuntimeModule)}: run it without the "
                "callback (on the torch backend)"
            )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at run time
        if not isinstance(datamodule, StreamDataModule):
            raise TypeError(
                f"OnnxRuntimeCallback needs a stream data module for its calibration images; "
                f"{type(datamodule).__name__} lacks {missing_members(datamodule, StreamDataModule)}"
            )
        if trainer.strategy.root_device.type != "cpu":
            raise ValueError(
                f"OnnxRuntimeCallback runs ONNX Runtime on the CPU, but the run is on {trainer.strategy.root_device}: "
                "set trainer.accelerator: cpu"
            )
        calib = self.calibration_count(trainer.callbacks)  # type: ignore[attr-defined]
        network = pl_module.get_network()
        if isinstance(network, RuntimeNetwork):
            raise ValueError("the module's network already runs in ONNX Runtime: use one OnnxRuntimeCallback")
        layout = pl_module.runtime_layout(network)
        images = datamodule.calibration_images(calib).cpu()
        path = Path(self.graph) if self.graph is not None else self.graphs(network, layout, images)[self.precision]
        runtime = RuntimeNetwork(path, *self.threads)
        check_graph(
            runtime.metadata, str(path), layout, datamodule.num_classes, self.precision, tuple(images.shape[1:])
        )
        self.last_graph = path
        pl_module.set_network(runtime, precision_tag(self.precision))
        rank_zero_info(f"running {runtime.metadata.network} in ONNX Runtime ({self.precision}, {path})")

    def calibration_count(self, callbacks: list[Callback]) -> int:
        """The calibration image count for a run with ``callbacks``; checks a quantization callback among them.

        Raises:
            ValueError: if a ``QuantizationCallback`` asks for other bits than W8A8, or for any quantization while
                this callback runs the float graph.
        """
        quantizers = [c for c in callbacks if isinstance(c, QuantizationCallback)]
        for quantizer in quantizers:
            if self.precision == "float":
                raise ValueError(
                    "OnnxRuntimeCallback(precision='float') runs the float graph, but the config also quantizes "
                    f"({quantizer.precision}): drop callbacks.QuantizationCallback or use precision int8"
                )
            if quantizer.precision != "W8A8":
                raise ValueError(
                    f"OnnxRuntimeCallback quantizes to W8A8 only, but the config's QuantizationCallback asks for "
                    f"{quantizer.precision}: use an 8-bit config or run that precision on the torch backend"
                )
        if self.calib_images is not None:
            return self.calib_images
        return quantizers[0].calib_images if quantizers else 32

    def graphs(self, network: nn.Module, layout: ModelLayout | None, images: Tensor) -> dict[str, Path]:
        """The float and INT8 graphs of ``network`` for ``layout``, through the cache (built if missing or unfit)."""
        key = self.cache_key(network, layout, images)
        folder = self.cache_dir if self.cache else self.cache_dir / "uncached"
        paths = graph_paths(folder, key)
        self.last_cache_hit = False
        if self.cache and all(p.is_file() for p in paths.values()):
            try:
                found = {p: read_metadata(path).key for p, path in paths.items()}
                if all(k == key for k in found.values()):
                    self.last_cache_hit = True
                    return paths
                reason = f"recorded keys {sorted(set(found.values()))}"
            except (ValueError, OSError, RuntimeError) as error:  # a damaged file: rebuild it
                reason = str(error)[:300]
            log.warning("cached ONNX graphs %s do not fit (%s); exporting again", paths[self.precision], reason)
        with torch.inference_mode(False):
            return write_graphs(network, layout, images, folder, key, key=key, sidecar=False)

    def cache_key(self, network: nn.Module, layout: ModelLayout | None, images: Tensor) -> str:
        """``<network>-<zoa|plain>-<hash>``: the weights, the layout, the images and the exporter's versions."""
        ort, onnx = require("onnxruntime"), require("onnx")
        digest = hashlib.sha256()
        settings: dict[str, Any] = {
            "version": CACHE_VERSION, "arch": type(network).__name__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "layout": None if layout is None else json.loads(json.dumps(layout.__dict__)),
        }  # fmt: skip
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for key, value in network.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digest.update(images.detach().cpu().float().contiguous().numpy().tobytes())
        kind = "plain" if layout is None else f"zoa-{layout.kind}"
        return f"{type(network).__name__.lower()}-{kind}-{digest.hexdigest()[:20]}"
