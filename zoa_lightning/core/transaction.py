"""All-or-nothing batches: snapshot every adaptation buffer, restore them all if the batch must be rolled back.

The rule is structural, not a hand-kept list: every buffer of the adapter outside the wrapped network (``model.``) is
adaptation state (the bank, the detector, the activation shift, optimiser buffers, counters), so a new buffer added to
any part is covered without further ado. A part may name buffers that no batch changes in a ``constant_buffers``
attribute (source statistics, the pretrained parameters) to save copying them; forgetting to costs only memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.counters import Counters

__all__ = ["AdaptationDiverged", "BatchGuard", "Rollback", "Transaction"]


class Transaction:
    """A snapshot of a module's adaptation buffers and its generator, restorable once.

    Args:
        module: the adapter.
        generator: the adapter's random generator (its state is part of the snapshot).
        exclude: prefixes of buffer names that are not adaptation state (the wrapped network's own buffers).
            Buffers a submodule lists in its ``constant_buffers`` attribute are not copied either.

    Example:
        >>> m = nn.Module()
        >>> m.register_buffer("x", torch.zeros(2))
        >>> t = Transaction(m, torch.Generator())
        >>> m.x += 1
        >>> t.restore()
        >>> m.x.tolist()
        [0.0, 0.0]
    """

    def __init__(self, module: nn.Module, generator: torch.Generator, exclude: Sequence[str] = ("model.",)) -> None:
        self._saved: list[tuple[Tensor, Tensor]] = []
        for path, part in module.named_modules():
            constant = getattr(part, "constant_buffers", ())
            for name, buffer in part.named_buffers(recurse=False):
                full = f"{path}.{name}" if path else name
                if name not in constant and not any(full.startswith(prefix) for prefix in exclude):
                    self._saved.append((buffer, buffer.clone()))
        self._generator = generator
        self._generator_state = generator.get_state()

    def restore(self) -> None:
        """Copy every saved buffer and the generator state back, in place."""
        for target, saved in self._saved:
            target.copy_(saved)
        self._generator.set_state(self._generator_state)


class AdaptationDiverged(RuntimeError):
    """An adapter rolled back its ``max_consecutive_skips`` limit of batches in a row: the run can no longer adapt."""


class Rollback(Exception):
    """Raised inside a batch to roll it back; ``what`` says why, ``prediction`` is the batch's logits if computed."""

    def __init__(self, what: str, prediction: Tensor | None) -> None:
        super().__init__(what)
        self.what, self.prediction = what, prediction


class BatchGuard:
    """One batch's adaptation, all or nothing, with the skip accounting around it.

    Opened before a batch, it snapshots the adapter (:class:`Transaction`); :meth:`rollback` restores it, keeps the
    forward passes that ran counted, counts the skip and warns; :meth:`commit` resets the run of consecutive skips.

    Args:
        module: the adapter (its buffers outside ``model.`` are the snapshot).
        generator: the adapter's random generator.
        events: the adapter's event list (events of a rolled-back batch are dropped).
        counters: the adapter's counters with ``forward_passes``, ``skipped_batches``, ``consecutive_skips``,
            ``batches``.
    """

    def __init__(self, module: nn.Module, generator: torch.Generator, events: list[Any], counters: Counters) -> None:
        self._transaction = Transaction(module, generator)
        self._events, self._length, self._counters = events, len(events), counters
        self.reason = ""

    def commit(self) -> None:
        """The batch succeeded."""
        self._counters.set("consecutive_skips", 0)

    def rollback(self, reason: str | None = None) -> None:
        """Undo the batch; with a ``reason`` (not an exception passing through) count and report the skip."""
        passes = self._counters["forward_passes"]
        self._transaction.restore()
        del self._events[self._length :]
        if reason is None:
            return
        self.reason = reason
        self._counters.set("forward_passes", passes)  # the passes ran: count them though nothing is kept
        self._counters.add("skipped_batches")
        self._counters.add("consecutive_skips")
        warnings.warn(
            f"ZOA skipped batch {self._counters['batches']}: the {reason}; all adaptation state was rolled back "
            f"({self._counters['skipped_batches']} skipped so far, {self._counters['consecutive_skips']} in a row)",
            RuntimeWarning,
            stacklevel=3,
        )

    def check_limit(self, limit: int | None, advice: str) -> None:
        """Raise :class:`AdaptationDiverged` once ``limit`` batches in a row were rolled back.

        Args:
            limit: the most consecutive rollbacks tolerated (``None``: no limit).
            advice: what the user should change, appended to the message.
        """
        if limit is not None and self._counters["consecutive_skips"] >= limit:
            raise AdaptationDiverged(
                f"ZOA rolled back {self._counters['consecutive_skips']} batches in a row (the last one because the "
                f"{self.reason}): adaptation has diverged and every further batch would be rolled back too. {advice}; "
                f"max_consecutive_skips={limit} sets this limit (None turns it off)"
            )
