"""Where the test loop stands: helpers shared by the stream modules and the callbacks (Lightning, not the core)."""

from __future__ import annotations

import math

import lightning.pytorch as pl

__all__ = ["is_last_batch_of_domain"]


def is_last_batch_of_domain(trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether ``batch_idx`` is the last batch the trainer will run from test loader ``dataloader_idx``.

    ``trainer.num_test_batches`` already accounts for ``limit_test_batches``; a loader of unknown length never ends
    here (the epoch end closes it).
    """
    counts = trainer.num_test_batches
    if dataloader_idx >= len(counts) or math.isinf(counts[dataloader_idx]):
        return False
    return batch_idx + 1 >= int(counts[dataloader_idx])
