"""Lightning callbacks of zoa-lightning: quantization, adaptation metrics, stream checkpoints and result reports.

``DomainBankCallback`` is the earlier combination of :class:`AdaptationMonitor` and :class:`StreamCheckpoint`, kept so
that existing configs keep working.
"""

from callbacks.adaptation_monitor import AdaptationMonitor
from callbacks.bank import DomainBankCallback
from callbacks.quantization import QuantizationCallback
from callbacks.results import ResultsCallback
from callbacks.stream_checkpoint import StreamCheckpoint

__all__ = ["AdaptationMonitor", "DomainBankCallback", "QuantizationCallback", "ResultsCallback", "StreamCheckpoint"]
