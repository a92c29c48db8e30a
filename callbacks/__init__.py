"""Lightning callbacks of zoa-lightning: quantization, the domain knowledge bank, and result reports."""

from callbacks.bank import DomainBankCallback
from callbacks.quantization import QuantizationCallback
from callbacks.results import ResultsCallback

__all__ = ["DomainBankCallback", "QuantizationCallback", "ResultsCallback"]
