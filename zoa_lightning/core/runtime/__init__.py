"""ZOA inside ONNX Runtime: export, INT8 quantization and an engine network run by an inference session.

* :mod:`~zoa_lightning.core.runtime.export`: the network as a graph whose adapted norm layers read their values from
  inputs with one row per image, with the loss taps and the detector sums as outputs;
* :mod:`~zoa_lightning.core.runtime.quantize`: ONNX Runtime's static QDQ quantizer (per-channel int8 weights, uint8
  activations), norm layers and read-outs left float;
* :mod:`~zoa_lightning.core.runtime.network`: :class:`RuntimeNetwork`, an ``nn.Module`` around an
  ``onnxruntime.InferenceSession`` that the engine adapts exactly as a torch network
  (:class:`~zoa_lightning.core.network.EngineNetwork`).

``onnx`` and ``onnxruntime`` are optional (``pip install zoa-lightning[onnx]``): importing this package needs
neither; using it without them raises :class:`ImportError` naming the extra. See ``docs/runtime.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "require"]

INSTALL_HINT = "pip install 'zoa-lightning[onnx]'"


def require(name: str = "onnxruntime") -> ModuleType:
    """Import ``onnx`` or ``onnxruntime`` (or a submodule), or say which extra installs them.

    Raises:
        ImportError: one line naming the missing package and the extra.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        package = name.split(".")[0]
        raise ImportError(
            f"the ONNX Runtime backend needs the {package} package, which is not installed: {INSTALL_HINT}"
        ) from error
