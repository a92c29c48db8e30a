"""What every stream adapter with named counters shares: counting, its small checkpoint and old-key loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from zoa_lightning.core.compat import rename_state_keys
from zoa_lightning.core.counters import Counters

__all__ = ["CountingAdapter"]


class CountingAdapter(nn.Module):
    """Base of the adapters: a frozen ``model`` attribute, :class:`Counters` named by ``COUNTERS``, and state helpers.

    A subclass sets ``COUNTERS`` (the counter names; ``batches`` and ``forward_passes`` at least), calls
    :meth:`_init_counters` in ``__init__``, and may set ``RENAMED`` (old buffer name → new) so that state dicts written
    by an older version load. A ``generator`` attribute, if set, is saved in the extra state. The wrapped network
    stays in eval mode whatever :meth:`train` is asked.
    """

    COUNTERS: ClassVar[tuple[str, ...]] = ("batches", "forward_passes")
    RENAMED: ClassVar[Mapping[str, str]] = {}
    model: nn.Module
    counters: Counters
    generator: torch.Generator | None = None

    def _init_counters(self, device: torch.device | None) -> None:
        self.counters = Counters(self.COUNTERS, device)

    def counter(self, name: str) -> int:
        """Value of a run counter (one of ``COUNTERS``)."""
        return self.counters[name]

    @property
    def batches(self) -> int:
        """Batches processed."""
        return self.counters["batches"]

    @property
    def forward_passes(self) -> int:
        """Forward passes of the wrapped network so far (rolled-back batches included)."""
        return self.counters["forward_passes"]

    def adaptation_state_dict(self) -> dict[str, Any]:
        """Everything the adapter changes, without the frozen network weights (what a stream checkpoint needs)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load an :meth:`adaptation_state_dict`; the frozen network weights are left as they are."""
        network = {k: v for k, v in self.state_dict().items() if k.startswith("model.")}
        self.load_state_dict({**network, **state})

    def get_extra_state(self) -> dict[str, Any]:
        """The ``generator``'s state if the adapter has one (plain types, safe for ``weights_only`` loading)."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`get_extra_state`."""
        if self.generator is not None:
            self.generator.set_state(state["generator"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        rename_state_keys(state_dict, prefix, self.RENAMED, self.COUNTERS)  # state dicts of older versions
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> CountingAdapter:
        """Set the module mode; the wrapped network stays in eval mode (adapters do not depend on it)."""
        super().train(mode)
        self.model.eval()
        return self
