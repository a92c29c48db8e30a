r"""PTQ4ViT-style quantised modules for timm vision transformers (spec §7.1): the structure, without calibration.

The fake-quantised modules, and :func:`prepare_vit_quantization`, which rewrites a timm ``VisionTransformer`` **in
place** into them (:func:`~zoa_lightning.core.quant.vit.calibration.quantize_vit` then calibrates it):

* ``patch_embed.proj`` becomes a :class:`QuantConv2d` (one weight interval per output channel, image input not
  quantised);
* every block's ``attn`` becomes a :class:`QuantAttention` that reproduces timm's ``Attention`` maths with quantised
  ``qkv`` (three weight intervals, one per q/k/v row block), ``proj``, and the two matmuls: :class:`QuantMatMul` for
  :math:`QK^\top` (per-head intervals for both operands; the attention scale is applied after it) and
  :class:`SoftmaxQuantMatMul` for :math:`\mathrm{softmax}\cdot V` (post-softmax twin-range probabilities, per-head
  intervals for :math:`V`);
* ``mlp.fc1``, ``mlp.fc2`` (post-GELU twin-uniform input) and ``head`` become :class:`QuantLinear` modules.

LayerNorms, biases, softmax, GELU, residuals, the class token and position embeddings stay in float. Every module name
of the original model still resolves with ``get_submodule`` (``blocks.3.norm1``, ``head``, ``patch_embed`` ...), the
LayerNorms are the original ``nn.LayerNorm`` objects, and ``model.head`` is still a module applied to a ``(B, D)``
feature: its input quantiser lives inside it, so ZOA's activation-shifted features pass through it (spec §4).

Every interval is a registered buffer, frozen after calibration. :func:`prepare_vit_quantization` builds the same
structure uncalibrated, so ``load_state_dict`` of a calibrated model restores it without recalibrating::

    cache = quantize_vit(model, images, 8, 8).state_dict()
    fresh = prepare_vit_quantization(build_model(), 8, 8)
    fresh.load_state_dict(cache)  # same logits as the calibrated model

The calibration search that fills the intervals is :mod:`zoa_lightning.core.quant.vit.calibration`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from zoa_lightning.core.quant._common import (
    fake_quant_post_gelu,
    fake_quant_post_softmax,
    fake_quant_uniform,
    post_gelu_negative_interval,
    validate_bits,
)

__all__ = [
    "FakeQuantModule",
    "InputQuant",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "SoftmaxQuantMatMul",
    "check_not_inference_mode",
    "prepare_vit_quantization",
    "quantization_disabled",
    "set_quantization_enabled",
    "vit_quant_modules",
]

_Weighted = TypeVar("_Weighted", "QuantLinear", "QuantConv2d")

log = logging.getLogger(__name__)

InputQuant = Literal["none", "uniform", "post_gelu"]

#: Activation classes treated as GELU for the post-GELU quantiser of ``fc2`` (all have a minimum of about -0.17).
_GELU_TYPES: tuple[type[nn.Module], ...] = (nn.GELU, TimmGELU, GELUTanh)
_INFERENCE_MODE_MESSAGE = (
    "{what} cannot run under torch.inference_mode(): tensors created or updated there cannot be updated in place "
    "later. Disable inference mode (e.g. `with torch.inference_mode(False):`, or `Trainer(inference_mode=False)` in "
    "Lightning); torch.no_grad() is fine."
)


def check_not_inference_mode(what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` and the remedy if ``torch.inference_mode()`` is on."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_MODE_MESSAGE.format(what=what))


# --------------------------------------------------------------------------------------------------------------------
# Quantised modules
# --------------------------------------------------------------------------------------------------------------------


class FakeQuantModule(nn.Module):
    """Base of the fake-quantised modules: the on/off switch and the calibration bookkeeping.

    Subclasses register their intervals as buffers. Two more buffers travel in the state dict: ``calibrated`` (a bool
    scalar) and ``bits`` (the bit widths the module was built with, checked on load so a W4A4 cache cannot be loaded
    into a W8A8 structure). While :attr:`quant_enabled` is ``False`` the module computes in float; while it is
    ``True`` an uncalibrated module refuses to run.
    """

    calibrated: Tensor
    bits: Tensor
    quant_enabled: bool = True
    _is_calibrated: bool = False

    def _register_state(self, bits: Sequence[int], device: torch.device | str | None) -> None:
        """(Re-)register the ``calibrated`` and ``bits`` buffers on ``device``."""
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("bits", torch.tensor(list(bits), dtype=torch.int64, device=device))
        self._is_calibrated = False

    def mark_calibrated(self) -> None:
        """Record that every interval of this module holds a calibrated value."""
        self.calibrated.fill_(True)
        self._is_calibrated = True

    @property
    def is_calibrated(self) -> bool:
        """Whether the intervals hold calibrated (or loaded) values."""
        return self._is_calibrated

    def _check_ready(self) -> None:
        if not self._is_calibrated:
            raise RuntimeError(
                f"{type(self).__name__} is quantised but not calibrated: run quantize_vit / "
                "calibrate_vit_quantization, load a calibrated state dict, or disable quantisation with "
                "set_quantization_enabled(model, False)."
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        loaded_bits = state_dict.get(prefix + "bits")
        if isinstance(loaded_bits, Tensor) and loaded_bits.tolist() != self.bits.tolist():
            error_msgs.append(
                f"{prefix}bits: the state dict was calibrated with bit widths {loaded_bits.tolist()}, this module was "
                f"prepared with {self.bits.tolist()}; call prepare_vit_quantization with the same w_bits/a_bits."
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._is_calibrated = bool(self.calibrated)


def _take_float_parameters(layer: _Weighted, source: nn.Linear | nn.Conv2d) -> _Weighted:
    """Give a new quantised ``layer`` the ``source`` layer's weight and bias (shared, not copied) and mode."""
    layer.weight = source.weight
    layer.bias = source.bias  # type: ignore[assignment]  # nn.Conv2d types its bias as a Tensor
    layer._reset_quant_buffers(device=source.weight.device, dtype=source.weight.dtype)
    return layer.train(source.training)


class QuantLinear(FakeQuantModule, nn.Linear):
    r"""``nn.Linear`` with fake-quantised weight and input.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias (kept in float).
        w_bits: weight bit width.
        a_bits: input (activation) bit width.
        weight_groups: number of equal row blocks with their own weight interval (1 per tensor, 3 for ``qkv``).
        input_quant: ``"uniform"`` (one symmetric per-tensor interval), ``"post_gelu"`` (twin-uniform: searched
            :math:`\Delta_+`, fixed :math:`\Delta_-`) or ``"none"``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and intervals.

    Raises:
        ValueError: if a bit width is invalid, ``weight_groups`` does not divide ``out_features`` or ``input_quant`` is
            unknown.
    """

    w_delta: Tensor
    a_delta: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 8,
        a_bits: int = 8,
        weight_groups: int = 1,
        input_quant: InputQuant = "uniform",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.w_bits = validate_bits(w_bits, "w_bits")
        self.a_bits = validate_bits(a_bits, "a_bits")
        if weight_groups < 1 or out_features % weight_groups:
            raise ValueError(f"weight_groups={weight_groups} must divide out_features={out_features}")
        if input_quant not in ("none", "uniform", "post_gelu"):
            raise ValueError(f"input_quant must be 'none', 'uniform' or 'post_gelu', got {input_quant!r}")
        self.weight_groups = weight_groups
        self.input_quant: InputQuant = input_quant
        self._reset_quant_buffers(device=device, dtype=dtype)

    def _reset_quant_buffers(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.register_buffer("w_delta", torch.ones(self.weight_groups, device=device, dtype=dtype))
        self.register_buffer("a_delta", torch.ones((), device=device, dtype=dtype))
        self._register_state((self.w_bits, self.a_bits), device)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        w_bits: int = 8,
        a_bits: int = 8,
        weight_groups: int = 1,
        input_quant: InputQuant = "uniform",
    ) -> QuantLinear:
        """Wrap ``linear``, sharing its weight and bias parameters (no copy).

        Args:
            linear: the float layer.
            w_bits: weight bit width.
            a_bits: input bit width.
            weight_groups: number of row blocks with their own weight interval.
            input_quant: input quantiser kind (see the class docstring).

        Returns:
            The uncalibrated quantised layer.
        """
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            w_bits=w_bits,
            a_bits=a_bits,
            weight_groups=weight_groups,
            input_quant=input_quant,
            device="meta",
            dtype=linear.weight.dtype,
        )
        return _take_float_parameters(layer, linear)

    @property
    def has_input_quant(self) -> bool:
        """Whether the input is quantised."""
        return self.input_quant != "none"

    def weight_matrix(self) -> Tensor:
        """The float weight as an ``(out_features, in_features)`` matrix."""
        return self.weight

    def quantized_weight(self, w_delta: Tensor | None = None) -> Tensor:
        """Fake-quantised weight matrix.

        Args:
            w_delta: intervals of shape ``(..., weight_groups)``; the leading dimensions (candidates) are kept.
                Defaults to the module's intervals.

        Returns:
            Shape ``(..., out_features, in_features)``.
        """
        delta = self.w_delta if w_delta is None else w_delta
        groups = self.weight.reshape(self.weight_groups, -1, self.in_features)
        q = fake_quant_uniform(groups, delta[..., None, None], self.w_bits)
        return q.reshape(*delta.shape[:-1], self.out_features, self.in_features)

    def quantize_input(self, x: Tensor, a_delta: Tensor | None = None) -> Tensor:
        """Fake-quantise an input tensor.

        Args:
            x: the input.
            a_delta: interval, broadcastable against ``x``; defaults to the module's.

        Returns:
            The quantised input (``x`` itself when the input is not quantised).
        """
        delta = self.a_delta if a_delta is None else a_delta
        if self.input_quant == "uniform":
            return fake_quant_uniform(x, delta, self.a_bits)
        if self.input_quant == "post_gelu":
            return fake_quant_post_gelu(x, delta, self.a_bits)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Linear map, quantised when :attr:`quant_enabled`."""
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        self._check_ready()
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        """Sizes, bit widths and quantiser kinds."""
        neg = f", a_delta_neg={post_gelu_negative_interval(self.a_bits):.3g}" if self.input_quant == "post_gelu" else ""
        return (
            f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"weight_groups={self.weight_groups}, input_quant={self.input_quant}{neg}"
        )


class QuantConv2d(FakeQuantModule, nn.Conv2d):
    """``nn.Conv2d`` with one fake-quantised weight interval per output channel; the input stays in float.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size.
        stride: stride.
        padding: zero padding.
        dilation: dilation.
        bias: whether the layer has a bias (kept in float).
        w_bits: weight bit width.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and intervals.
    """

    w_delta: Tensor
    input_quant: InputQuant = "none"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        w_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias, device=device, dtype=dtype
        )
        self.w_bits = validate_bits(w_bits, "w_bits")
        self.weight_groups = out_channels
        self._reset_quant_buffers(device=device, dtype=dtype)

    def _reset_quant_buffers(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.register_buffer("w_delta", torch.ones(self.out_channels, device=device, dtype=dtype))
        self._register_state((self.w_bits,), device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, w_bits: int = 8) -> QuantConv2d:
        """Wrap ``conv``, sharing its weight and bias parameters (no copy).

        Args:
            conv: the float convolution (``groups=1``, zero padding).
            w_bits: weight bit width.

        Returns:
            The uncalibrated quantised convolution.

        Raises:
            TypeError: for grouped convolutions or non-zero padding modes.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError("QuantConv2d supports groups=1 convolutions with numeric zero padding only")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            bias=conv.bias is not None,
            w_bits=w_bits,
            device="meta",
            dtype=conv.weight.dtype,
        )
        return _take_float_parameters(layer, conv)

    @property
    def has_input_quant(self) -> bool:
        """Always ``False``: the image input is not quantised."""
        return False

    def weight_matrix(self) -> Tensor:
        """The float weight as an ``(out_channels, in_channels * kh * kw)`` matrix (``F.unfold`` column order)."""
        return self.weight.reshape(self.out_channels, -1)

    def quantized_weight(self, w_delta: Tensor | None = None) -> Tensor:
        """Fake-quantised weight.

        Args:
            w_delta: intervals of shape ``(..., out_channels)``; defaults to the module's.

        Returns:
            Shape ``(..., out_channels, in_channels, kh, kw)``.
        """
        delta = self.w_delta if w_delta is None else w_delta
        return fake_quant_uniform(self.weight, delta[..., None, None, None], self.w_bits)

    def quantize_input(self, x: Tensor, a_delta: Tensor | None = None) -> Tensor:
        """Identity: the convolution input is not quantised."""
        return x

    def unfold_input(self, x: Tensor) -> Tensor:
        """Patches of ``x`` as rows: ``(B, L, in_channels * kh * kw)``, matching :meth:`weight_matrix`."""
        padding = self.padding
        assert not isinstance(padding, str)  # rejected in from_float
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=padding, stride=self.stride)
        return cols.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Convolution with quantised weights when :attr:`quant_enabled`."""
        if not self.quant_enabled:
            return self._conv_forward(x, self.weight, self.bias)
        self._check_ready()
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        """Sizes and weight bit width."""
        return f"{super().extra_repr()}, w_bits={self.w_bits}"


class QuantMatMul(FakeQuantModule):
    """Batched matmul ``A @ B`` of per-head operands, both fake-quantised with one interval per head.

    Operands have shape ``(batch, heads, rows, cols)``; the intervals broadcast over dimension 1.

    Args:
        num_heads: number of heads (intervals per operand).
        bits: bit width of both operands.
    """

    a_delta: Tensor
    b_delta: Tensor

    def __init__(self, num_heads: int, bits: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.a_bits = validate_bits(bits, "a_bits")
        self.register_buffer("a_delta", torch.ones(num_heads))
        self.register_buffer("b_delta", torch.ones(num_heads))
        self._register_state((self.a_bits,), None)

    def quantize_a(self, a: Tensor, a_delta: Tensor | None = None) -> Tensor:
        """Quantise operand A with per-head intervals ``(..., heads)`` (defaults to the module's)."""
        delta = self.a_delta if a_delta is None else a_delta
        return fake_quant_uniform(a, delta[..., None, None], self.a_bits)

    def quantize_b(self, b: Tensor, b_delta: Tensor | None = None) -> Tensor:
        """Quantise operand B with per-head intervals ``(..., heads)`` (defaults to the module's)."""
        delta = self.b_delta if b_delta is None else b_delta
        return fake_quant_uniform(b, delta[..., None, None], self.a_bits)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b``, with quantised operands when :attr:`quant_enabled`."""
        if not self.quant_enabled:
            return a @ b
        self._check_ready()
        return self.quantize_a(a) @ self.quantize_b(b)

    def extra_repr(self) -> str:
        """Heads and bit width."""
        return f"num_heads={self.num_heads}, bits={self.a_bits}"


class SoftmaxQuantMatMul(QuantMatMul):
    """``probs @ V`` with post-softmax twin-range probabilities (one split ``split``) and per-head intervals for V.

    Args:
        num_heads: number of heads (intervals of V).
        bits: bit width of both operands.
    """

    split: Tensor

    def __init__(self, num_heads: int, bits: int = 8) -> None:
        super().__init__(num_heads, bits)
        del self.a_delta
        self.register_buffer("split", torch.ones(()))

    def quantize_a(self, a: Tensor, a_delta: Tensor | None = None) -> Tensor:
        """Quantise the probabilities with split ``a_delta`` (broadcastable; defaults to the module's split)."""
        split = self.split if a_delta is None else a_delta
        return fake_quant_post_softmax(a, split, self.a_bits)


class QuantAttention(nn.Module):
    r"""Drop-in replacement for timm's ``Attention`` with quantised ``qkv``, ``proj`` and matmuls.

    Reproduces timm's maths: ``qkv`` → reshape → ``q, k, v`` → ``q_norm``/``k_norm`` → :math:`QK^\top` (quantised)
    → ``* scale`` → mask → softmax → dropout → ``probs @ V`` (quantised) → ``norm`` → gate → ``proj``. The attention
    scale multiplies the quantised product, as in spec §7.1 (timm scales ``q`` first; the two agree up to rounding in
    float). The optional gate projection and the q/k/scale norms are kept in float. Child names match timm's, so
    ``blocks.i.attn.qkv`` and friends still resolve.

    Args:
        attn: the timm attention module to replace (its submodules are reused, not copied).
        w_bits: weight bit width.
        a_bits: activation bit width.
    """

    def __init__(self, attn: Attention, w_bits: int = 8, a_bits: int = 8) -> None:
        super().__init__()
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.attn_dim: int = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale: float = attn.scale
        self.qkv = QuantLinear.from_float(attn.qkv, w_bits=w_bits, a_bits=a_bits, weight_groups=3)
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        device, dtype = attn.qkv.weight.device, attn.qkv.weight.dtype
        self.matmul_qk = QuantMatMul(self.num_heads, a_bits).to(device=device, dtype=dtype)
        self.attn_drop = attn.attn_drop
        self.matmul_av = SoftmaxQuantMatMul(self.num_heads, a_bits).to(device=device, dtype=dtype)
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate: nn.Module | None = getattr(attn, "gate", None)
        self.proj = QuantLinear.from_float(attn.proj, w_bits=w_bits, a_bits=a_bits)
        self.proj_drop = attn.proj_drop
        self.train(attn.training)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over tokens ``x`` of shape ``(B, N, C)``; arguments as timm's ``Attention.forward``."""
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(tokens, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = self.matmul_av(attn, v)
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


# --------------------------------------------------------------------------------------------------------------------
# Structure and switches
# --------------------------------------------------------------------------------------------------------------------


def prepare_vit_quantization(model: VisionTransformer, w_bits: int = 8, a_bits: int = 8) -> VisionTransformer:
    """Rewrite ``model`` in place into the quantised structure, without calibrating it.

    The quantised modules share the original parameters. Quantisation is enabled, so the model must be calibrated
    (:func:`calibrate_vit_quantization`) or receive a calibrated state dict (``load_state_dict``) before it runs.

    Args:
        model: a timm ``VisionTransformer`` whose blocks use timm ``Attention`` and ``Mlp``.
        w_bits: weight bit width (conv, linear layers).
        a_bits: activation bit width (linear inputs, matmul operands).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: if ``model`` is not a supported timm ``VisionTransformer``.
        ValueError: if a bit width is invalid or ``model`` is already quantised.
        RuntimeError: under ``torch.inference_mode()``.
    """
    check_not_inference_mode("prepare_vit_quantization")
    validate_bits(w_bits, "w_bits")
    validate_bits(a_bits, "a_bits")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if any(isinstance(m, FakeQuantModule) for m in model.modules()):
        raise ValueError("model is already quantised; prepare a fresh float model")
    parts: list[tuple[nn.Module, Attention, Mlp]] = []
    for i, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if type(attn) is not Attention:
            raise TypeError(f"blocks.{i}.attn is {type(attn).__name__}; only timm's Attention is supported")
        if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise TypeError(f"blocks.{i}.mlp must be a timm Mlp with nn.Linear fc1/fc2, got {type(mlp).__name__}")
        parts.append((block, attn, mlp))

    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        model.patch_embed.proj = QuantConv2d.from_float(proj, w_bits=w_bits)
    else:
        log.warning("patch_embed.proj is %s, not a Conv2d: the patch embedding stays in float", type(proj).__name__)
    for block, attn, mlp in parts:
        block.attn = QuantAttention(attn, w_bits, a_bits)
        post_gelu = isinstance(mlp.act, _GELU_TYPES) and isinstance(mlp.norm, nn.Identity)
        fc1, fc2 = mlp.fc1, mlp.fc2
        assert isinstance(fc1, nn.Linear)
        assert isinstance(fc2, nn.Linear)
        mlp.fc1 = QuantLinear.from_float(fc1, w_bits=w_bits, a_bits=a_bits)
        mlp.fc2 = QuantLinear.from_float(
            fc2, w_bits=w_bits, a_bits=a_bits, input_quant="post_gelu" if post_gelu else "uniform"
        )
    for name in ("head", "head_dist"):  # head_dist: the distillation head of DeiT-style subclasses
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, QuantLinear.from_float(head, w_bits=w_bits, a_bits=a_bits))
    return model


def vit_quant_modules(model: nn.Module) -> list[tuple[str, FakeQuantModule]]:
    """All fake-quantised modules of ``model`` with their qualified names, in network order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantModule)]


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fake-quantised module of ``model`` between quantised and float computation.

    Args:
        model: a (partly) quantised model.
        enabled: ``True`` to quantise, ``False`` to compute in float with the same parameters.
    """
    for _, module in vit_quant_modules(model):
        module.quant_enabled = enabled


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager running ``model`` in float, restoring each module's previous switch on exit.

    Args:
        model: a (partly) quantised model.

    Yields:
        ``model``.
    """
    modules = vit_quant_modules(model)
    previous = [m.quant_enabled for _, m in modules]
    try:
        for _, m in modules:
            m.quant_enabled = False
        yield model
    finally:
        for (_, m), flag in zip(modules, previous, strict=True):
            m.quant_enabled = flag
