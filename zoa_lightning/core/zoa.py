"""The ZOA adapter: wrap a classifier, collect source statistics, then ``logits = adapter(images)`` (spec §3.4).

Per batch: pass A predicts and yields ``L0``; pass B, every adapted value perturbed, yields ``L+``; their difference is
the gradient estimate (``config.estimator``) that updates the epsilons and mixing logits, with nothing back-propagated.
``ZOA`` composes the parts of ``zoa_lightning.core`` (taps, bank, loss, detector, shift, source statistics,
estimators, update, transaction, and small-batch pooling: a batch below ``config.pool_images`` images, down to one,
pools its statistics with the batches before it, ``docs/small_batches.md``); every statistic passes through
``reduce_fn``, as a sum or as the batch's rows gathered exactly, so a sum all-reduce makes N processes adapt as one, bit
for bit, on their concatenated batch. Failures: a malformed
or non-finite input raises ``ValueError`` before anything changes; a non-finite loss, estimate or update, or an
epsilon beyond ``config.max_abs_epsilon``, rolls the batch back (:class:`~zoa_lightning.core.transaction.BatchGuard`)
and predicts with pass A's logits (or the unadapted network's); ``config.max_consecutive_skips`` rollbacks in a row
raise :class:`AdaptationDiverged`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.batch_norm import BatchStatistics
from zoa_lightning.core.config import ZOAConfig
from zoa_lightning.core.detector import DetectorSums, DomainShiftDetector
from zoa_lightning.core.estimators import GradientEstimator, check_estimator
from zoa_lightning.core.guard import SourceGuard
from zoa_lightning.core.layout import ModelLayout, check_head_prediction, check_image_batch
from zoa_lightning.core.loss import ZOALoss, loss_statistics
from zoa_lightning.core.methods.base import Adapter
from zoa_lightning.core.network import bind_network, network_input_size, network_layout
from zoa_lightning.core.policies import UnadaptedPredictions, on_shift
from zoa_lightning.core.shift import ActivationShift
from zoa_lightning.core.small_batch import SmallBatches
from zoa_lightning.core.source import SourceStatistics
from zoa_lightning.core.stats import CountedReduce, ReduceFn, gather_rows, identity_reduce, row_counts
from zoa_lightning.core.taps import PassRecord, PassResult
from zoa_lightning.core.transaction import AdaptationDiverged, BatchGuard, Rollback
from zoa_lightning.core.update import ZOAUpdate

__all__ = ["ZOA", "AdaptationDiverged", "PassResult"]


class ZOA(Adapter):
    """Zeroth-order test-time adaptation of a (quantized) classifier's normalization layers.

    The network is modified in place: its adapted norm layers become fused layers reading a
    :class:`~zoa_lightning.core.bank.KnowledgeBank`, every other BatchNorm uses batch statistics (spec §1.2), it is put
    in eval mode and its parameters stop requiring grad. Build the adapter after quantization; it runs one probe forward
    (batch 2) to size its buffers, so every ``state_dict`` shape is fixed from construction on.

    Args:
        model: a timm ``VisionTransformer`` (class token), a timm/torchvision ``ResNet``, a timm ``EfficientNet``, any
            classifier carrying a ``zoa_layout`` attribute, or a network an inference engine runs
            (:class:`~zoa_lightning.core.network.EngineNetwork`, e.g. an ONNX Runtime graph; docs/runtime.md).
        config: hyperparameters; the quirk switches are resolved for the model kind (see :class:`ZOAConfig`).
        layout: override where ZOA acts; default :func:`~zoa_lightning.core.layout.resolve_layout`.
        input_size: ``(C, H, W)`` of the probe forward; default the ViT's image size or ``(C, 64, 64)`` for CNNs.
        reduce_fn: sums a tensor over processes (identity by default): float64 statistics, and under DDP the zero-padded
            row buffers that gather the batch's loss features and logits.
        rank: this process's index among ``world_size`` (its images are its slice of the global batch, in rank order:
            the per-sample estimator draws every image's direction by its global index).
        world_size: the number of processes adapting together through ``reduce_fn``.

    Example:
        >>> import timm
        >>> net = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
        >>> adapter = ZOA(net, ZOAConfig(detector_min_batch=4))
        >>> adapter.collect_source_statistics([torch.randn(8, 3, 32, 32)])
        >>> adapter(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    COUNTERS = ("batches", "forward_passes", "skipped_batches", "stores", "evictions", "perturbed_detections",
                "unadapted_batches", "consecutive_skips")  # fmt: skip
    generator: torch.Generator

    def __init__(
        self,
        model: nn.Module,
        config: ZOAConfig | None = None,
        *,
        layout: ModelLayout | None = None,
        input_size: tuple[int, int, int] | None = None,
        reduce_fn: ReduceFn | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(model)
        self.rank, self.world_size = rank, world_size
        self._rows: Tensor | None = None  # under DDP, every process's row count of the batch being adapted
        self.layout = network_layout(model, layout)
        cfg = self.config = (config or ZOAConfig()).resolved(self.layout.kind)
        self.reduce = CountedReduce(reduce_fn)  # counts what it hands over (not checkpointed)
        self.last_losses = ()  # the last batch's L0 and L+ (diagnostics)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.events: list[dict[str, Any]] = []
        model.requires_grad_(False)
        # Every BatchNorm's batch settings (under DDP: global-batch statistics) and running test-statistics estimates
        self.batch_statistics = BatchStatistics(self.reduce if world_size > 1 else None)
        # The network's adapted layers read this bank; self.taps runs the recorded passes (network.py)
        self.bank, self.taps = bind_network(
            model, self.layout, self.batch_statistics, self._on_detector, world_size=world_size,
            estimator=cfg.estimator, max_entries=cfg.max_weight_nums, alpha_scale=cfg.alpha_scale,
            weight_margin=cfg.weight_margin, alpha_clip=cfg.alpha_clip, compact_similarity=bool(cfg.compact_similarity),
            initial_alpha=float(torch.randn(1, generator=self.generator)),
        )  # fmt: skip
        self.batch_statistics.to(self.bank.theta.device)
        check_estimator(cfg, self.layout, world_size)
        self.input_size = input_size or network_input_size(model, self.layout)
        device, dtype = self.bank.theta.device, self.bank.theta.dtype
        with torch.no_grad():
            probe_logits, probe = self.taps.run(zeros := torch.zeros(2, *self.input_size, device=device), "probe")
        if probe.head_input is None or len(probe.taps) != len(self.layout.taps):
            raise RuntimeError("the layout's taps or head were not reached by the model's forward")
        with torch.no_grad():  # the prediction must be the head's alone (a distilled ViT's is not): a random probe
            check = torch.randn(2, *self.input_size, generator=torch.Generator().manual_seed(0)).to(device)
            no_shift = torch.zeros(int(probe.head_input.shape[1]), device=device, dtype=dtype)
            logits, record = self.taps.run(check, "predict", shift=no_shift)  # record.shifted = head(final + 0)
            assert record.shifted is not None
            check_head_prediction(logits, record.shifted, model, self.layout.head)
        self.num_classes = int(probe_logits.shape[-1])
        self.loss = ZOALoss([int(t.shape[1]) for t in probe.taps] + [int(probe.head_input.shape[1])], cfg.lambda_bp)
        self.final_dim = self.loss.tap_dims[-1]
        self.source = SourceStatistics(self.loss.dim, device, dtype)
        self.detector = DomainShiftDetector(
            probe.detector_channels, cfg.domain_t, cfg.detector_momentum, cfg.detector_min_batch, device, dtype
        )
        self.shift = ActivationShift(self.final_dim, cfg.shift_momentum, device, dtype)
        self.small = SmallBatches(2 * self.loss.dim + 2, cfg.pool_images, device)  # batches below pool_images
        self.update = ZOAUpdate(cfg, self.bank.size, device)
        self.guard = SourceGuard(cfg, self.bank.size, device)
        self.estimator = GradientEstimator(
            cfg, self.loss.tap_dims, self.source, self.generator, self.reduce, rank, world_size
        )
        if cfg.tap_attribution:  # the first loss tap after each adapted layer (docs/estimators.md)
            self.estimator.set_layer_taps(self.taps.first_taps(zeros, self.layout.norms), self.bank.widths)
        self.unadapted = UnadaptedPredictions(model, self.bank, self.counters)

    # ------------------------------------------------------------------ passes, detector, shift
    def _pass(
        self, images: Tensor, pass_index: int, shift: Tensor | None, mode: str = "adapt", late: Tensor | None = None
    ) -> PassResult:
        """One forward of the network with the loss of spec §2; with ``loss_on_shifted`` the loss reads shifted logits.

        The returned feature mean is always that of the unshifted features (the activation shift's EMA tracks them).
        A ``late`` shift (the prediction's, when the loss reads unshifted logits) puts ``head(final + late)`` in the
        record's ``shifted``.
        """
        applied = shift if self.config.loss_on_shifted else None
        logits, record = self.taps.run(images, mode, pass_index, applied if applied is not None else late)  # type: ignore[arg-type]
        if applied is not None:
            record.head_input = record.final() + applied
            assert record.shifted is not None
            logits = record.shifted
        features = record.features()
        own = self._loss_statistics(features, logits)
        if mode == "adapt":
            record.taps.clear()  # the statistics are all the loss needs: free the features before the next pass
        stats = self.small.pooled(own)  # a small batch: with the recent batches' statistics
        loss, mean = self.loss(stats, self.source.mean, self.source.std)
        if stats is not own:  # the batch's own final mean (the activation shift's EMA tracks batches)
            dim = self.loss.dim
            mean = own[dim - self.final_dim : dim] / own[-1]
        final = mean[-self.final_dim :].to(self.shift.mean.dtype)
        kept = features if self.config.estimator == "per_sample" else None
        applied_own = None if stats is own else own
        return PassResult(logits, record, loss, final if applied is None else final - applied, stats, kept, applied_own)

    def _loss_statistics(self, features: Tensor, logits: Tensor) -> Tensor:
        """The loss statistics of the global batch (spec §2), the same bits on N processes as on one.

        One process sums its own rows. Several gather every process's features and logits (:func:`gather_rows`) and
        sum those: per-process sums added together would round differently from one process's sum, and on an INT8
        graph a difference of one rounding moves an activation into a neighbouring bin now and then, which the finite
        difference turns into a different step.
        """
        if self.world_size == 1:
            return self.reduce(loss_statistics(features, logits))
        both = self._gathered(torch.cat([features, logits.to(features.dtype)], 1))
        width = features.shape[1]
        return loss_statistics(both[:, :width].contiguous(), both[:, width:].to(logits.dtype).contiguous())

    def _gathered(self, local: Tensor) -> Tensor:
        """Every process's rows of ``local`` in rank order, exactly (several processes only; the batch's counts)."""
        counts = self._rows
        if counts is None:  # outside a batch (source statistics, fitness): count these rows
            counts = row_counts(local.shape[0], self.reduce, self.rank, self.world_size, local.device)
        return gather_rows(local, self.reduce, self.rank, counts)

    def fitness(self, images: Tensor, shift: Tensor | None = None) -> PassResult:
        """One pass's loss on ``images`` with the current parameters, touching no adaptation state (no detector).

        Differentiable inside :meth:`~zoa_lightning.core.bank.KnowledgeBank.evaluated_at` with values requiring grad.
        """
        return self._pass(images, 0, shift, mode="predict")

    def _on_detector(self, output: Tensor | DetectorSums, record: PassRecord) -> None:
        """The detector hook (spec §5.7): runs in pass A, and in pass B too in reference mode."""
        cfg = self.config
        self.counters.add("forward_passes", int(record.mode == "adapt"))
        perturbed = record.mode == "adapt" and record.pass_index > 0
        if (record.mode == "source" and not cfg.seed_detector_from_source) or (perturbed and cfg.detector_passes == 1):
            return
        layout = self.layout
        record.detected = self.detector.observe(
            output, layout.kind, layout.num_prefix_tokens, self.reduce, perturbed,
            pooled=self.small.active or record.mode == "source",  # source batches seed it in chunks too
        )  # fmt: skip
        if record.detected:  # spec §5.3 and §5.7: only the prediction pass stores
            self.events.append(on_shift(self.bank, self.counters, record.pass_index > 0, cfg.use_bank))
            if record.pass_index == 0:  # before the adapted layers run: pass A predicts with what comes back
                self.guard.restore(self.bank)

    def shift_vector(self) -> Tensor | None:
        """``δ = μ_src(final) - h`` (spec §4), or ``None`` before the first batch / after a reset."""
        if not self.config.use_shift:
            return None
        source = self.source.final(self.final_dim)
        if self.layout.kind == "cnn" and self.config.resnet_shift == "scalar":
            source = source[-1].expand_as(self.shift.mean)
        return self.shift.vector(source)

    # ------------------------------------------------------------------ public API
    def collect_source_statistics(self, loader: Iterable[Any], max_batches: int | None = None) -> None:
        """Compute the per-dimension source mean and (unbiased) std of the loss features on clean data (spec §2.1).

        Args:
            loader: yields image tensors, or tuples/lists whose first element is the image tensor.
            max_batches: use only the first ``max_batches`` batches (the reference ResNet uses 25).

        Raises:
            ValueError: if the loader yields no images or a malformed batch.
        """

        def features(images: Tensor) -> Tensor:
            check_image_batch(images, self.model, self.layout, self.input_size)
            own = self.taps.run(images.to(self.bank.theta.device), "source")[1].features()
            return own if self.world_size == 1 else self._gathered(own)  # every process sums the global batch's rows

        self.source.collect(loader, features, self.reduce if self.world_size == 1 else identity_reduce, max_batches)
        self.detector.pending.zero_()  # a chunk of clean images left over is not the stream's

    def set_source_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Install precomputed source statistics (concatenated over the loss taps, network order)."""
        self.source.set(mean, std)

    def predict(self, images: Tensor) -> Tensor:
        """Logits of the current (adapted, activation-shifted) model without adapting or touching any state."""
        check_image_batch(images, self.model, self.layout, self.input_size)
        with torch.no_grad():
            shift = self.shift_vector()
            logits, record = self.taps.run(images, "predict", shift=shift)
            return logits if record.shifted is None else record.shifted

    def forward(self, images: Tensor) -> Tensor:
        """Predict ``images`` with the current parameters, then adapt on them. Returns the prediction's logits.

        Raises:
            ValueError: for a malformed or non-finite batch (nothing changes).
            RuntimeError: without source statistics.
            AdaptationDiverged: when ``config.max_consecutive_skips`` batches in a row had to be rolled back.
        """
        check_image_batch(images, self.model, self.layout, self.input_size)
        if not bool(self.source.ready):
            raise RuntimeError("ZOA has no source statistics: call collect_source_statistics(clean_loader) first")
        guard = BatchGuard(self, self.generator, self.events, self.counters)
        self.reduce.begin_batch()
        self._begin_batch(images)
        try:
            with torch.no_grad():
                prediction, own, detected = self._adapt(images)
            guard.commit()
        except Rollback as failure:
            guard.rollback(failure.what)
            own, detected, fallback = None, False, failure.prediction
            finite = fallback is not None and bool(torch.isfinite(fallback).all())
            prediction = fallback if fallback is not None and finite else self.unadapted.pretrained(images)
        except BaseException:
            guard.rollback()
            self.small.active = False
            raise
        finally:
            self._rows = None
            self.detector.end_batch()
            self.reduce.end_batch()  # communication happens even when rolled back
            self.batch_statistics.end_batch()
        self.small.finish(own, detected)  # the pool of recent statistics (docs/small_batches.md)
        self.counters.add("batches")
        cfg = self.config
        guard.check_limit(cfg.max_consecutive_skips, f"Lower the learning rate (lr={cfg.lr}) or spsa_c ({cfg.spsa_c})")
        return prediction

    # ------------------------------------------------------------------ one batch (spec §3.4)
    def _begin_batch(self, images: Tensor) -> None:
        """Count the batch's images over all processes and decide whether it is pooled (docs/small_batches.md)."""
        count = images.shape[0]
        if self.world_size > 1:  # every process's rows: the batch's statistics gather them (_loss_statistics)
            self._rows = row_counts(count, self.reduce, self.rank, self.world_size, images.device)
            count = int(self._rows.sum())
        self.small.begin(count)
        pooled = self.small.active and self.config.bn_prior > 0
        self.batch_statistics.prior = self.config.bn_prior if pooled else None

    def _adapt(self, images: Tensor) -> tuple[Tensor, Tensor, bool]:
        cfg = self.config
        shift = self.shift_vector()  # 1. the shift vector from the batches so far
        self.batch_statistics.record = self.batch_statistics.prior is not None  # a pooled batch's BatchNorm statistics
        late = None if cfg.loss_on_shifted else shift  # (loss_on_shifted: pass A's logits are shifted already)
        a = self._pass(images, 0, shift, late=late)  # 2. pass A: prediction and L0; the detector may store knowledge
        self.batch_statistics.record = False
        prediction = a.logits if late is None else a.record.shifted
        assert prediction is not None
        loss0, final_mean, detected = a.loss, a.final_mean, a.record.detected
        a.record.head_input = None  # free pass A's activations before pass B (the per-sample estimator keeps features)
        steps = cfg.steps if float(a.stats[-1]) >= 2 else 0  # one image so far: no variance, no step
        if not bool(torch.isfinite(prediction).all()) or (steps and not bool(torch.isfinite(loss0))):
            raise Rollback("unperturbed loss is not finite", prediction)
        if detected:
            self.shift.reset()  # 3. a new domain: the running test mean starts again
        self.last_losses = (float(loss0),) if steps else ()
        self.counters.add("unadapted_batches", int(not steps and cfg.steps > 0))
        k = self.bank.num_entries  # 4. after a possible store in pass A
        if steps and self.guard.due(detected, self.bank):  # (guard: pass B checks the source values instead)
            self._check_source(images, shift, prediction, loss0)
            steps = 0
        for step in range(steps):  # 5-6. perturbed pass(es), estimate, update
            self._step(images, shift, k, prediction, a if step == 0 else None)
        self.shift.update(final_mean, self.small.momentum(cfg.shift_momentum))  # 7. the activation shift's EMA
        self.batch_statistics.commit(cfg.pool_images)  # (pooled batches: the BatchNorms' running estimates)
        return prediction, a.stats if a.own is None else a.own, detected  # 8.

    def _step(self, images: Tensor, shift: Tensor | None, k: int, prediction: Tensor, clean: PassResult | None) -> None:
        """One step: ``sp_avg`` gradient estimates (spec §3.2; ``config.estimator``), then the updates (spec §3.3)."""
        bank = self.bank

        def run(alpha: Tensor, theta: Tensor) -> PassResult:  # one pass B at these values; the bank is untouched
            # (the estimators build every pass's values for it alone: a per-image theta is the bank's scratch)
            with bank.evaluated_at(alpha, theta, scratch=True):
                return self._pass(images, 1, shift)

        def check(loss_plus: Tensor, reference: Tensor) -> None:
            self.last_losses += (float(loss_plus),)
            if not bool(torch.isfinite(loss_plus)) or not bool(torch.isfinite(reference)):
                raise Rollback("perturbed loss is not finite", prediction)

        grad_alpha, grad_theta = self.estimator.estimate(run, bank.alpha[:k].clone(), bank.theta.clone(), clean, check)
        power = self.estimator.sample_power
        failure = self.update.step(bank, k, grad_alpha, grad_theta, self.small.share, power)
        if failure is not None:
            raise Rollback(failure, prediction)

    def _check_source(self, images: Tensor, shift: Tensor | None, prediction: Tensor, loss0: Tensor) -> None:
        """The source guard's check (:mod:`zoa_lightning.core.guard`): pass B with the source values, then decide."""
        with self.bank.pretrained():
            loss_source = self._pass(images, 1, shift).loss
        self.last_losses += (float(loss_source),)
        if not bool(torch.isfinite(loss_source)):
            raise Rollback("source-check loss is not finite", prediction)
        self.guard.decide(self.bank, loss0, loss_source)

    def get_extra_state(self) -> dict[str, Any]:
        """The perturbation generator's state (plain types, safe for ``weights_only`` loading)."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`get_extra_state`."""
        self.generator.set_state(state["generator"])

    @property
    def config(self) -> ZOAConfig:
        """The resolved configuration; setting it (e.g. ``dataclasses.replace``) reaches every part that reads it."""
        return self._config

    @config.setter
    def config(self, value: ZOAConfig) -> None:
        self._config = value
        for part in ("update", "estimator", "guard"):
            if part in self.__dict__ or part in self._modules:
                getattr(self, part).config = value

    @property
    def requires_autograd(self) -> bool:
        """Whether the adapter back-propagates (the first-order oracle): it cannot run under inference mode."""
        return self.config.estimator == "first_order"

    @property
    def passes_per_batch(self) -> int:
        """``1 + n + (S - 1)(n + 1)`` for ``S`` steps of ``n = sp_avg`` estimates (spec §3.2): 2 by default."""
        steps, n = self.config.steps, self.config.sp_avg
        return 1 + n + (steps - 1) * (n + 1) if steps else 1
