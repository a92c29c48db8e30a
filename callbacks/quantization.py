"""Quantize and calibrate the module's network before testing, with an on-disk calibration cache.

The callback runs in ``setup("test")``: before the LightningModule's own ``setup`` (callbacks run first), outside
Lightning's inference mode (calibration creates tensors that must stay ordinary), and on the run's device. It takes
``calib_images`` clean images from the data module (``calibration_images(n)``), quantizes the network with
``zoa_lightning.core.quant`` (PTQ4ViT-style for vision transformers, MQBench for ResNet-family CNNs) and hands it back
through the module's ``set_network``. All quantization is simulated ("fake"): values are rounded to the integer grid
and computed in float.

Calibration cache: a calibrated model is saved as ``<cache_dir>/<method>-w<b>a<b>-<key>.pt`` (default cache dir
``~/.cache/zoa_lightning/quant``, or ``$ZOA_CACHE_DIR/quant``) with a checksum file beside it, keyed by a hash of the
network's float weights, the quantizer settings and the calibration images; a later run with the same key loads it
instead of recalibrating. The full key is kept inside the file and checked with the checksum on load, so a damaged
file, one of another format, one calibrated from other weights or one holding uncalibrated quantizers is reported
(naming the file) and replaced by a fresh calibration.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.protocols import QuantizableModule, StreamDataModule, missing_members
from zoa_lightning.core.quant import MQBENCH_BITS, PTQ4VIT_BITS
from zoa_lightning.files import read_verified, write_verified

__all__ = ["SUPPORTED_BITS", "QuantizationCallback", "default_quant_cache_dir"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # a dict with the cache key, the state dict and a checksum file beside it

#: Bit widths (inclusive range) each quantizer supports, for weights and activations alike.
SUPPORTED_BITS: dict[str, tuple[int, int]] = {"ptq4vit": PTQ4VIT_BITS, "mqbench": MQBENCH_BITS}


def default_quant_cache_dir() -> Path:
    """``$ZOA_CACHE_DIR/quant`` if the variable is set, else ``~/.cache/zoa_lightning/quant``."""
    root = os.environ.get("ZOA_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "zoa_lightning") / "quant"


class QuantizationCallback(Callback):
    """Post-training quantization of the module's network before ``trainer.test``.

    Args:
        bits: weight bit width (8 for W8A8, 6 for W6A6, 4 for W4A4, ...): 2 to 16 for ``ptq4vit``, 2 to 8 for
            ``mqbench`` (:data:`SUPPORTED_BITS`). With ``method="auto"`` a width only one quantizer supports (9 to 16)
            is checked again once the network's kind is known, before calibration.
        act_bits: activation bit width, same ranges; ``None`` means ``bits`` (for MQBench, W2 pairs with A4 as in the
            paper).
        calib_images: number of clean calibration images taken from the data module.
        method: ``"auto"`` (PTQ4ViT for vision transformers, MQBench for CNNs), ``"ptq4vit"`` or ``"mqbench"``.
        criterion: PTQ4ViT interval-search criterion, ``"mse"`` or ``"hessian"`` (spec §7.1).
        search_rounds: PTQ4ViT alternating search rounds.
        num_candidates: PTQ4ViT interval candidates per search.
        observer: MQBench observers, ``"mse"`` (the paper's) or ``"minmax"`` (about 100× faster on CPU).
        adaround_iters: MQBench AdaRound iterations per layer (used at 4 bits or fewer).
        cache: reuse and store calibrated models.
        cache_dir: where calibrated models are cached (default: see module docstring).

    Raises:
        ValueError: for an unknown ``method``/``criterion``/``observer``, a bit width outside what the quantizer
            supports (the message lists the ranges), or a non-positive count.
    """

    def __init__(
        self,
        bits: int = 8,
        act_bits: int | None = None,
        calib_images: int = 32,
        method: Literal["auto", "ptq4vit", "mqbench"] = "auto",
        criterion: Literal["mse", "hessian"] = "mse",
        search_rounds: int = 3,
        num_candidates: int = 100,
        observer: Literal["mse", "minmax"] = "mse",
        adaround_iters: int = 20000,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        if method not in ("auto", "ptq4vit", "mqbench"):
            raise ValueError(f"method must be 'auto', 'ptq4vit' or 'mqbench', got {method!r}")
        if criterion not in ("mse", "hessian"):
            raise ValueError(f"criterion must be 'mse' or 'hessian', got {criterion!r}")
        if observer not in ("mse", "minmax"):
            raise ValueError(f"observer must be 'mse' or 'minmax', got {observer!r}")
        _check_bit_width("bits", bits, method)
        if act_bits is not None:
            _check_bit_width("act_bits", act_bits, method)
        for name, value in (
            ("calib_images", calib_images),
            ("search_rounds", search_rounds),
            ("num_candidates", num_candidates),
            ("adaround_iters", adaround_iters),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.bits = bits
        self.act_bits = act_bits
        self.calib_images = calib_images
        self.method = method
        self.criterion = criterion
        self.search_rounds = search_rounds
        self.num_candidates = num_candidates
        self.observer = observer
        self.adaround_iters = adaround_iters
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_quant_cache_dir()
        self.last_calibration_seconds: float | None = None
        self.last_cache_hit: bool | None = None

    @property
    def state_key(self) -> str:
        """Unique per setting, so several instances could coexist."""
        return f"QuantizationCallback[bits={self.bits},act_bits={self.act_bits},method={self.method}]"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        from callbacks.onnx_runtime import OnnxRuntimeCallback  # (a local import: that module imports this one)

        if any(isinstance(c, OnnxRuntimeCallback) for c in trainer.callbacks):  # type: ignore[attr-defined]
            rank_zero_info("QuantizationCallback: ONNX Runtime quantizes the network (OnnxRuntimeCallback); skipped")
            return
        if not isinstance(pl_module, QuantizableModule):
            raise TypeError(
                f"QuantizationCallback needs get_network()/set_network(); {type(pl_module).__name__} lacks "
                f"{missing_members(pl_module, QuantizableModule)}"
            )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at run time
        if not isinstance(datamodule, StreamDataModule):
            raise TypeError(
                f"QuantizationCallback needs a stream data module for its calibration images; "
                f"{type(datamodule).__name__} lacks {missing_members(datamodule, StreamDataModule)}"
            )
        device = trainer.strategy.root_device
        network = pl_module.get_network().to(device).eval()
        images = datamodule.calibration_images(self.calib_images).to(device)
        start = time.perf_counter()
        quantized, hit = self.quantize(network, images)
        self.last_calibration_seconds = time.perf_counter() - start
        self.last_cache_hit = hit
        pl_module.set_network(quantized.to(device), self.precision)
        rank_zero_info(
            f"quantized {type(network).__name__} to {self.precision} with {self._method(network)} "
            f"({'loaded from cache' if hit else 'calibrated'} in {self.last_calibration_seconds:.1f} s)"
        )

    @property
    def precision(self) -> str:
        """The precision tag, e.g. ``"W8A8"``."""
        return f"W{self.bits}A{self.act_bits if self.act_bits is not None else self._default_act_bits()}"

    def _default_act_bits(self) -> int:
        return 4 if self.bits == 2 and self.method != "ptq4vit" else self.bits

    def _method(self, network: nn.Module) -> str:
        if self.method != "auto":
            return self.method
        return "ptq4vit" if resolve_layout(network).kind == "vit" else "mqbench"

    def quantize(self, network: nn.Module, images: Tensor) -> tuple[nn.Module, bool]:
        """Quantize ``network`` with ``images``, through the cache. Returns ``(quantized, loaded_from_cache)``.

        A cache file that cannot be read or does not fit the network is reported in a warning naming it, then the
        network is calibrated afresh and the file overwritten.

        Raises:
            ValueError: if the bit widths are outside the range of the quantizer chosen for ``network``.
        """
        method = self._method(network)
        act_bits = self.act_bits if self.act_bits is not None else self._default_act_bits()
        _check_bit_width("bits", self.bits, method, network)
        _check_bit_width("act_bits", act_bits, method, network)
        key = self._cache_key(network, images, method, act_bits)
        path = self.cache_path(network, images)
        if self.cache and path.is_file():
            try:
                return self._load(network, path, key, method, act_bits), True
            except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
                reason = str(error) if len(str(error)) <= 300 else f"{str(error)[:300]} ..."
                log.warning(
                    "calibration cache file %s does not fit (%s); recalibrating and overwriting it", path, reason
                )
        quantized = self._calibrate(network, images, method, act_bits)
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            state = {k: v.detach().cpu() for k, v in quantized.state_dict().items()}
            torch.save({"format": _CACHE_FORMAT, "key": key, "state_dict": state}, buffer)
            write_verified(path, buffer.getvalue())  # several processes may calibrate at once: the last rename wins
            log.info("saved calibrated model to %s", path)
        return quantized, False

    def cache_path(self, network: nn.Module, images: Tensor) -> Path:
        """The cache file of ``network`` calibrated on ``images`` with this callback's settings (it may not exist)."""
        method = self._method(network)
        act_bits = self.act_bits if self.act_bits is not None else self._default_act_bits()
        key = self._cache_key(network, images, method, act_bits)
        return self.cache_dir / f"{method}-w{self.bits}a{act_bits}-{key[:20]}.pt"

    def _calibrate(self, network: nn.Module, images: Tensor, method: str, act_bits: int) -> nn.Module:
        from zoa_lightning.core.quant import quantize_cnn, quantize_vit

        with torch.inference_mode(False):
            if method == "ptq4vit":
                return quantize_vit(
                    network,  # type: ignore[arg-type]  # quantize_vit refuses anything but a timm ViT itself
                    images,
                    self.bits,
                    act_bits,
                    search_rounds=self.search_rounds,
                    num_candidates=self.num_candidates,
                    criterion=self.criterion,
                )
            return quantize_cnn(
                network, images, self.bits, act_bits, observer=self.observer, adaround_iters=self.adaround_iters
            )

    def _load(self, network: nn.Module, path: Path, key: str, method: str, act_bits: int) -> nn.Module:
        """The calibrated model of ``path``, checked: its checksum, its format, and that it was built for this key.

        The key (the hash of the float network's weights, the quantizer settings and the calibration images) is kept
        inside the file, so a file put at this name but calibrated from other weights or images is not taken.
        """
        from zoa_lightning.core.quant import prepare_cnn_quantization, prepare_vit_quantization, vit_quant_modules

        stored = torch.load(io.BytesIO(read_verified(path)), map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or stored.get("format") != _CACHE_FORMAT or "state_dict" not in stored:
            raise ValueError("it is not a calibration cache file of this version")
        if stored.get("key") != key:
            raise ValueError("it was calibrated from another network, quantizer setting or calibration images")
        state = stored["state_dict"]
        model: nn.Module
        if method == "ptq4vit":
            # prepare_vit_quantization rewrites its argument in place: prepare a copy, so that the float network is
            # still there to calibrate if the file does not fit (prepare_cnn_quantization copies by itself)
            model = prepare_vit_quantization(copy.deepcopy(network), self.bits, act_bits)  # type: ignore[arg-type]
        else:
            model = prepare_cnn_quantization(network, self.bits, act_bits, observer=self.observer)
        model.load_state_dict(state)
        uncalibrated = [name for name, module in vit_quant_modules(model) if not module.is_calibrated]
        if uncalibrated:
            raise ValueError(f"it holds uncalibrated quantizers ({', '.join(uncalibrated[:3])}, ...)")
        return model.eval()

    def _cache_key(self, network: nn.Module, images: Tensor, method: str, act_bits: int) -> str:
        """The SHA-256 (hex) of the quantizer settings, the float network's weights and the calibration images."""
        digest = hashlib.sha256()
        settings: dict[str, Any] = {
            "version": 1,
            "arch": type(network).__name__,
            "method": method,
            "bits": self.bits,
            "act_bits": act_bits,
        }
        if method == "ptq4vit":
            settings.update(criterion=self.criterion, rounds=self.search_rounds, candidates=self.num_candidates)
        else:
            settings.update(observer=self.observer, adaround_iters=self.adaround_iters)
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for key, value in network.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digest.update(images.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def _check_bit_width(name: str, value: int, method: str, network: nn.Module | None = None) -> None:
    """Raise if ``value`` is not a bit width the quantizer(s) of ``method`` support (``"auto"``: either).

    Args:
        name: the argument checked, ``"bits"`` or ``"act_bits"``.
        value: its value.
        method: ``"ptq4vit"``, ``"mqbench"`` or ``"auto"``.
        network: the network ``method`` was resolved for, named in the message.

    Raises:
        ValueError: listing the supported ranges.
    """
    ranges = {m: r for m, r in SUPPORTED_BITS.items() if method in ("auto", m)}
    if (
        not isinstance(value, bool)
        and isinstance(value, int)
        and any(low <= value <= high for low, high in ranges.values())
    ):
        return
    supported = ", ".join(f"{low} to {high} for {m}" for m, (low, high) in ranges.items())
    target = "" if network is None else f" (method {method} for {type(network).__name__})"
    raise ValueError(
        f"QuantizationCallback {name}={value!r} is not a supported bit width{target}: the quantizers support "
        f"{supported}; set `{name}` in the callback's init_args within that range"
    )
