"""The pure-torch ZOA adapter: wrap a classifier, collect source statistics, then ``logits = adapter(images)``.

Per batch (spec §3.4, defaults ``steps=1, sp_avg=1``) the adapter spends exactly two forward passes of the wrapped
network: pass A predicts with the current parameters and yields the loss ``L0``; pass B runs with all adapted values
perturbed at once and yields ``L+``; the difference gives the one-sided SPSA estimate that updates the epsilons (SGD)
and the knowledge-mixing logits (a first AdamW step). Nothing is back-propagated.

The adapter acts through forward hooks on the modules named by a :class:`~zoa_lightning.core.layout.ModelLayout`, so
it runs the network's own ``forward``. All loss and detector statistics are formed from sufficient statistics
(counts, sums, sums of squares) that pass through ``reduce_fn`` (identity by default): a sum all-reduce there makes
N processes adapt as one on their concatenated batch. The engine counts what it hands to ``reduce_fn``
(:attr:`ZOA.reduced_elements`, :attr:`ZOA.last_batch_reduced_bytes`, ...): the communication volume per batch under DDP.

Failure policy: an input that is not a finite ``(B, C, H, W)`` image batch of the expected size raises ``ValueError``
before anything changes. If a loss, the gradient estimate or an updated value turns out non-finite, or the update would
move an epsilon beyond ``config.max_abs_epsilon``, the whole batch is rolled back (every piece of adaptation state, the
generator included, is as before the batch; the forward passes that ran stay counted), the skip is counted in
:attr:`ZOA.skipped_batches` and reported with a ``RuntimeWarning``, and pass A's prediction is still returned; if that
prediction is itself not finite, the unadapted network's is returned instead (one more forward pass), so the engine
never hands out NaN logits. After ``config.max_consecutive_skips`` rolled-back batches in a row the engine raises
:class:`AdaptationDiverged`. A batch of a single image cannot give batch statistics: it is predicted with the current
parameters (one pass) and not adapted on, counted in ``unadapted_batches`` and reported once with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zoa_lightning.core.bank import FusedBatchNorm2d, FusedLayerNorm, KnowledgeBank
from zoa_lightning.core.config import ZOAConfig
from zoa_lightning.core.layout import ModelLayout, resolve_layout
from zoa_lightning.core.spsa import adamw_first_step_, segmented_uniform, sgd_step_, spsa_estimate
from zoa_lightning.core.stats import ReduceFn, channel_moments, finish, moments, softmax_entropy

__all__ = ["ZOA", "AdaptationDiverged"]

log = logging.getLogger(__name__)

_COUNTERS = (
    "batches",
    "forward_passes",
    "skipped_batches",
    "stores",
    "evictions",
    "perturbed_detections",
    "unadapted_batches",
    "consecutive_skips",
)
_V1_COUNTERS = 6  # checkpoints written before unadapted_batches/consecutive_skips existed hold the first six


class AdaptationDiverged(RuntimeError):
    """ZOA rolled back ``config.max_consecutive_skips`` batches in a row: the run can no longer adapt."""


def _post_norm(norm: nn.Module) -> nn.Module | None:
    """What a norm layer applies after normalising, e.g. timm ``BatchNormAct2d``'s dropout and activation."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
        return nn.Sequential(*(m for m in (drop, act) if isinstance(m, nn.Module)))
    return None


class _Rollback(Exception):
    """Raised inside a batch to roll it back; ``what`` says why, ``prediction`` is pass A's logits if computed."""

    def __init__(self, what: str, prediction: Tensor | None) -> None:
        super().__init__(what)
        self.what = what
        self.prediction = prediction


@dataclass
class _Capture:
    """What the hooks record during one forward pass."""

    mode: str  # "probe", "source", "adapt"
    pass_index: int = 0
    taps: list[Tensor] = field(default_factory=list)
    head_input: Tensor | None = None
    detected: bool = False


def _loss_features(cap: _Capture) -> Tensor:
    """The loss features ``F`` of one pass, ``(B, F)``: the taps in network order, then the head input (spec §2)."""
    return torch.cat([*cap.taps, cap.head_input], 1)  # type: ignore[list-item]


class ZOA(nn.Module):
    """Zeroth-order test-time adaptation of a (quantized) classifier's normalization layers.

    The wrapped network is modified in place: its adapted norm layers become fused layers that read a
    :class:`~zoa_lightning.core.bank.KnowledgeBank`, every other BatchNorm drops its running statistics (spec §1.2),
    it is put in eval mode and its parameters stop requiring grad. Build the adapter after quantization and
    calibration; it runs one small probe forward (batch 2) to size its buffers, so every ``state_dict`` shape is fixed
    from construction on.

    Args:
        model: a timm ``VisionTransformer`` (class token), a timm/torchvision ``ResNet``, a timm ``EfficientNet``, or
            any classifier carrying a ``zoa_layout`` attribute.
        config: hyperparameters; the quirk switches are resolved for the model kind (see :class:`ZOAConfig`).
        layout: override where ZOA acts; default :func:`~zoa_lightning.core.layout.resolve_layout`.
        input_size: ``(C, H, W)`` of the probe forward; default the ViT's image size or ``(C, 64, 64)`` for CNNs.
        reduce_fn: sums a float64 statistics vector over processes before it is used (identity by default).

    Example:
        >>> import timm
        >>> net = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
        >>> adapter = ZOA(net, ZOAConfig(detector_min_batch=4))
        >>> adapter.collect_source_statistics([torch.randn(8, 3, 32, 32)])
        >>> adapter(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    det_mean: Tensor
    det_var: Tensor
    det_ready: Tensor
    hist: Tensor
    hist_ready: Tensor
    src_mean: Tensor
    src_std: Tensor
    src_ready: Tensor
    momentum_buffer: Tensor
    momentum_ready: Tensor
    counters: Tensor

    def __init__(
        self,
        model: nn.Module,
        config: ZOAConfig | None = None,
        *,
        layout: ModelLayout | None = None,
        input_size: tuple[int, int, int] | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout if layout is not None else resolve_layout(model)
        self.layout.check(model)
        self.config = (config or ZOAConfig()).resolved(self.layout.kind)
        self.reduce_fn: ReduceFn = reduce_fn if reduce_fn is not None else (lambda t: t)
        # Communication accounting (diagnostics, not checkpointed): totals since construction and the last batch's.
        self.reduce_calls = 0
        self.reduced_elements = 0
        self.reduced_bytes = 0
        self.last_batch_reduce_calls = 0
        self.last_batch_reduced_elements = 0
        self.last_batch_reduced_bytes = 0
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.events: list[dict[str, Any]] = []
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.bank = self._fuse_norms()
        self._capture: _Capture | None = None
        self._warned: set[str] = set()  # one-time warnings already given by this instance
        self._full_batch_seen = False  # a batch large enough for the detector has been seen
        self._det_cache: tuple[Tensor, Tensor, int] | None = None
        self._handles = self._register_hooks()
        self.input_size = input_size or self._infer_input_size()
        dims = self._probe()
        device, dtype = self.bank.theta.device, self.bank.theta.dtype
        self._tap_dims = dims["taps"]
        total = sum(self._tap_dims)
        det = dims["detector"]

        def zeros(*shape: int, kind: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, dtype=kind, device=device)

        self.register_buffer("src_mean", zeros(total))
        self.register_buffer("src_std", zeros(total))
        self.register_buffer("src_ready", zeros(kind=torch.bool))
        self.register_buffer("det_mean", zeros(det))
        self.register_buffer("det_var", zeros(det))
        self.register_buffer("det_ready", zeros(kind=torch.bool))
        self.register_buffer("hist", zeros(self._tap_dims[-1]))
        self.register_buffer("hist_ready", zeros(kind=torch.bool))
        self.register_buffer("momentum_buffer", zeros(self.bank.size if self.config.momentum else 0))
        self.register_buffer("momentum_ready", zeros(kind=torch.bool))
        self.register_buffer("counters", zeros(len(_COUNTERS), kind=torch.long))
        self.num_classes: int = dims["classes"]

    # ------------------------------------------------------------------ construction
    def _fuse_norms(self) -> KnowledgeBank:
        cfg, modules = self.config, dict(self.model.named_modules())
        widths, bases, norms = [], [], []
        for name in self.layout.norms:
            m = modules[name]
            if m.weight is None or m.bias is None:
                raise ValueError(f"norm layer {name!r} has no affine weight and bias to adapt")
            widths.append(m.weight.numel())
            bases.append(torch.cat([m.weight.detach().reshape(-1), m.bias.detach().reshape(-1)]))
            norms.append(m)
        initial_alpha = float(torch.randn(1, generator=self.generator))
        bank = KnowledgeBank(
            widths,
            torch.cat(bases).float(),
            max_entries=cfg.max_weight_nums,
            alpha_scale=cfg.alpha_scale,
            weight_margin=cfg.weight_margin,
            alpha_clip=cfg.alpha_clip,
            compact_similarity=bool(cfg.compact_similarity),
            initial_alpha=initial_alpha,
        )
        for index, (name, m) in enumerate(zip(self.layout.norms, norms, strict=True)):
            fused: nn.Module
            if isinstance(m, nn.LayerNorm):
                fused = FusedLayerNorm(tuple(m.normalized_shape), m.eps, bank, index)
            else:
                fused = FusedBatchNorm2d(m.num_features, m.eps, bank, index, post=_post_norm(m))
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, fused)
        for name in self.layout.batch_norms:
            bn = self.model.get_submodule(name)
            if isinstance(bn, nn.BatchNorm2d):
                bn.track_running_stats = False
                bn.running_mean = None
                bn.running_var = None
        return bank

    def _register_hooks(self) -> list[Any]:
        get = self.model.get_submodule
        handles = [get(self.layout.detector).register_forward_hook(self._detector_hook)]
        handles += [get(name).register_forward_hook(self._tap_hook) for name in self.layout.taps]
        handles.append(get(self.layout.head).register_forward_pre_hook(self._head_hook))
        return handles

    def _infer_input_size(self) -> tuple[int, int, int]:
        weights = (getattr(m, "weight", None) for m in self.model.modules())
        channels = next((int(w.shape[1]) for w in weights if isinstance(w, Tensor) and w.ndim == 4), 3)
        if self.layout.kind == "vit":
            height, width = self.model.patch_embed.img_size  # type: ignore[union-attr]
            return channels, int(height), int(width)
        return channels, 64, 64

    @torch.no_grad()
    def _probe(self) -> dict[str, Any]:
        self._capture = _Capture("probe")
        try:
            logits = self.model(torch.zeros(2, *self.input_size, device=self.bank.theta.device))
            cap = self._capture
        finally:
            self._capture = None
        if cap.head_input is None or len(cap.taps) != len(self.layout.taps):
            raise RuntimeError("the layout's taps or head were not reached by the model's forward")
        return {
            "taps": [int(t.shape[1]) for t in cap.taps] + [int(cap.head_input.shape[1])],
            "detector": int(self._det_channels),
            "classes": int(logits.shape[-1]),
        }

    # ------------------------------------------------------------------ hooks
    def _tap_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self._capture is None:
            return
        if self.layout.kind == "vit":
            # A copy, not a view: a view would keep the whole (B, N, C) block output alive until the pass ends.
            feature = output[:, 0].clone()
        else:
            feature = output.mean((2, 3)) if output.ndim == 4 else output.flatten(1)
        self._capture.taps.append(feature)

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._capture is not None:
            self._capture.head_input = args[0].flatten(1).clone()  # a view would pin the input's storage

    def _detector_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        cap = self._capture
        if cap is None:
            return
        if cap.mode == "probe":
            self._det_channels = int(output.shape[-1] if self.layout.kind == "vit" else output.shape[1])
            return
        if cap.mode == "source" and not self.config.seed_detector_from_source:
            return
        if cap.mode == "adapt":
            self._add_counter("forward_passes")
            if cap.pass_index > 0 and self.config.detector_passes == 1:
                return
        if cap.mode == "adapt" and cap.pass_index > 0 and self._det_cache is not None:
            # The detector tensor does not depend on adapted parameters: reuse pass A's statistics (spec §5.1).
            mean, var, images = self._det_cache
        else:
            mean, var, images = self._detector_statistics(output)
            if cap.mode == "adapt":
                self._det_cache = (mean, var, images)
        cap.detected = self._detect(mean, var, images, cap.pass_index)

    def _detector_statistics(self, output: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel mean and unbiased variance of the detector tensor, and the (global) image count."""
        if self.layout.kind == "vit":
            output = output[:, self.layout.num_prefix_tokens :]  # patch tokens only, for the sums and the count
            s1, s2 = channel_moments(output, (0, 1))
        else:
            s1, s2 = channel_moments(output, (0, 2, 3))
        c = s1.numel()
        stats = self._all_reduce(torch.cat([s1, s2, s1.new_tensor([output.numel() // c, output.shape[0]])]))
        mean, var = finish(stats[2 * c], stats[:c], stats[c : 2 * c])
        return mean.to(self.det_mean.dtype), var.to(self.det_var.dtype), int(stats[2 * c + 1])

    def _all_reduce(self, stats: Tensor) -> Tensor:
        """Pass a statistics vector through ``reduce_fn``, counting the calls, elements and bytes handed over."""
        self.reduce_calls += 1
        self.reduced_elements += stats.numel()
        self.reduced_bytes += stats.numel() * stats.element_size()
        return self.reduce_fn(stats)

    # ------------------------------------------------------------------ detector (spec §5.1-§5.2, §5.7)
    def shift_divergence(self, mean: Tensor, var: Tensor) -> float:
        """Symmetric KL divergence between the running domain statistics and ``(mean, var)``, averaged per channel."""
        d2 = (self.det_mean - mean) ** 2
        div = (self.det_var + d2) / (2 * (var + 1e-8)) + (var + d2) / (2 * (self.det_var + 1e-8)) - 1
        return float(div.mean())

    def _detect(self, mean: Tensor, var: Tensor, images: int, pass_index: int) -> bool:
        cfg = self.config
        if images < cfg.detector_min_batch:
            if not self._full_batch_seen and "min_batch" not in self._warned:
                self._warned.add("min_batch")
                warnings.warn(
                    f"ZOA's domain detector ignores batches of fewer than detector_min_batch={cfg.detector_min_batch} "
                    f"images and this stream's batches have {images}: no domain shift will be detected and the "
                    "knowledge bank stores nothing. Use larger batches or lower detector_min_batch "
                    "(ZOAModule / --model.init_args.detector_min_batch)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        self._full_batch_seen = True
        shift = bool(self.det_ready) and self.shift_divergence(mean, var) > cfg.domain_t
        if shift:
            if pass_index == 0:
                self._on_shift()
            else:
                self._add_counter("perturbed_detections")
                log.warning("domain shift detected in a perturbed pass: not stored (spec §5.7)")
                self.events.append({"event": "perturbed_detection", "batch": self.counter("batches")})
            self.det_ready.fill_(False)
        if bool(self.det_ready):
            m = cfg.detector_momentum
            self.det_mean.mul_(m).add_(mean, alpha=1 - m)
            self.det_var.mul_(m).add_(var, alpha=1 - m)
        else:
            self.det_mean.copy_(mean)
            self.det_var.copy_(var)
            self.det_ready.fill_(True)
        return shift

    def _on_shift(self) -> None:
        event: dict[str, Any] = {"event": "shift", "batch": self.counter("batches")}
        if self.config.use_bank:
            record = self.bank.store()
            self._add_counter("stores")
            if record["evicted"]:
                self._add_counter("evictions")
            event.update(record)
            log.info("domain shift at batch %d: stored knowledge entry (%s)", event["batch"], record)
        self.events.append(event)

    # ------------------------------------------------------------------ passes and loss (spec §2)
    def _pass(
        self, images: Tensor, pass_index: int, shift: Tensor | None = None
    ) -> tuple[Tensor, _Capture, Tensor, Tensor]:
        """One forward of the network; returns ``(logits, capture, loss, final-feature batch mean)``.

        With ``config.loss_on_shifted`` and a ``shift``, the loss reads the shifted final feature and the head's logits
        of it, which are then the returned logits; the batch mean stays that of the unshifted feature (spec §4).
        """
        self._capture = _Capture("adapt", pass_index)
        try:
            logits = self.model(images)
            cap = self._capture
        finally:
            self._capture = None
        if shift is not None and self.config.loss_on_shifted:
            cap.head_input = cap.head_input + shift  # type: ignore[operator]
            logits = self._head(cap.head_input)
            loss, shifted_mean = self._loss(cap, logits)
            return logits, cap, loss, shifted_mean - shift  # the shift is the same for every image
        loss, final_mean = self._loss(cap, logits)
        return logits, cap, loss, final_mean

    def _loss(self, cap: _Capture, logits: Tensor) -> tuple[Tensor, Tensor]:
        # One moments call over all loss features (B, F) instead of one per tap: same per-column values, far fewer
        # small operations per pass. The reduced vector is [sums (F), sums of squares (F), entropy sum, count].
        s1, s2 = moments(_loss_features(cap), (0,))
        entropy = softmax_entropy(logits.float()).sum().double()
        stats = self._all_reduce(torch.cat([s1, s2, entropy.view(1), entropy.new_tensor([logits.shape[0]])]))
        total, n = s1.numel(), stats[-1]
        mean, var = finish(n, stats[:total], stats[total : 2 * total])
        std_terms = (var.sqrt() - self.src_std.double()) ** 2
        mean_terms = (mean - self.src_mean.double()) ** 2
        dims = self._tap_dims
        if all(d == dims[0] for d in dims):  # ViT: every tap has the model width
            per_tap = std_terms.view(len(dims), -1).mean(1) + mean_terms.view(len(dims), -1).mean(1)
        else:  # CNN stages: each stage's discrepancy is averaged over its own dimensions (spec §2.3)
            per_tap = torch.stack(
                [a.mean() + b.mean() for a, b in zip(std_terms.split(dims), mean_terms.split(dims), strict=True)]
            )
        loss = self.config.lambda_bp * per_tap.mean() + stats[-2] / n
        return loss, mean[-dims[-1] :].to(self.hist.dtype)

    def shift_vector(self) -> Tensor | None:
        """``δ = μ_src(final) - h`` (spec §4), or ``None`` before the first batch / after a reset."""
        if not self.config.use_shift or not bool(self.hist_ready):
            return None
        source = self.src_mean[-self._tap_dims[-1] :]
        if self.layout.kind == "cnn" and self.config.resnet_shift == "scalar":
            source = source[-1].expand_as(self.hist)
        return source - self.hist

    # ------------------------------------------------------------------ public API
    def _check_input(self, images: Tensor) -> None:
        c, h, w = self.input_size
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"ZOA expects an image batch of shape (B, {c}, H, W), got {shape}")
        if images.shape[1] != c:
            raise ValueError(f"ZOA expects {c}-channel images (B, {c}, H, W), got shape {tuple(images.shape)}")
        if self.layout.kind == "vit":
            embed = self.model.patch_embed
            if getattr(embed, "strict_img_size", True) and tuple(images.shape[2:]) != (h, w):
                raise ValueError(f"this ViT expects images of shape (B, {c}, {h}, {w}), got {tuple(images.shape)}")
            ph, pw = getattr(embed, "patch_size", (1, 1))
            if not getattr(embed, "dynamic_img_pad", False) and (images.shape[2] % ph or images.shape[3] % pw):
                raise ValueError(
                    f"this ViT expects images of shape (B, {c}, H, W) with H a multiple of {ph} and W of {pw} "
                    f"(e.g. ({c}, {h}, {w})), got {tuple(images.shape)}"
                )
        if images.shape[0] < 1:
            raise ValueError(f"ZOA got an empty batch of shape {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).sum())
            raise ValueError(f"the input batch contains {bad} NaN/Inf values; nothing was adapted on it")

    def collect_source_statistics(self, loader: Iterable[Any], max_batches: int | None = None) -> None:
        """Compute the per-dimension source mean and (unbiased) std of the loss features on clean data (spec §2.1).

        Args:
            loader: yields image tensors, or tuples/lists whose first element is the image tensor.
            max_batches: use only the first ``max_batches`` batches (the reference ResNet uses 25).

        Raises:
            ValueError: if the loader yields no images or a malformed batch.
        """
        acc: Tensor | None = None
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0] if isinstance(batch, tuple | list) else batch
                self._check_input(images)
                images = images.to(self.bank.theta.device)
                self._capture = _Capture("source")
                try:
                    self.model(images)
                    cap = self._capture
                finally:
                    self._capture = None
                s1, s2 = moments(_loss_features(cap), (0,))
                vec = torch.cat([s1, s2, s1.new_tensor([images.shape[0]])])
                acc = vec if acc is None else acc + vec
        if acc is None:
            raise ValueError("collect_source_statistics got an empty loader: pass clean source images")
        acc = self._all_reduce(acc)
        total = self.src_mean.numel()
        mean, var = finish(acc[-1], acc[:total], acc[total : 2 * total])
        self.set_source_statistics(mean, var.sqrt())

    def set_source_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Install precomputed source statistics (concatenated over the loss taps, network order)."""
        if mean.shape != self.src_mean.shape or std.shape != self.src_std.shape:
            raise ValueError(
                f"source statistics must have shape {tuple(self.src_mean.shape)}, "
                f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        self.src_mean.copy_(mean)
        self.src_std.copy_(std)
        self.src_ready.fill_(True)

    def predict(self, images: Tensor) -> Tensor:
        """Logits of the current (adapted, activation-shifted) model without adapting or touching any state."""
        self._check_input(images)
        with torch.no_grad():
            self._capture = _Capture("probe")
            try:
                logits = self.model(images)
                final = self._capture.head_input
            finally:
                self._capture = None
            shift = self.shift_vector()
            return self._head(final + shift) if shift is not None and final is not None else logits

    def _head(self, features: Tensor) -> Tensor:
        return self.model.get_submodule(self.layout.head)(features)

    def forward(self, images: Tensor) -> Tensor:
        """Predict ``images`` with the current parameters, then adapt on them. Returns the prediction's logits.

        Raises:
            ValueError: for a malformed or non-finite batch (nothing changes).
            RuntimeError: without source statistics.
            AdaptationDiverged: when ``config.max_consecutive_skips`` batches in a row had to be rolled back.
        """
        self._check_input(images)
        if not bool(self.src_ready):
            raise RuntimeError("ZOA has no source statistics: call collect_source_statistics(clean_loader) first")
        if images.shape[0] < 2:
            return self._predict_single(images)
        snapshot = self._begin()
        self._det_cache = None
        reason = ""
        sent = (self.reduce_calls, self.reduced_elements, self.reduced_bytes)
        try:
            with torch.no_grad():
                prediction = self._adapt(images)
            self._set_counter("consecutive_skips", 0)
        except _Rollback as failure:
            passes = self.counter("forward_passes")
            self._rollback(snapshot)
            self._set_counter("forward_passes", passes)  # the passes ran: count them even though nothing is kept
            self._add_counter("skipped_batches")
            self._add_counter("consecutive_skips")
            reason = failure.what
            warnings.warn(
                f"ZOA skipped batch {self.counter('batches')}: the {failure.what}; all adaptation state was rolled "
                f"back ({self.skipped_batches} skipped so far, {self.counter('consecutive_skips')} in a row)",
                RuntimeWarning,
                stacklevel=2,
            )
            prediction = failure.prediction
            if prediction is None or not bool(torch.isfinite(prediction).all()):
                prediction = self._unadapted_logits(images)
        except BaseException:
            self._rollback(snapshot)
            raise
        finally:
            self.bank._before_mutation = None
            self._det_cache = None
            # Communication happened even when the batch was rolled back: count it either way.
            self.last_batch_reduce_calls = self.reduce_calls - sent[0]
            self.last_batch_reduced_elements = self.reduced_elements - sent[1]
            self.last_batch_reduced_bytes = self.reduced_bytes - sent[2]
        self._add_counter("batches")
        limit = self.config.max_consecutive_skips
        if limit is not None and self.counter("consecutive_skips") >= limit:
            raise AdaptationDiverged(
                f"ZOA rolled back {self.counter('consecutive_skips')} batches in a row (the last one because the "
                f"{reason}): adaptation has diverged and every further batch would be rolled back too. Lower "
                f"the learning rate (lr={self.config.lr}) or the perturbation scale (spsa_c={self.config.spsa_c}); "
                f"max_consecutive_skips={limit} sets this limit (None turns it off)"
            )
        return prediction

    def _predict_single(self, images: Tensor) -> Tensor:
        """A one-image batch: predict with the current parameters and shift (one pass), adapt on nothing."""
        if "single" not in self._warned:
            self._warned.add("single")
            warnings.warn(
                "ZOA got a batch of one image: its loss and domain detector need batch statistics, so such batches "
                "are predicted with the current parameters and not adapted on (counted in unadapted_batches); use a "
                "batch size whose last batch has at least 2 images",
                RuntimeWarning,
                stacklevel=3,
            )
        try:
            logits = self.predict(images)
        except ValueError as error:  # torch's batch_norm refuses one value per channel (a 1×1 map of one image)
            raise ValueError(
                f"this network cannot predict a batch of one image: ZOA normalises its BatchNorm layers with batch "
                f"statistics and one of them sees a single value per channel ({error}). Use a batch size whose last "
                "batch has at least 2 images"
            ) from error
        self._add_counter("forward_passes")
        if not bool(torch.isfinite(logits).all()):
            logits = self._unadapted_logits(images)
        self._add_counter("unadapted_batches")
        self._add_counter("batches")
        return logits

    def _unadapted_logits(self, images: Tensor) -> Tensor:
        """Logits of the network with its pretrained norm parameters and no shift (one counted forward pass)."""
        with torch.no_grad(), self.bank.pretrained():
            logits = self.model(images)
        self._add_counter("forward_passes")
        return logits

    def _adapt(self, images: Tensor) -> Tensor:
        cfg, bank = self.config, self.bank
        shift = self.shift_vector()
        logits, cap, loss0, final_mean = self._pass(images, 0, shift)
        # With loss_on_shifted the pass already returned the shifted features' logits.
        shift_here = shift is not None and not cfg.loss_on_shifted
        prediction = self._head(cap.head_input + shift) if shift_here else logits  # type: ignore[operator]
        if not bool(torch.isfinite(loss0)) or not bool(torch.isfinite(prediction).all()):
            raise _Rollback("unperturbed loss is not finite", prediction)
        if cap.detected:
            self.hist_ready.fill_(False)
        k, size, device = bank.num_entries, bank.size, bank.theta.device
        for step in range(cfg.steps):
            alpha0, theta0 = bank.alpha[:k].clone(), bank.theta.clone()
            grad_alpha, grad_theta = torch.zeros_like(alpha0), torch.zeros_like(theta0)
            reference = loss0 if step == 0 else None
            for _ in range(cfg.sp_avg):
                u_alpha = segmented_uniform(k, self.generator, alpha0.dtype).to(device)
                u_theta = segmented_uniform(size, self.generator, theta0.dtype).to(device)
                bank.alpha[:k] = alpha0 + cfg.spsa_c_alpha * u_alpha
                bank.theta.copy_(theta0 + cfg.spsa_c * u_theta)
                loss_plus = self._pass(images, 1, shift)[2]
                bank.alpha[:k] = alpha0
                bank.theta.copy_(theta0)
                if reference is None:
                    reference = self._pass(images, 1, shift)[2]
                if not bool(torch.isfinite(loss_plus)) or not bool(torch.isfinite(reference)):
                    raise _Rollback("perturbed loss is not finite", prediction)
                grad_alpha += spsa_estimate(loss_plus, reference, u_alpha, cfg.spsa_c_alpha)
                grad_theta += spsa_estimate(loss_plus, reference, u_theta, cfg.spsa_c)
            grad_alpha /= cfg.sp_avg
            grad_theta /= cfg.sp_avg
            if not bool(torch.isfinite(grad_theta).all()) or not bool(torch.isfinite(grad_alpha).all()):
                raise _Rollback("gradient estimate is not finite", prediction)
            sgd_step_(
                bank.theta,
                grad_theta,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.momentum,
                momentum_buffer=self.momentum_buffer if cfg.momentum else None,
                first_step=not bool(self.momentum_ready),
            )
            if cfg.momentum:
                self.momentum_ready.fill_(True)
            if k > 1:
                adamw_first_step_(bank.alpha[:k], grad_alpha, lr=cfg.lr_alpha, weight_decay=cfg.weight_decay_alpha)
            if not bool(torch.isfinite(bank.theta).all()) or not bool(torch.isfinite(bank.alpha[:k]).all()):
                raise _Rollback("updated parameter is not finite", prediction)
            bound = cfg.max_abs_epsilon
            if bound is not None and bool((bank.theta.abs() > bound).any()):
                largest = float(bank.theta.abs().max())
                what = f"update would move an epsilon to |{largest:.3g}| > max_abs_epsilon={bound}"
                raise _Rollback(what, prediction)
        if bool(self.hist_ready):
            m = cfg.shift_momentum
            self.hist.mul_(m).add_(final_mean, alpha=1 - m)
        else:
            self.hist.copy_(final_mean)
            self.hist_ready.fill_(True)
        return prediction

    # ------------------------------------------------------------------ transactions
    def _state_tensors(self) -> Iterator[Tensor]:
        bank = self.bank
        yield from (bank.theta, bank.alpha, bank.count, bank.similarity)
        yield from (self.det_mean, self.det_var, self.det_ready, self.hist, self.hist_ready)
        yield from (self.momentum_buffer, self.momentum_ready)

    def _begin(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {
            "tensors": [t.clone() for t in self._state_tensors()],
            "generator": self.generator.get_state(),
            "deltas": None,
            "events": len(self.events),
            "counters": self.counters.clone(),
        }

        def backup_deltas() -> None:
            if snapshot["deltas"] is None:
                snapshot["deltas"] = self.bank.deltas.clone()

        self.bank._before_mutation = backup_deltas
        return snapshot

    def _rollback(self, snapshot: dict[str, Any]) -> None:
        for target, saved in zip(self._state_tensors(), snapshot["tensors"], strict=True):
            target.copy_(saved)
        if snapshot["deltas"] is not None:
            self.bank.deltas.copy_(snapshot["deltas"])
        self.generator.set_state(snapshot["generator"])
        del self.events[snapshot["events"] :]
        self.counters.copy_(snapshot["counters"])

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """The generator state and the resolved configuration (plain types, safe for ``weights_only`` loading)."""
        return {"generator": self.generator.get_state(), "config": asdict(self.config)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`get_extra_state`."""
        self.generator.set_state(state["generator"])

    def adaptation_state_dict(self) -> dict[str, Any]:
        """Everything ZOA changes, without the frozen network weights (small; what a stream checkpoint needs)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_adaptation_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`adaptation_state_dict`; the frozen network weights are left as they are."""
        missing = [k for k in self.adaptation_state_dict() if k not in state]
        if missing:
            raise KeyError(f"adaptation state is missing {missing}")
        self.load_state_dict({**{k: v for k, v in self.state_dict().items() if k.startswith("model.")}, **state})

    def counter(self, name: str) -> int:
        """Value of a run counter (``batches``, ``forward_passes``, ``skipped_batches``, ``stores``, ...)."""
        return int(self.counters[_COUNTERS.index(name)])

    def _add_counter(self, name: str, n: int = 1) -> None:
        self.counters[_COUNTERS.index(name)] += n

    def _set_counter(self, name: str, value: int) -> None:
        self.counters[_COUNTERS.index(name)] = value

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        counters = state_dict.get(prefix + "counters")
        if isinstance(counters, Tensor) and counters.numel() == _V1_COUNTERS < len(_COUNTERS):
            # A checkpoint from before unadapted_batches/consecutive_skips: those start at zero.
            state_dict[prefix + "counters"] = torch.cat([counters, counters.new_zeros(len(_COUNTERS) - _V1_COUNTERS)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def forward_passes(self) -> int:
        """Forward passes of the wrapped network so far (rolled-back batches included)."""
        return self.counter("forward_passes")

    @property
    def skipped_batches(self) -> int:
        """Batches whose adaptation was rolled back because something was not finite."""
        return self.counter("skipped_batches")

    def train(self, mode: bool = True) -> ZOA:
        """Set the module mode; the wrapped network stays in eval mode (ZOA's behaviour does not depend on it)."""
        super().train(mode)
        self.model.eval()
        return self
