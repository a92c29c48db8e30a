"""Named run counters that live in the ``state_dict`` (so a resumed run continues its counts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Counters"]


class Counters(nn.Module):
    """One ``int64`` buffer per name: ``counters.add("stores")``, ``counters["stores"]``.

    Args:
        names: the counter names (each becomes a buffer, e.g. ``counters.stores`` in the state dict).
        device: where the buffers live.

    Example:
        >>> c = Counters(["batches", "stores"])
        >>> c.add("batches", 3)
        >>> c["batches"], sorted(c.state_dict())
        (3, ['batches', 'stores'])
    """

    def __init__(self, names: Sequence[str], device: torch.device | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        for name in self.names:
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=device))

    def __getitem__(self, name: str) -> int:
        return int(self._buffer(name))

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self._buffer(name).add_(n)

    def set(self, name: str, value: int) -> None:
        """Set counter ``name`` to ``value``."""
        self._buffer(name).fill_(value)

    def as_dict(self) -> dict[str, int]:
        """Every counter's value."""
        return {name: self[name] for name in self.names}

    def _buffer(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"unknown counter {name!r}; counters are {list(self.names)}")
        buffer = self._buffers[name]
        assert buffer is not None
        return buffer
