"""Loading state dicts written before the engine was split into parts: old buffer names mapped to the new ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["rename_state_keys"]


def rename_state_keys(
    state_dict: dict[str, Any], prefix: str, renamed: Mapping[str, str], counters: Sequence[str] = ()
) -> None:
    """Rewrite old keys of a module's ``state_dict`` in place, for ``_load_from_state_dict``.

    Args:
        state_dict: the state dict being loaded.
        prefix: the module's key prefix.
        renamed: old buffer name → new (dotted) name.
        counters: the names of the module's :class:`~zoa_lightning.core.counters.Counters`, in the order of the
            single ``counters`` vector older versions saved; missing trailing entries load as zero.
    """
    for old, new in renamed.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    vector = state_dict.get(prefix + "counters")
    if counters and isinstance(vector, Tensor):
        del state_dict[prefix + "counters"]
        for i, name in enumerate(counters):
            value = vector[i].clone() if i < vector.numel() else torch.zeros((), dtype=torch.long)
            state_dict[f"{prefix}counters.{name}"] = value
    if counters and any(key.startswith(prefix + "counters.") for key in state_dict):
        for name in counters:  # a counter added since the state dict was written starts at zero
            state_dict.setdefault(f"{prefix}counters.{name}", torch.zeros((), dtype=torch.long))
