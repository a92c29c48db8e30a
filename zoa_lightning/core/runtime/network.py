"""A network run by an ONNX Runtime session that the engine adapts: :class:`RuntimeNetwork` (docs/runtime.md).

:class:`RuntimeNetwork` is an ``nn.Module`` without tensors around an ``onnxruntime.InferenceSession`` on the CPU.
Called on images it returns logits, like the torch network it was exported from. Given to
:class:`~zoa_lightning.core.zoa.ZOA` it is an :class:`~zoa_lightning.core.network.EngineNetwork`: ``bind`` builds the
knowledge bank from the graph's pretrained values and registers every BatchNorm's running estimate, and
:class:`SessionForward` runs the passes. Each pass is one session call; its ``params`` rows are the bank's values at
that moment (``bank.fused()``: the current values, a per-image override inside ``evaluated_at``, the pretrained
values inside ``pretrained``), its ``shift`` rows the activation shift, and for BatchNorm graphs its ``running`` and
``prior`` inputs the engine's :class:`~zoa_lightning.core.batch_norm.BatchStatistics`. The outputs fill the same
:class:`~zoa_lightning.core.taps.PassRecord` a torch pass fills; the detector's sums go to the engine's detector
callback after the call (in a torch pass it fires mid-pass, before the adapted layers: a knowledge store leaves the
adapted values unchanged, so the order changes nothing but rounding), and a recording pass's BatchNorm statistics
go to ``BatchStatistics.note``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.batch_norm import BatchStatistics
from zoa_lightning.core.detector import DetectorSums
from zoa_lightning.core.layout import ModelLayout
from zoa_lightning.core.network import DetectorCallback
from zoa_lightning.core.runtime import require
from zoa_lightning.core.runtime.metadata import METADATA_KEY, GraphMetadata, missing_io
from zoa_lightning.core.taps import PassMode, PassRecord

__all__ = ["QUANTIZED_OPS", "RuntimeNetwork", "SessionForward", "inference_session"]

QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
)
"""Node types that make a graph an integer (quantized) graph."""


def inference_session(path: str | Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with the settings the runtime backend uses.

    Sequential execution, every graph optimisation (the QDQ to integer-kernel fusions happen there), the memory arena
    on and memory patterns off (a lower peak at the same speed, docs/runtime.md).

    Raises:
        ImportError: without onnxruntime (naming the extra).
        ValueError: for thread counts below 1.
    """
    ort = require("onnxruntime")
    if intra_op_threads < 1 or inter_op_threads < 1:
        raise ValueError(f"thread counts must be >= 1, got intra {intra_op_threads}, inter {inter_op_threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra_op_threads, inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena, options.enable_mem_pattern = True, False
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _is_quantized(path: str) -> bool:
    onnx = require("onnx")
    graph = onnx.load(path, load_external_data=False).graph
    return any(node.op_type in QUANTIZED_OPS for node in graph.node)


class RuntimeNetwork(nn.Module):
    """An exported graph in an ONNX Runtime CPU session: ``network(images) -> logits``; adaptable by ZOA.

    Args:
        path: the ``.onnx`` file (exported by :func:`~zoa_lightning.core.runtime.export.export_graph`, or quantized
            from one by :func:`~zoa_lightning.core.runtime.quantize.quantize_graph`).
        intra_op_threads: ONNX Runtime's threads inside an operator (1: like the torch runs it is compared with).
        inter_op_threads: threads across operators.

    Raises:
        ImportError: without onnxruntime.
        ValueError: for a file that is not such a graph (no metadata, missing inputs or outputs: the message names
            them), or whose metadata says float while its nodes are quantized (or the reverse).
    """

    def __init__(self, path: str | Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        super().__init__()
        self.path, self.threads = str(path), (intra_op_threads, inter_op_threads)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"ONNX graph not found: {self.path}")
        session = inference_session(self.path, intra_op_threads, inter_op_threads)
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise ValueError(
                f"{self.path} has no zoa metadata: it was not exported by zoa-lightning (`zoa export` or "
                "callbacks.OnnxRuntimeCallback write graphs the backend can run)"
            )
        metadata = GraphMetadata.from_json(text, self.path)
        missing = missing_io(metadata, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if missing:
            raise ValueError(f"{self.path} lacks the graph {', '.join(missing)}: export it again with `zoa export`")
        quantized = _is_quantized(self.path)
        if quantized != (metadata.precision == "int8"):
            state = "quantized (QDQ) nodes" if quantized else "no quantized nodes"
            raise ValueError(f"{self.path} says precision {metadata.precision} but has {state}: export it again")
        self.session, self.metadata = session, metadata
        self.input_size = metadata.input_size
        self._forward: SessionForward | None = None

    @property
    def precision(self) -> str:
        """``"float"`` or ``"int8"``."""
        return self.metadata.precision

    def adapted_layout(self) -> ModelLayout:
        """The layout the graph was exported for.

        Raises:
            ValueError: for a plain graph (no adaptation inputs and outputs).
        """
        if self.metadata.layout is None:
            raise ValueError(
                f"{self.path} is a plain graph (images to logits) without the adaptation inputs params, shift and the "
                "outputs features, det_sum, det_sumsq: export it for the adapting method (`zoa export` with its config)"
            )
        return self.metadata.layout

    def bind(
        self, statistics: BatchStatistics, on_detector: DetectorCallback, world_size: int, estimator: str, **bank: Any
    ) -> tuple[KnowledgeBank, SessionForward]:
        """The bank of the graph's adapted values and the forward that runs the graph with them (EngineNetwork).

        Raises:
            ValueError: for the first-order oracle (an inference engine cannot back-propagate), for a BatchNorm graph
                on several processes (its statistics cannot be summed over processes inside a session call), or for
                a network already bound to an engine.
        """
        layout = self.adapted_layout()
        if estimator == "first_order":
            raise ValueError(
                "estimator='first_order' back-propagates through the network, which an ONNX Runtime session cannot; "
                "run the first-order oracle on the torch backend (without callbacks.OnnxRuntimeCallback)"
            )
        if world_size > 1 and self.metadata.batch_norm_channels:
            raise ValueError(
                f"{self.metadata.network} normalises with batch statistics, which must be summed over the "
                f"{world_size} processes in the middle of the network: an ONNX Runtime session cannot; run it on one "
                "process (trainer.devices: 1) or on the torch backend"
            )
        if self._forward is not None:
            raise ValueError("this RuntimeNetwork is already adapted by an engine: give each engine its own copy")
        values = KnowledgeBank(self.metadata.widths, self.metadata.base_values(), **bank)
        offsets = [statistics.add(mean, var) for mean, var in self.metadata.running_starts()]
        self._forward = SessionForward(self, layout, values, statistics, offsets, on_detector)
        return values, self._forward

    def forward(self, images: Tensor) -> Tensor:
        """Logits of ``images``: a plain graph's, or an adaptable one's with its engine's current values.

        Before an engine binds it, an adaptable graph runs with the pretrained values and no shift.
        """
        if self._forward is not None:
            return self._forward.run(images, "predict")[0]
        feeds = {"images": _images(images, self.input_size)}
        if self.metadata.adaptable:
            rows = images.shape[0]
            feeds.update(params=np.repeat(self.metadata.base_values().numpy()[None], rows, 0), shift=np.zeros(
                (rows, self.metadata.tap_dims[-1]), np.float32))  # fmt: skip
            if self.metadata.batch_norm_channels:
                starts = self.metadata.running_starts()
                feeds.update(running=torch.cat([torch.cat(s) for s in starts]).double().numpy(), prior=np.zeros(1))
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])

    def __deepcopy__(self, memo: dict[int, Any]) -> RuntimeNetwork:
        """A copy sharing the (read-only) session, not bound to any engine."""
        copy = RuntimeNetwork.__new__(RuntimeNetwork)
        nn.Module.__init__(copy)
        copy.path, copy.threads, copy.session, copy.metadata = self.path, self.threads, self.session, self.metadata
        copy.input_size, copy._forward = self.input_size, None
        return copy

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the session (a process that unpickles it opens the file again)."""
        state = dict(self.__dict__)
        state["session"], state["_forward"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.session = inference_session(self.path, *self.threads)

    def extra_repr(self) -> str:
        """The file, its precision and its adapted layers, for ``print(model)``."""
        layout = self.metadata.layout
        what = "plain" if layout is None else f"{len(layout.norms)} adapted {layout.kind} norm layers"
        return f"{self.path}, {self.metadata.precision}, {what}"


def _images(images: Tensor, size: tuple[int, int, int]) -> np.ndarray:
    """``images`` as a contiguous float32 array, after checking their shape against the graph's."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(size):
        expected = f"(B, {size[0]}, {size[1]}, {size[2]})"
        raise ValueError(f"this graph takes images of shape {expected}, got {tuple(images.shape)}")
    return images.detach().cpu().float().contiguous().numpy()


class SessionForward:
    """The engine's :class:`~zoa_lightning.core.network.Forward` for a :class:`RuntimeNetwork`: one call per pass.

    Args:
        network: the bound network.
        layout: its layout.
        bank: the bank whose values every call reads.
        statistics: the BatchNorm settings (prior, recording) and running estimates.
        offsets: each BatchNorm's offset in ``statistics`` (graph order).
        on_detector: the engine's detector callback.
    """

    def __init__(
        self,
        network: RuntimeNetwork,
        layout: ModelLayout,
        bank: KnowledgeBank,
        statistics: BatchStatistics,
        offsets: list[int],
        on_detector: DetectorCallback,
    ) -> None:
        self.session, self.metadata, self.layout = network.session, network.metadata, layout
        self.bank, self.statistics, self.offsets, self.on_detector = bank, statistics, offsets, on_detector
        self.final_dim = self.metadata.tap_dims[-1]

    def feeds(self, images: Tensor, shift: Tensor | None) -> dict[str, np.ndarray]:
        """The session inputs of one pass: the images, the bank's values and the shift as rows, BatchNorm settings."""
        rows = images.shape[0]
        values = self.bank.fused().detach()
        if values.ndim == 2 and self.metadata.batch_norm_channels and not bool((values == values[:1]).all()):
            raise ValueError(
                f"{self.metadata.network} is a BatchNorm graph: it reads one affine per call (the first row of "
                "params), but this pass gives its images different values (the per-sample estimator); use estimator "
                "'reference' on BatchNorm networks"
            )
        params = values.expand(rows, -1) if values.ndim == 1 else values
        if shift is None:
            shifted = torch.zeros(rows, self.final_dim)
        else:
            shifted = shift.detach().float().reshape(1, -1).expand(rows, -1)
        feeds = {
            "images": _images(images, self.metadata.input_size),
            "params": params.float().contiguous().numpy(),
            "shift": shifted.contiguous().numpy(),
        }
        if self.metadata.batch_norm_channels:
            prior = self.statistics.prior
            feeds["running"] = self.statistics.running.detach().cpu().numpy()
            feeds["prior"] = np.array([0.0 if prior is None else float(prior)])
        return feeds

    def run(
        self, images: Tensor, mode: PassMode, pass_index: int = 0, shift: Tensor | None = None
    ) -> tuple[Tensor, PassRecord]:
        """One session call on ``images`` with the bank's current values; ``(logits, record)``."""
        names = ["logits", "features", "det_sum", "det_sumsq"]
        if shift is not None:
            names.append("shifted_logits")
        record_norms = bool(self.metadata.batch_norm_channels) and self.statistics.record
        if record_norms:
            names.append("bn_stats")
        arrays = self.session.run(names, self.feeds(images, shift))
        out = dict(zip(names, (torch.from_numpy(a) for a in arrays), strict=True))
        record = PassRecord(mode, pass_index)
        *taps, record.head_input = out["features"].split(list(self.metadata.tap_dims), dim=1)
        record.taps = list(taps)
        record.shifted = out.get("shifted_logits")
        rows = images.shape[0]
        if record_norms:
            stats, offset = out["bn_stats"], 0
            for where, c in zip(self.offsets, self.metadata.batch_norm_channels, strict=True):
                self.statistics.note(where, stats[offset : offset + c], stats[offset + c : offset + 2 * c], float(rows))
                offset += 2 * c
        if mode == "probe":
            record.detector_channels = self.metadata.detector_channels
        elif mode != "predict":
            count = torch.tensor([float(self.metadata.detector_values * rows), float(rows)], dtype=torch.float64)
            sums = torch.cat([out["det_sum"].sum(0), out["det_sumsq"].sum(0), count])
            self.on_detector(DetectorSums(sums), record)
        return out["logits"], record

    def first_taps(self, images: Tensor, modules: Sequence[str]) -> list[int]:
        """The first loss tap after each adapted layer, as found when the graph was exported.

        Raises:
            ValueError: for other modules than the graph's adapted layers.
        """
        if tuple(modules) != self.layout.norms:
            raise ValueError(f"the graph knows the first taps of its adapted layers {list(self.layout.norms)} only")
        return list(self.metadata.first_taps)
