"""Lightning callbacks of zoa-lightning: quantization, adaptation metrics, stream checkpoints and result reports."""

from callbacks.adaptation_monitor import AdaptationMonitor
from callbacks.onnx_runtime import OnnxRuntimeCallback
from callbacks.quantization import QuantizationCallback
from callbacks.results import ResultsCallback
from callbacks.stream_checkpoint import StreamCheckpoint

__all__ = ["AdaptationMonitor", "OnnxRuntimeCallback", "QuantizationCallback", "ResultsCallback", "StreamCheckpoint"]
