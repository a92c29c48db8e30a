"""The template of every method's LightningModule: run a (quantized) classifier over a stream of domains.

:class:`StreamModule` holds what the methods share: the network (built by one factory or injected) and its device,
the method's pure-torch adapter (:class:`~zoa_lightning.core.methods.base.Adapter`), source statistics for adapters
that need them, one top-1 and one top-5 ``MulticlassAccuracy`` per domain, the per-domain rows
(:class:`~zoa_lightning.reporting.DomainRow`), run info, the stream position that a checkpoint resumes from
(:mod:`zoa_lightning.resume`) and the protocol the callbacks use
(:class:`~zoa_lightning.core.protocols.AdaptationModule`).
A method subclass declares its hyperparameters and implements one hook, :meth:`StreamModule.build_adapter`
(``CONTRIBUTING.md``); each method's module is one file of :mod:`zoa_lightning.methods`.

Testing needs no optimizer (Lightning never calls ``configure_optimizers`` in ``test``). Shipped configs set
``trainer.inference_mode: false``; the forward-only methods also work under the default ``inference_mode=True``
because every tensor they mutate is allocated in ``setup`` and updated in place.

Several processes (``strategy: ddp``, ``devices: N``, ``use_distributed_sampler: false``): the data module gives every
process its slice of each global batch; an adapter that sums its statistics over processes (ZOA, FOA) takes the same
step as one process on the global batch; the per-domain accuracies sync themselves (torchmetrics) and the domain rows
count the samples of all processes. See ``docs/distributed.md``.
"""

from __future__ import annotations

import time
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from zoa_lightning.core.layout import check_image_dtype
from zoa_lightning.core.methods.base import Adapter, device_of
from zoa_lightning.core.protocols import (
    BankAdapter,
    ResumableDataModule,
    SourceDataModule,
    SourceStatisticsAdapter,
    StreamDataModule,
    missing_members,
)
from zoa_lightning.loop import check_sharded_loaders, is_last_batch_of_domain
from zoa_lightning.networks import build_network
from zoa_lightning.reporting import DomainRow, mean_of
from zoa_lightning.resume import STREAM_KEY, check_same_stream, stream_fingerprint, verify_stream_checkpoint

__all__ = ["StreamModule"]


class StreamModule(pl.LightningModule):
    """The template of every method: run a network over a domain stream through the method's adapter.

    A method subclass sets :attr:`method_name`, declares its hyperparameters as typed, defaulted ``__init__``
    arguments documented in its class docstring's ``Args:`` (they become ``zoa test --help`` and config keys) and
    implements :meth:`build_adapter`, which wraps the (quantized) network in the method's pure-torch adapter. This class
    does the rest once for every method: the network's device, the adapter's source statistics (a method whose adapter
    collects them declares ``source_batches: int | None = None``), pass and rollback counting through the adapter,
    per-domain rows, :meth:`run_info` (plus the hyperparameters named in :attr:`reported_hparams` and the adapter's own
    ``run_info()``), bank events, the stream checkpoint and its resume fingerprint.

    Args:
        network: a name for :func:`zoa_lightning.networks.build_network` (``demo_vit``, ``demo_cnn``, a timm name,
            ``torchvision:<name>``) or, from Python, an ``nn.Module``.
        weights: local weights file for ``network`` (``None``: the shipped demo weights, else random init).
        num_classes: classifier size; the CLI links it to the data module's ``num_classes``.
        name: the run's method label in tables, result folders and files (``None``: the method's own name, e.g.
            ``zoa``); the ablation configs set theirs (``zoa_shift_only``, ...).
    """

    method_name = "stream"
    """The method's label in tables and result folders (a run's ``name`` overrides it)."""
    reported_hparams: tuple[str, ...] = ()
    """Hyperparameters that :meth:`run_info` reports, in this order (e.g. ``("filter_k",)``)."""

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if name is not None and (not name or any(c in name for c in "/\\") or name.strip() != name):
            raise ValueError(f"name must be a non-empty label without path separators or outer spaces, got {name!r}")
        self.run_name: str = name or self.method_name
        self.save_hyperparameters(ignore=["network"] if isinstance(network, nn.Module) else None)
        # Declared only by the methods whose adapter collects source statistics; validated here, used in setup_method.
        self.source_batches = _check_source_batches(self.hparams.get("source_batches"))
        self.adapter: Adapter | None = None
        self.network_name = network if isinstance(network, str) else type(network).__name__
        self.net: nn.Module | None = (
            network if isinstance(network, nn.Module) else build_network(network, weights, num_classes)
        )
        self.num_classes = num_classes
        self.precision_tag = "float"
        self.domains: tuple[str, ...] = ()
        self.start_domain = 0
        self.acc1 = nn.ModuleList()
        self.acc5 = nn.ModuleList()
        self._results: list[DomainRow] = []
        self._current: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what the callbacks read (AdaptationModule)
    def get_network(self) -> nn.Module:
        """The network (quantized once a quantization callback has run; the adapter's ``model`` once built)."""
        if self.adapter is not None:
            return self.adapter.model
        assert self.net is not None
        return self.net

    def set_network(self, network: nn.Module, precision: str) -> None:
        """Install a (quantized) network before :meth:`setup_method` runs; ``precision`` e.g. ``"W8A8"``."""
        if self.adapter is not None:
            raise RuntimeError("set_network must run before the method's setup (use a callback's setup hook)")
        self.net = network
        self.precision_tag = precision

    def stream_results(self) -> list[dict[str, Any]]:
        """One dict per finished domain, in stream order (acc1/acc5 in %, samples, batches, passes, seconds).

        Under DDP the accuracies and ``n`` cover all processes, ``batches`` counts global batches and
        ``forward_passes`` the passes of one process (every process runs each pass on its slice).
        """
        return [row.as_dict() for row in self._results]

    def run_info(self) -> dict[str, Any]:
        """Method, model and precision of this run, then :attr:`reported_hparams` and the adapter's ``run_info()``."""
        info = {"method": self.run_name, "model": self.network_name, "bits": self.precision_tag}
        info.update((key, self.hparams[key]) for key in self.reported_hparams)
        if self.adapter is not None:
            info.update(self.adapter.run_info())
        return info

    def pop_adaptation_events(self) -> list[dict[str, Any]]:
        """Adaptation events since the last call (knowledge stores, evictions, detections; none without a bank)."""
        if not isinstance(self.adapter, BankAdapter):
            return []
        events = list(self.adapter.events)
        self.adapter.events.clear()
        return events

    def mixing_weights(self) -> Tensor | None:
        """Current softmax mixing weights over the stored knowledge entries (``None`` without a knowledge bank)."""
        if not isinstance(self.adapter, BankAdapter):
            return None
        return self.adapter.bank.mixing_weights().detach().clone()

    def forward_passes(self) -> int:
        """Network forward passes spent so far (the adapter's count; for cost reports)."""
        return self.adapter.forward_passes if self.adapter is not None else 0

    def skipped_batches(self) -> int:
        """Batches whose adaptation was rolled back so far (0 for a method that never rolls back)."""
        return self.adapter.skipped_batches if self.adapter is not None else 0

    def last_losses(self) -> tuple[float, ...]:
        """The last batch's loss values (ZOA's ``(L0, L+)``; empty for a method without a loss)."""
        return tuple(self.adapter.last_losses) if self.adapter is not None else ()

    # ------------------------------------------------------------------ the method's hook
    def build_adapter(self, network: nn.Module) -> Adapter:
        """Wrap the (quantized) ``network`` in this method's pure-torch adapter: the one hook a method implements.

        Called once by :meth:`setup_method`, outside inference mode and under ``torch.no_grad``, with the network on
        the run's device. Read the hyperparameters from ``self.hparams`` (or attributes set in ``__init__``); pass
        :meth:`reduce_sum` as the adapter's ``reduce_fn`` if it sums statistics over processes.

        Args:
            network: the network to adapt (modify it in place as the method needs).

        Returns:
            The method's :class:`~zoa_lightning.core.methods.base.Adapter`, its ``model`` being ``network``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement build_adapter(network) and return the method's adapter "
            "(a zoa_lightning.core.methods.base.Adapter; see CONTRIBUTING.md)"
        )

    # ------------------------------------------------------------------ template
    def setup_method(self, datamodule: SourceDataModule) -> None:
        """Build the adapter (:meth:`build_adapter`) and, if it needs them, collect its source statistics.

        ``trainer.test`` calls this in ``setup("test")``, after quantization callbacks, with the network on the run's
        device; from Python, call it before :meth:`adapt_step`. The adapter takes over the network: it becomes the
        child ``adapter`` (checkpoint keys ``adapter.*``). Source statistics use the first ``source_batches`` batches
        of ``datamodule.source_dataloader()`` (all if ``None``).

        Args:
            datamodule: any object with ``source_dataloader()`` (only read if the adapter collects statistics).

        Raises:
            TypeError: if :meth:`build_adapter` returns no ``Adapter``.
        """
        network = self.get_network()
        adapter = self.build_adapter(network)
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"{type(self).__name__}.build_adapter returned a {type(adapter).__name__}: return a subclass of "
                "zoa_lightning.core.methods.base.Adapter (see CONTRIBUTING.md)"
            )
        self.net = None  # from now on the network lives once, inside the adapter
        self.adapter = adapter
        if isinstance(adapter, SourceStatisticsAdapter):
            images = _ImagesOnDevice(datamodule.source_dataloader(), device_of(adapter.model))
            adapter.collect_source_statistics(images, max_batches=self.source_batches)

    def adapt_step(self, images: Tensor) -> Tensor:
        """Return the logits the method predicts for ``images`` (adapting on them if it adapts): calls the adapter.

        Raises:
            ValueError: for a batch that is not a 4-d tensor of the network's floating dtype.
        """
        if self.adapter is None:
            raise RuntimeError(
                f"{type(self).__name__} has no adapter yet: trainer.test builds it in setup; from Python call "
                "setup_method(datamodule) first"
            )
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__} expects an image batch of shape (B, C, H, W), got {shape}")
        check_image_dtype(images, self.adapter.model)
        return self.adapter(images)

    def reduce_sum(self, stats: Tensor) -> Tensor:
        """Sum a statistics tensor over processes (identity on one process): the ``reduce_fn`` to give an adapter."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return stats
        return trainer.strategy.reduce(stats.clone(), reduce_op="sum")

    def _datamodule(self) -> Any:
        """The trainer's data module (``None`` without a trainer or data module)."""
        return None if self._trainer is None else self._trainer.datamodule  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        if stage != "test":
            return
        datamodule = self._datamodule()
        if not isinstance(datamodule, StreamDataModule):
            raise TypeError(
                f"{type(self).__name__} needs a stream data module (e.g. datamodules.CorruptionStreamDataModule); "
                f"{type(datamodule).__name__} lacks {missing_members(datamodule, StreamDataModule)}"
            )
        if datamodule.num_classes != self.num_classes:
            raise ValueError(
                f"the data has {datamodule.num_classes} classes but model.num_classes is {self.num_classes}"
            )
        self.domains = tuple(datamodule.domains)
        self.start_domain = datamodule.start_domain if isinstance(datamodule, ResumableDataModule) else 0
        metrics: dict[str, Any] = {"top_k": 1, "average": "micro", "sync_on_compute": True}
        self.acc1 = nn.ModuleList(MulticlassAccuracy(self.num_classes, **metrics) for _ in self.domains)
        self.acc5 = nn.ModuleList(
            MulticlassAccuracy(self.num_classes, **{**metrics, "top_k": min(5, self.num_classes)}) for _ in self.domains
        )
        self.get_network().to(self.trainer.strategy.root_device)
        with torch.inference_mode(False), torch.no_grad():
            self.setup_method(datamodule)

    @override
    def on_test_start(self) -> None:
        """Refuse inference mode for an adapter that back-propagates; under DDP, check the loaders' sharding."""
        if self.adapter is not None and self.adapter.requires_autograd and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} back-propagates, which inference mode forbids: set `trainer.inference_mode: "
                "false` in the config (or pass Trainer(inference_mode=False))"
            )
        if self.trainer.world_size > 1:
            check_sharded_loaders(self.trainer.test_dataloaders, self.trainer.world_size)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        images, labels = batch[0], batch[1]
        index = self.start_domain + dataloader_idx
        if self._current is None or self._current["index"] != index:  # also closes a domain cut short
            self._finish_domain()
            self._start_domain(index)
        current = self._current
        assert current is not None
        passes = self.forward_passes()
        with torch.no_grad():
            logits = self.adapt_step(images)
        current["forward_passes"] += self.forward_passes() - passes
        current["batches"] += 1
        current["n"] += int(labels.shape[0])
        acc1, acc5 = cast(MulticlassAccuracy, self.acc1[index]), cast(MulticlassAccuracy, self.acc5[index])
        acc1.update(logits, labels)
        acc5.update(logits, labels)
        domain = self.domains[index]
        self.log(f"test/{domain}/acc1", acc1, add_dataloader_idx=False, on_epoch=True)
        self.log(f"test/{domain}/acc5", acc5, add_dataloader_idx=False, on_epoch=True)
        if is_last_batch_of_domain(self.trainer, batch_idx, dataloader_idx):
            self._finish_domain()
        return logits

    @override
    def on_test_epoch_end(self) -> None:
        self._finish_domain()
        if self._results:
            # Equal on every process (built from the synced per-domain metrics): sync_dist is an exact no-op mean.
            self.log("test/mean/acc1", mean_of(self._results, "acc1"), sync_dist=True)
            self.log("test/mean/acc5", mean_of(self._results, "acc5"), sync_dist=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stream position, the finished domains' results and the run's fingerprint under ``zoa_stream``."""
        finished = self._results[-1].index + 1 if self._results else self.start_domain
        checkpoint[STREAM_KEY] = {
            "next_domain": finished,
            "results": self.stream_results(),
            "precision": self.precision_tag,
            "fingerprint": self.stream_fingerprint(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume the stream after the checkpoint's finished domains, if this run has the same stream and method.

        Raises:
            ValueError: if the checkpoint is not a stream checkpoint, or this run's data, method settings or precision
                differ from those stored in it (the message names each difference).
            TypeError: if the data module cannot start a stream after its first domains.
        """
        path = str(self.trainer.ckpt_path or "the checkpoint")
        if self.trainer.ckpt_path:  # whole, as its checksum says, before anything of it is applied
            verify_stream_checkpoint(self.trainer.ckpt_path)
        stream = checkpoint.get(STREAM_KEY)
        check_same_stream(None if stream is None else stream.get("fingerprint"), self.stream_fingerprint(), path)
        assert stream is not None
        self._results = [DomainRow.from_mapping(row, i) for i, row in enumerate(stream["results"])]
        datamodule = self._datamodule()
        next_domain = int(stream["next_domain"])
        self.start_domain = next_domain
        if not datamodule.resume_from(next_domain):
            self._report_finished_stream(path, next_domain, datamodule.stop_domain)
            return
        rank_zero_info(f"resuming the stream at domain {self.start_domain} of {len(self.domains)}")

    def stream_fingerprint(self, datamodule: Any = None, precision: str | None = None) -> dict[str, Any]:
        """What a stream checkpoint must match to be resumed (:func:`zoa_lightning.resume.stream_fingerprint`).

        Args:
            datamodule: the stream's data module (default: the trainer's).
            precision: the network's precision tag (default: this module's, ``"W8A8"`` once quantized).

        Raises:
            TypeError: without a data module that can resume a stream and name it.
        """
        datamodule = self._datamodule() if datamodule is None else datamodule
        if not isinstance(datamodule, ResumableDataModule):
            raise TypeError(
                f"{type(self).__name__} checkpoints and resumes streams of a data module that names its stream and can "
                f"start after its first domains; {type(datamodule).__name__} lacks "
                f"{missing_members(datamodule, ResumableDataModule)}"
            )
        precision = self.precision_tag if precision is None else precision
        return stream_fingerprint(datamodule.stream_fingerprint(), type(self).__name__, dict(self.hparams), precision)

    def _report_finished_stream(self, path: str, next_domain: int, stop_domain: int | None) -> None:
        """Say that a resumed checkpoint has nothing left to run (``trainer.test`` then runs no batch)."""
        if stop_domain is not None and next_domain < len(self.domains):
            rest = f"stop_domain={stop_domain} ends this run there; raise or unset stop_domain to run the rest"
        else:
            rest = "start a fresh run (without ckpt_path) to run it again"
        rank_zero_info(
            f"the stream in {path} is already finished: {next_domain} of {len(self.domains)} domains ran (mean top-1 "
            f"{mean_of(self._results, 'acc1'):.2f}%). Nothing left to run, so no results are written; {rest}"
        )

    # ------------------------------------------------------------------ bookkeeping
    def _start_domain(self, index: int) -> None:
        self._current = {
            "index": index,
            "batches": 0,
            "n": 0,
            "forward_passes": 0,
            "skipped_at_start": self.skipped_batches(),
            "start": time.perf_counter(),
        }

    def _finish_domain(self) -> None:
        current, self._current = self._current, None
        if current is None or current["batches"] == 0:
            return
        index = current["index"]
        samples = current["n"]
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every process closes the domain at the same batch, so this sum (like the metrics' sync) meets everywhere.
            total = torch.tensor([samples], dtype=torch.long, device=self.device)
            samples = int(self.trainer.strategy.reduce(total, reduce_op="sum")[0])
        round_index, corruption = self.domains[index].split("/", 1)
        row = DomainRow(
            index=index,
            round=int(round_index.lstrip("r")),
            corruption=corruption,
            domain=self.domains[index],
            acc1=float(self.acc1[index].compute()) * 100,
            acc5=float(self.acc5[index].compute()) * 100,
            n=samples,
            batches=current["batches"],
            forward_passes=current["forward_passes"],
            skipped_batches=self.skipped_batches() - current["skipped_at_start"],
            seconds=time.perf_counter() - current["start"],
        )
        self._results.append(row)
        skipped = f"  [{row.skipped_batches} batch(es) rolled back]" if row.skipped_batches else ""
        rank_zero_info(
            f"{row.domain}: top-1 {row.acc1:.2f}%  top-5 {row.acc5:.2f}%  "
            f"(running mean top-1 {mean_of(self._results, 'acc1'):.2f}% over {len(self._results)} domains){skipped}"
        )


class _ImagesOnDevice:
    """Iterate a loader, yielding only each batch's images, moved to ``device`` (for source statistics)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Any:
        for batch in self.loader:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            yield images.to(self.device)


def _check_source_batches(source_batches: int | None) -> int | None:
    """Validate a ``source_batches`` argument (``None`` or ``>= 1``) and return it."""
    if source_batches is not None and source_batches < 1:
        raise ValueError(f"source_batches must be >= 1 or None, got {source_batches}")
    return source_batches
