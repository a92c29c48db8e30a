"""LightningModules that run a (quantized) classifier over a stream of corrupted domains, adapting or not.

:class:`StreamModule` is the template of every method. It holds what they share: the network (built by one factory or
injected) and its device, the method's pure-torch adapter (:class:`~zoa_lightning.core.protocols.StreamAdapter`),
source statistics for adapters that need them, one top-1 and one top-5 ``MulticlassAccuracy`` per domain, per-domain
bookkeeping (samples, batches, forward passes, rolled-back batches, seconds), run info, the stream position that a
checkpoint resumes from, and the protocols the callbacks use. A method subclass declares its hyperparameters and
implements one hook, :meth:`StreamModule.build_adapter` (see ``CONTRIBUTING.md``); the baselines are in
:mod:`zoa_lightning.baselines`.

* :class:`ZOAModule`: ZOA (two forward passes and a manual zeroth-order update per batch, in ``test_step``).
* :class:`NoAdaptModule`: the network as it is (eval mode; BatchNorm uses its running statistics).

Testing needs no optimizer (Lightning never calls ``configure_optimizers`` in ``test``). Shipped configs set
``trainer.inference_mode: false``; ZOA also works under the default ``inference_mode=True`` because every tensor it
mutates is allocated in ``setup`` and updated in place.

Several processes (``strategy: ddp``, ``devices: N``, ``use_distributed_sampler: false``): the data module gives every
process its slice of each global batch; ZOA sums its statistics over processes before any update, so all processes
take the same step as one process on the global batch; the per-domain accuracies sync themselves (torchmetrics) and the
domain rows count the samples of all processes. See ``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.methods.no_adapt import NoAdapt
from zoa_lightning.core.protocols import (
    BankAdapter,
    ReportingAdapter,
    RollbackAdapter,
    SourceDataModule,
    SourceStatisticsAdapter,
    StreamAdapter,
    StreamDataModule,
    missing_members,
)
from zoa_lightning.loop import is_last_batch_of_domain
from zoa_lightning.networks import build_network

__all__ = ["NoAdaptModule", "StreamModule", "ZOAModule"]

log = logging.getLogger(__name__)

_STREAM_KEY = "zoa_stream"


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
        self.adapter: StreamAdapter | None = None
        self.network_name = network if isinstance(network, str) else type(network).__name__
        self.net = network if isinstance(network, nn.Module) else build_network(network, weights, num_classes)
        self.num_classes = num_classes
        self.precision_tag = "float"
        self.domains: tuple[str, ...] = ()
        self.start_domain = 0
        self.acc1 = nn.ModuleList()
        self.acc5 = nn.ModuleList()
        self._results: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    # ------------------------------------------------------------------ protocols used by callbacks
    def get_network(self) -> nn.Module:
        """The network (quantized once a quantization callback has run; the adapter's ``model`` once built)."""
        return self.adapter.model if self.adapter is not None else self.net

    def set_network(self, network: nn.Module, precision: str) -> None:
        """Install a (quantized) network before :meth:`setup_method` runs; ``precision`` e.g. ``"W8A8"``."""
        if getattr(self, "_method_ready", False):
            raise RuntimeError("set_network must run before the method's setup (use a callback's setup hook)")
        self.net = network
        self.precision_tag = precision

    def stream_results(self) -> list[dict[str, Any]]:
        """One dict per finished domain, in stream order (acc1/acc5 in %, samples, batches, passes, seconds).

        Under DDP the accuracies and ``n`` cover all processes, ``batches`` counts global batches and
        ``forward_passes`` the passes of one process (every process runs each pass on its slice).
        """
        return [dict(r) for r in self._results]

    def run_info(self) -> dict[str, Any]:
        """Method, model and precision of this run, then :attr:`reported_hparams` and the adapter's ``run_info()``."""
        info = {"method": self.run_name, "model": self.network_name, "bits": self.precision_tag}
        info.update((key, self.hparams[key]) for key in self.reported_hparams)
        if isinstance(self.adapter, ReportingAdapter):
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

    # ------------------------------------------------------------------ the method's hook
    def build_adapter(self, network: nn.Module) -> StreamAdapter:
        """Wrap the (quantized) ``network`` in this method's pure-torch adapter: the one hook a method implements.

        Called once by :meth:`setup_method`, outside inference mode and under ``torch.no_grad``, with the network on
        the run's device. Read the hyperparameters from ``self.hparams`` (or attributes set in ``__init__``); pass
        :meth:`reduce_sum` as the adapter's ``reduce_fn`` if it sums statistics over processes.

        Args:
            network: the network to adapt (modify it in place as the method needs).

        Returns:
            A :class:`~zoa_lightning.core.protocols.StreamAdapter` whose ``model`` is ``network``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement build_adapter(network) and return the method's adapter "
            "(see zoa_lightning.core.protocols.StreamAdapter and CONTRIBUTING.md)"
        )

    # ------------------------------------------------------------------ template
    def setup_method(self, datamodule: SourceDataModule) -> None:
        """Build the adapter (:meth:`build_adapter`) and, if it needs them, collect its source statistics.

        ``trainer.test`` calls this in ``setup("test")``, after quantization callbacks, with the network on the run's
        device; from Python, call it before :meth:`adapt_step`. An adapter that is an ``nn.Module`` takes over the
        network (it becomes the child ``adapter``, checkpoint keys ``adapter.*``); a plain-object adapter leaves it as
        the child ``net``. Source statistics use the first ``source_batches`` batches of
        ``datamodule.source_dataloader()`` (all if ``None``).

        Args:
            datamodule: any object with ``source_dataloader()`` (only read if the adapter collects statistics).

        Raises:
            TypeError: if :meth:`build_adapter` returns no ``StreamAdapter`` (the message names what it lacks).
        """
        network = self.net
        adapter = self.build_adapter(network)
        if not isinstance(adapter, StreamAdapter):
            raise TypeError(
                f"{type(self).__name__}.build_adapter returned a {type(adapter).__name__}, which lacks "
                f"{missing_members(adapter, StreamAdapter)} of zoa_lightning.core.protocols.StreamAdapter: return an "
                "object with a `model`, a `forward_passes` count and a __call__(images) -> logits"
            )
        if isinstance(adapter, nn.Module):
            del self.net  # from now on the network lives once, inside the adapter
        self.adapter = adapter
        if isinstance(adapter, SourceStatisticsAdapter):
            images = _ImagesOnDevice(datamodule.source_dataloader(), _device_of(adapter.model))
            adapter.collect_source_statistics(images, max_batches=self.source_batches)

    def adapt_step(self, images: Tensor) -> Tensor:
        """Return the logits the method predicts for ``images`` (adapting on them if it adapts): calls the adapter."""
        if self.adapter is None:
            raise RuntimeError(
                f"{type(self).__name__} has no adapter yet: trainer.test builds it in setup; from Python call "
                "setup_method(datamodule) first"
            )
        return self.adapter(images)

    def reduce_sum(self, stats: Tensor) -> Tensor:
        """Sum a statistics tensor over processes (identity on one process): the ``reduce_fn`` to give an adapter."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return stats
        return trainer.strategy.reduce(stats.clone(), reduce_op="sum")

    def forward_passes(self) -> int:
        """Network forward passes spent so far (the adapter's count; for cost reports)."""
        return self.adapter.forward_passes if self.adapter is not None else 0

    def skipped_batches(self) -> int:
        """Batches whose adaptation was rolled back so far (0 for a method that never rolls back)."""
        return int(self.adapter.skipped_batches) if isinstance(self.adapter, RollbackAdapter) else 0

    def _datamodule(self) -> Any:
        """The trainer's data module (``None`` without a trainer or data module)."""
        return getattr(self._trainer, "datamodule", None)

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
        self.start_domain = int(getattr(datamodule, "start_domain", 0))
        metrics: dict[str, Any] = {"top_k": 1, "average": "micro", "sync_on_compute": True}
        self.acc1 = nn.ModuleList(MulticlassAccuracy(self.num_classes, **metrics) for _ in self.domains)
        self.acc5 = nn.ModuleList(
            MulticlassAccuracy(self.num_classes, **{**metrics, "top_k": min(5, self.num_classes)}) for _ in self.domains
        )
        device = self.trainer.strategy.root_device
        self.net.to(device)
        with torch.inference_mode(False), torch.no_grad():
            self.setup_method(datamodule)
        self._method_ready = True

    @override
    def on_test_start(self) -> None:
        """Refuse inference mode for an adapter that back-propagates; under DDP, check the loaders' sharding."""
        if getattr(self.adapter, "requires_autograd", False) and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} back-propagates, which inference mode forbids: set `trainer.inference_mode: "
                "false` in the config (or pass Trainer(inference_mode=False))"
            )
        if self.trainer.world_size > 1:
            _check_sharded_loaders(self.trainer.test_dataloaders, self.trainer.world_size)

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
            mean1 = sum(r["acc1"] for r in self._results) / len(self._results)
            mean5 = sum(r["acc5"] for r in self._results) / len(self._results)
            # Equal on every process (built from the synced per-domain metrics): sync_dist is an exact no-op mean.
            self.log("test/mean/acc1", mean1, sync_dist=True)
            self.log("test/mean/acc5", mean5, sync_dist=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the stream position, the finished domains' results and the run's fingerprint under ``zoa_stream``.

        The fingerprint (:meth:`_stream_fingerprint`) names the stream (the data module's identifying settings) and the
        method (class and hyperparameters), so that a resumed run can refuse to continue a different one.
        """
        finished = self._results[-1]["index"] + 1 if self._results else self.start_domain
        checkpoint[_STREAM_KEY] = {
            "next_domain": finished,
            "results": [dict(r) for r in self._results],
            "precision": self.precision_tag,
            "fingerprint": self._stream_fingerprint(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume the stream after the checkpoint's finished domains, if this run has the same stream and method.

        Raises:
            ValueError: if this run's data or method settings differ from those stored in the checkpoint (the message
                names each difference). A checkpoint without a fingerprint (an older version) only warns.
        """
        stream = checkpoint.get(_STREAM_KEY)
        if stream is None:
            return
        self._check_same_stream(stream.get("fingerprint"))
        self._results = [dict(r) for r in stream["results"]]
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "start_domain"):
            return
        next_domain = int(stream["next_domain"])
        self.start_domain = next_domain
        resume_from = getattr(datamodule, "resume_from", None)
        if not callable(resume_from):
            datamodule.start_domain = next_domain
        elif not resume_from(next_domain):
            self._report_finished_stream(next_domain, getattr(datamodule, "stop_domain", None))
            return
        rank_zero_info(f"resuming the stream at domain {self.start_domain} of {len(self.domains)}")

    def _stream_fingerprint(self) -> dict[str, Any]:
        """What a stream checkpoint must match to be resumed: ``{"data": {...}, "method": {...}}``, plain values.

        ``data`` is the data module's ``stream_fingerprint()`` (or, for a data module without one, its class and
        domains); ``method`` is this module's class name and hyperparameters (``self.hparams``).
        """
        datamodule = self._datamodule()
        data: dict[str, Any] = {}
        if datamodule is not None:
            own = getattr(datamodule, "stream_fingerprint", None)
            if callable(own):
                data = dict(own())
            else:
                data = {"data_module": type(datamodule).__name__, "domains": list(getattr(datamodule, "domains", ()))}
        method = {"class": type(self).__name__}
        method.update((k, v) for k, v in self.hparams.items() if not k.startswith("_"))
        return {"data": _plain_values(data), "method": _plain_values(method)}

    def _check_same_stream(self, stored: dict[str, Any] | None) -> None:
        """Raise if the checkpoint's fingerprint ``stored`` differs from this run's; warn if there is none."""
        path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        if stored is None:
            rank_zero_warn(
                f"the stream checkpoint {path} has no stream fingerprint (it was written by an older zoa-lightning), "
                "so this run cannot check that it continues the same stream with the same method settings. If the "
                "data or model settings differ from that run's, domains are evaluated twice or skipped and the "
                "results mix two settings; start a fresh run (without ckpt_path) if unsure"
            )
            return
        differences = _fingerprint_differences(stored, self._stream_fingerprint())
        if differences:
            raise ValueError(
                f"cannot resume from {path}: this run differs from the run that wrote it in "
                + "; ".join(differences)
                + ". Continuing would evaluate some domains twice, skip others or mix two settings in one result. "
                "Resume with the same data and model configs (and flags) as that run, or start a fresh run without "
                "ckpt_path (`--ckpt_path` on the command line)"
            )

    def _report_finished_stream(self, next_domain: int, stop_domain: int | None) -> None:
        """Say that a resumed checkpoint has nothing left to run (``trainer.test`` then runs no batch)."""
        path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        mean = sum(r["acc1"] for r in self._results) / len(self._results) if self._results else float("nan")
        if stop_domain is not None and next_domain < len(self.domains):
            rest = f"stop_domain={stop_domain} ends this run there; raise or unset stop_domain to run the rest"
        else:
            rest = "start a fresh run (without ckpt_path) to run it again"
        rank_zero_info(
            f"the stream in {path} is already finished: {next_domain} of {len(self.domains)} domains ran (mean top-1 "
            f"{mean:.2f}%). Nothing left to run, so no results are written; {rest}"
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
        row = {
            "index": index,
            "domain": self.domains[index],
            "round": int(round_index.lstrip("r")),
            "corruption": corruption,
            "acc1": float(self.acc1[index].compute()) * 100,
            "acc5": float(self.acc5[index].compute()) * 100,
            "n": samples,
            "batches": current["batches"],
            "forward_passes": current["forward_passes"],
            "skipped_batches": self.skipped_batches() - current["skipped_at_start"],
            "seconds": time.perf_counter() - current["start"],
        }
        self._results.append(row)
        mean = sum(r["acc1"] for r in self._results) / len(self._results)
        skipped = f"  [{row['skipped_batches']} batch(es) rolled back]" if row["skipped_batches"] else ""
        rank_zero_info(
            f"{row['domain']}: top-1 {row['acc1']:.2f}%  top-5 {row['acc5']:.2f}%  "
            f"(running mean top-1 {mean:.2f}% over {len(self._results)} domains){skipped}"
        )


class NoAdaptModule(StreamModule):
    """No adaptation: the (quantized) network in eval mode; BatchNorm keeps its running statistics.

    Args:
        network: see :class:`StreamModule`.
        weights: see :class:`StreamModule`.
        num_classes: see :class:`StreamModule`.
        name: see :class:`StreamModule`.
    """

    method_name = "no_adapt"

    @override
    def build_adapter(self, network: nn.Module) -> NoAdapt:
        return NoAdapt(network)


class ZOAModule(StreamModule):
    """ZOA: each test batch costs two forward passes and one zeroth-order update of the norm layers.

    ``test_step`` runs pass A (prediction with the current parameters, loss ``L0``), pass B (all adapted values
    perturbed, loss ``L+``), and the manual SPSA update of the epsilons and knowledge-mixing logits; a domain-shift
    detector stores the adapted parameters in a knowledge bank. See ``zoa_lightning.core`` and the specification.

    Every field of :class:`~zoa_lightning.core.config.ZOAConfig` is an argument here, with the same name, type and
    default (a test keeps the two in step); the module builds its ``ZOAConfig`` from them field by field.

    Args:
        network: see :class:`StreamModule`.
        weights: see :class:`StreamModule`.
        num_classes: see :class:`StreamModule`.
        lr: SGD learning rate of the epsilons.
        lr_alpha: learning rate of the mixing logits (first-AdamW step).
        spsa_c: perturbation scale of the epsilons.
        spsa_c_alpha: perturbation scale of the logits.
        momentum: SGD momentum of the epsilons.
        weight_decay: coupled weight decay of the epsilons.
        weight_decay_alpha: decoupled weight decay of the logits.
        sp_avg: SPSA repetitions per step (each adds a forward pass).
        steps: zeroth-order steps per batch.
        max_weight_nums: knowledge-bank capacity.
        alpha_scale: logit scale of the mixing softmax.
        weight_margin: divisor of the scale factor that sets a new knowledge entry's mixing logit.
        alpha_clip: a new knowledge entry's mixing logit is clipped to ``[-alpha_clip, alpha_clip]``.
        domain_t: domain-shift threshold (symmetric KL).
        lambda_bp: weight of the statistics-discrepancy loss term.
        detector_min_batch: smallest batch that tests for / updates the domain detector.
        detector_momentum: weight of the old running statistics in the domain detector's moving average.
        shift_momentum: weight of the old running mean in the activation shift's moving average.
        use_bank: store knowledge on detected shifts.
        use_shift: apply the back-to-source activation shift to predictions.
        loss_on_shifted: evaluate the loss on the activation-shifted features and logits (an extension; see
            :class:`~zoa_lightning.core.config.ZOAConfig`).
        mode: ``reference`` (the authors' behaviour) or ``corrected`` (the evident intent).
        resnet_shift: override the CNN shift-vector switch (``scalar``/``vector``).
        compact_similarity: override the similarity-matrix compaction switch.
        detector_passes: override how many passes run the detector (1 or 2).
        seed_detector_from_source: override whether CNN source statistics seed the detector.
        seed: seed of ZOA's own perturbation generator.
        max_abs_epsilon: update guard: a step that would move an epsilon beyond this magnitude is rolled back and
            counted as skipped (``None``: no guard; see :class:`~zoa_lightning.core.config.ZOAConfig`).
        max_consecutive_skips: stop the run with an error after this many rolled-back batches in a row (``None``:
            never).
        estimator: ``spsa`` (the reference's one-sample estimate), ``per_sample`` (one perturbation per image, ViTs
            only) or ``first_order`` (the autograd oracle, not zeroth-order: a diagnostic ceiling that needs
            ``trainer.inference_mode: false``); see :class:`~zoa_lightning.core.config.ZOAConfig` and
            ``docs/estimators.md``.
        perturbation: ``segmented_uniform`` or ``rademacher`` (default: the estimator's).
        normalize_step: divide the estimate by a running estimate of its spread before the step.
        normalize_floor: the smallest spread the normalised step divides by.
        normalize_momentum: the momentum of the normalised step's running spread (0.9: ~10 batches).
        tap_attribution: per-sample estimator only: credit each epsilon with the loss taps after its layer only.
        pool_images: batches with fewer images (down to one) pool their loss and detector statistics with the batches
            before them up to this many images, and step by their share (``docs/small_batches.md``).
        bn_prior: prior strength of the running test statistics a pooled small batch's BatchNorms mix in (Schneider
            et al. 2020, the estimate kept as in RoTTA); 0: the batch's statistics alone.
        source_batches: clean batches used for source statistics (``None``: the whole source loader).
        adapt_norms: qualified names of the normalization layers to adapt (``blocks.4.norm2``, ``layer2.0.bn1``, ...),
            replacing the spec's choice for the model kind (:func:`~zoa_lightning.core.layout.resolve_layout`); any
            order, kept in network order. Fewer adapted values make the one-sample SPSA estimate less noisy. ``None``:
            the spec's layers.
        name: see :class:`StreamModule`.
    """

    method_name = "zoa"
    adapter: ZOA | None

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        lr: float = 0.005,
        lr_alpha: float = 0.01,
        spsa_c: float = 0.01,
        spsa_c_alpha: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.4,
        weight_decay_alpha: float = 0.1,
        sp_avg: int = 1,
        steps: int = 1,
        max_weight_nums: int = 32,
        alpha_scale: float = 10.0,
        weight_margin: float = 0.01,
        alpha_clip: float = 10.0,
        domain_t: float = 0.1,
        lambda_bp: float = 30.0,
        detector_min_batch: int = 64,
        detector_momentum: float = 0.8,
        shift_momentum: float = 0.9,
        use_bank: bool = True,
        use_shift: bool = True,
        loss_on_shifted: bool = False,
        mode: Literal["reference", "corrected"] = "reference",
        resnet_shift: Literal["scalar", "vector"] | None = None,
        compact_similarity: bool | None = None,
        detector_passes: Literal[1, 2] | None = None,
        seed_detector_from_source: bool | None = None,
        seed: int = 2020,
        max_abs_epsilon: float | None = 10.0,
        max_consecutive_skips: int | None = 10,
        estimator: Literal["spsa", "per_sample", "first_order"] = "spsa",
        perturbation: Literal["segmented_uniform", "rademacher"] | None = None,
        normalize_step: bool = False,
        normalize_floor: float = 1e-3,
        normalize_momentum: float = 0.9,
        tap_attribution: bool = False,
        pool_images: int = 64,
        bn_prior: float = 16.0,
        source_batches: int | None = None,
        adapt_norms: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        arguments = dict(locals())
        super().__init__(network, weights, num_classes, name)
        if adapt_norms is not None and (not adapt_norms or len(set(adapt_norms)) != len(adapt_norms)):
            raise ValueError(f"adapt_norms must name at least one layer, each once; got {adapt_norms}")
        self.adapt_norms = None if adapt_norms is None else list(adapt_norms)
        # Field by field: a ZOAConfig field without an argument here keeps its default (and fails the in-step test).
        fields = [f.name for f in dataclasses.fields(ZOAConfig) if f.name in arguments]
        self.config = ZOAConfig(**{key: arguments[key] for key in fields})

    @override
    def build_adapter(self, network: nn.Module) -> ZOA:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        # Under DDP every BatchNorm2d normalises with the global batch's all-reduced statistics (exact); other
        # BatchNorm kinds would see only this process's slice.
        inexact = [type(m).__name__ for m in network.modules() if isinstance(m, _BatchNorm) and not isinstance(
            m, nn.BatchNorm2d)]  # fmt: skip
        if world_size > 1 and inexact:
            raise ValueError(
                f"ZOA cannot run {self.network_name} on {world_size} processes exactly: its {sorted(set(inexact))} "
                "layers normalise with the statistics of each process's slice of the batch (only BatchNorm2d layers "
                "are synchronised). Run it with `trainer.devices: 1`"
            )
        layout = resolve_layout(network)
        if self.adapt_norms is not None:
            order = {name: i for i, (name, _) in enumerate(network.named_modules())}
            unknown = [n for n in self.adapt_norms if n not in order]
            if unknown:
                raise ValueError(
                    f"adapt_norms names {unknown}, which {self.network_name} does not have; adaptable layers are "
                    f"{list(layout.norms)} by default (see print(model) for every module name)"
                )
            layout = dataclasses.replace(layout, norms=tuple(sorted(self.adapt_norms, key=order.__getitem__)))
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return ZOA(network, self.config, layout=layout, reduce_fn=self.reduce_sum, rank=rank, world_size=world_size)

    @override
    def run_info(self) -> dict[str, Any]:
        info = super().run_info()
        if self.adapter is not None:
            info.update(
                adapted_values=self.adapter.bank.size,
                knowledge_entries=self.adapter.bank.num_entries - 1,
                stores=self.adapter.counter("stores"),
                evictions=self.adapter.counter("evictions"),
                unadapted_batches=self.adapter.counter("unadapted_batches"),
                mode=self.config.mode,
                reduced_bytes_per_batch=self.adapter.reduce.last_batch_bytes,
            )
        return info


def _check_sharded_loaders(loaders: Any, world_size: int) -> None:
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


class _ImagesOnDevice:
    """Iterate a loader, yielding only each batch's images, moved to ``device`` (for source statistics)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Any:
        for batch in self.loader:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            yield images.to(self.device)


def _device_of(network: nn.Module) -> torch.device:
    """The device of the network's first parameter (or buffer); the CPU for a network without tensors."""
    tensor = next(itertools.chain(network.parameters(), network.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _plain_values(value: Any) -> Any:
    """Return ``value`` with tuples as lists, recursively; anything but plain types becomes its ``repr``."""
    if isinstance(value, dict):
        return {str(k): _plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_values(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _fingerprint_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Describe how two stream fingerprints differ, one ``"<section>.<key>: checkpoint X, this run Y"`` per key.

    Every key of the ``data`` sections is compared (a key on one side only is a difference). In the ``method``
    sections only keys on both sides are, so a hyperparameter added by a newer version does not block a resume.
    A side without a ``data`` section (no data module) is not compared.
    """
    differences = []
    for section in ("data", "method"):
        old, new = stored.get(section) or {}, current.get(section) or {}
        if not old or not new:
            continue
        keys = [*old, *(k for k in new if k not in old)] if section == "data" else [k for k in old if k in new]
        for key in keys:
            before, after = old.get(key, "<not set>"), new.get(key, "<not set>")
            if _plain_values(before) != _plain_values(after):
                differences.append(f"{section}.{key}: checkpoint {before!r}, this run {after!r}")
    return differences


def _check_source_batches(source_batches: int | None) -> int | None:
    """Validate a ``source_batches`` argument (``None`` or ``>= 1``) and return it."""
    if source_batches is not None and source_batches < 1:
        raise ValueError(f"source_batches must be >= 1 or None, got {source_batches}")
    return source_batches
