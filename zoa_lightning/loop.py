"""The test loop over a stream: where it stands and what it runs over (Lightning helpers, not the core).

Shared by the stream modules and the callbacks: :func:`is_last_batch_of_domain` (a domain ends at its loader's last
batch) and :func:`check_sharded_loaders` (under DDP every process must read its own slice of every global batch).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler
from typing_extensions import override

__all__ = ["StreamCallback", "check_sharded_loaders", "is_last_batch_of_domain"]


def is_last_batch_of_domain(trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether ``batch_idx`` is the last batch the trainer will run from test loader ``dataloader_idx``.

    ``trainer.num_test_batches`` already accounts for ``limit_test_batches``; a loader of unknown length never ends
    here (the epoch end closes it).
    """
    counts = trainer.num_test_batches
    if dataloader_idx >= len(counts) or math.isinf(counts[dataloader_idx]):
        return False
    return batch_idx + 1 >= int(counts[dataloader_idx])


class StreamCallback(Callback):
    """A callback that follows the stream batch by batch and domain by domain (Lightning's test-batch hook, once).

    Subclasses override :meth:`on_stream_batch_end` (after every batch) and :meth:`on_domain_end` (after a domain's
    last batch, :func:`is_last_batch_of_domain`), both with the batch's test loader index.
    """

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.on_stream_batch_end(trainer, pl_module, dataloader_idx)
        if is_last_batch_of_domain(trainer, batch_idx, dataloader_idx):
            self.on_domain_end(trainer, pl_module, dataloader_idx)

    def on_stream_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        """After every test batch (nothing by default)."""

    def on_domain_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        """After the last batch of a domain (nothing by default)."""


def check_sharded_loaders(loaders: Any, world_size: int) -> None:
    """Raise if a test loader would give a process other than its own slice of every global batch.

    Args:
        loaders: ``trainer.test_dataloaders`` (a loader, or a dict/list of loaders).
        world_size: number of processes.

    Raises:
        ValueError: for Lightning's injected ``DistributedSampler`` (pads the stream with repeated images and cuts it
            into other batches) and for an unsharded sequential loader (every process would read the whole stream).
    """
    if isinstance(loaders, dict):
        items = list(loaders.items())
    else:
        items = list(enumerate(loaders if isinstance(loaders, list | tuple) else [loaders]))
    for name, loader in items:
        batch_sampler = getattr(loader, "batch_sampler", None)
        samplers = (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
        if any(isinstance(sampler, DistributedSampler) for sampler in samplers):
            raise ValueError(
                f"test loader {name!r} got Lightning's DistributedSampler, which pads the stream with repeated images "
                "and changes its batches: set `trainer.use_distributed_sampler: false` and let the data module shard "
                "(datamodules._common.make_loader(..., trainer=self.trainer))"
            )
        if isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, SequentialSampler):
            raise ValueError(
                f"test loader {name!r} is not sharded: each of the {world_size} processes would read the whole stream. "
                "Build the data module's loaders with datamodules._common.make_loader(..., trainer=self.trainer), "
                "which gives every process its slice of each global batch"
            )
