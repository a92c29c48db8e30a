"""Forward hooks that let one ordinary forward of the network yield what ZOA needs (spec §2, §5.1).

:class:`NetworkTaps` hooks the modules a :class:`~zoa_lightning.core.layout.ModelLayout` names. A forward run through
:meth:`NetworkTaps.run` records the loss features (the taps and the head input) and hands the detector tensor to a
callback while the pass is still running (a knowledge store must happen before the adapted layers read the bank);
any other forward of the network passes the hooks untouched. It is the torch implementation of the engine's
:class:`~zoa_lightning.core.network.Forward`; an inference-engine network fills the same :class:`PassRecord`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoa_lightning.core.layout import ModelLayout

__all__ = ["NetworkTaps", "PassRecord", "PassResult"]

PassMode = Literal["probe", "source", "adapt", "predict"]


@dataclass
class PassRecord:
    """What one recorded forward pass saw."""

    mode: PassMode
    pass_index: int = 0
    taps: list[Tensor] = field(default_factory=list)
    head_input: Tensor | None = None
    detector_channels: int = 0
    detected: bool = False
    shifted: Tensor | None = None
    """The head's logits on the activation-shifted final features, when the pass was run with a shift."""

    def final(self) -> Tensor:
        """The head input ``(B, D)`` (the final features) of the pass."""
        if self.head_input is None:
            raise RuntimeError("the pass did not reach the classifier head")
        return self.head_input

    def features(self) -> Tensor:
        """The loss features ``F`` of the pass, ``(B, F)``: the taps in network order, then the head input."""
        return torch.cat([*self.taps, self.final()], 1)


@dataclass
class PassResult:
    """One recorded pass with its loss: logits, record, loss, unshifted final mean, reduced statistics, features.

    ``stats`` are those the loss read (pooled with earlier batches' for a small batch), ``own`` the batch's alone
    (``None``: the same), ``final_mean`` the batch's own. ``features`` (per image) are kept only for the per-sample
    estimator.
    """

    logits: Tensor
    record: PassRecord
    loss: Tensor
    final_mean: Tensor
    stats: Tensor
    features: Tensor | None = None
    own: Tensor | None = None

    @property
    def images(self) -> int:
        """The batch's image count over all processes."""
        return int((self.stats if self.own is None else self.own)[-1])


class NetworkTaps:
    """Hooks on the layout's detector, taps and head.

    Args:
        model: the network.
        layout: where to hook.
        on_detector: called with the detector tensor and the pass record during every recorded pass except probes
            and predictions.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, on_detector: Callable[[Any, PassRecord], None]) -> None:
        self.model, self.layout, self.on_detector = model, layout, on_detector
        self._record: PassRecord | None = None
        get = model.get_submodule
        self._handles = [get(layout.detector).register_forward_hook(self._detector_hook)]
        self._handles += [get(name).register_forward_hook(self._tap_hook) for name in layout.taps]
        self._handles.append(get(layout.head).register_forward_pre_hook(self._head_hook))

    def run(
        self, images: Tensor, mode: PassMode, pass_index: int = 0, shift: Tensor | None = None
    ) -> tuple[Tensor, PassRecord]:
        """One forward of the network on ``images``, recorded; returns ``(logits, record)``.

        With a ``shift`` ``(D,)`` the record also holds ``head(final + shift)`` (:attr:`PassRecord.shifted`).
        """
        record = PassRecord(mode, pass_index)
        self._record = record
        try:
            logits = self.model(images)
        finally:
            self._record = None
        if shift is not None:
            record.shifted = self.head(record.final() + shift)
        return logits, record

    def first_taps(self, images: Tensor, modules: Sequence[str]) -> list[int]:
        """For each named module, the index of the first loss tap (taps in order, then the head) computed after it.

        Found from the order in which the modules finish in one forward of ``images`` (a tap that is itself one of
        the modules counts as after it). The head, last, also stands for the logits: a module that no tap follows
        gets its index. Used by tap attribution: a tap computed before a module cannot depend on it.
        """
        finished: dict[str, int] = {}
        names = [*self.layout.taps, *modules]

        def hook(name: str) -> Callable[..., None]:
            def record(*_: Any) -> None:  # returns None: the output passes unchanged
                finished.setdefault(name, len(finished))

            return record

        get = self.model.get_submodule
        handles = [get(name).register_forward_hook(hook(name)) for name in dict.fromkeys(names)]
        handles.append(get(self.layout.head).register_forward_pre_hook(hook("<head>")))
        try:
            with torch.no_grad():
                self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        order = [finished[name] for name in (*self.layout.taps, "<head>")]
        return [next(t for t, at in enumerate(order) if at >= finished[m] or t == len(order) - 1) for m in modules]

    def head(self, features: Tensor) -> Tensor:
        """The classifier head applied to final features (e.g. activation-shifted ones)."""
        return self.model.get_submodule(self.layout.head)(features)

    @staticmethod
    def tap_feature(layout: ModelLayout, output: Tensor) -> Tensor:
        """The loss feature ``(B, d)`` of a tap module's output: a ViT's class token, a CNN's spatial mean."""
        if layout.kind == "vit":
            # A copy, not a view: a view would keep the whole (B, N, C) block output alive until the pass ends.
            return output[:, 0].clone()
        return output.mean((2, 3)) if output.ndim == 4 else output.flatten(1)

    def _tap_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self._record is not None:
            self._record.taps.append(self.tap_feature(self.layout, output))

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._record is not None:
            self._record.head_input = args[0].flatten(1).clone()  # a view would pin the input's storage

    def _detector_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        record = self._record
        if record is None:
            return
        if record.mode == "probe":
            record.detector_channels = int(output.shape[-1] if self.layout.kind == "vit" else output.shape[1])
        elif record.mode != "predict":
            self.on_detector(output, record)
