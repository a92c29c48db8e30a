"""ZOA hyperparameters and the reference/corrected switches (spec §6.5, §9)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["ZOAConfig"]


@dataclass(frozen=True)
class ZOAConfig:
    """Every ZOA hyperparameter, with the reference implementation's defaults (spec §6.5).

    The four quirk switches default to ``None`` and are then resolved from ``mode`` for the model kind by
    :meth:`resolved`: ``"reference"`` reproduces the authors' behaviour (use it for numbers compared with the paper),
    ``"corrected"`` the evident intent (an ablation).

    Args:
        lr: SGD learning rate of the epsilons ``θ``.
        lr_alpha: learning rate of the closed-form first-AdamW step on the mixing logits ``α``.
        spsa_c: perturbation scale ``c`` of ``θ``.
        spsa_c_alpha: perturbation scale ``c_α`` of ``α``.
        momentum: SGD momentum of ``θ`` (0: no buffer).
        weight_decay: coupled (L2) weight decay of ``θ``; pulls ``θ`` towards the stored-knowledge mixture.
        weight_decay_alpha: decoupled weight decay of ``α``.
        sp_avg: SPSA repetitions averaged per step.
        steps: zeroth-order steps per batch. ``steps=1, sp_avg=1`` costs exactly two forward passes per batch.
        max_weight_nums: knowledge-bank capacity ``N_max`` for non-zero snapshots.
        alpha_scale: logit scale ``s`` in ``softmax(s·α)``; fixed.
        weight_margin: divisor of the scale factor that sets a new entry's logit.
        alpha_clip: a new entry's logit is clipped to ``[-alpha_clip, alpha_clip]``.
        domain_t: domain-shift threshold ``τ`` on the symmetric KL divergence (ViT 0.1, ResNet 0.2 in the paper).
        lambda_bp: weight ``λ`` of the statistics-discrepancy term (ViT 30, ResNet 1 in the paper).
        detector_min_batch: batches with fewer images neither test for a shift nor update the detector (64 in the
            reference; under DDP this counts the global batch).
        detector_momentum: weight of the old running statistics in the detector EMA (0.8).
        shift_momentum: weight of the old running mean in the activation-shift EMA (0.9).
        use_bank: store knowledge on detected shifts (``False`` gives the ``zoa_no_bank`` ablation).
        use_shift: apply FOA's back-to-source activation shift to predictions (``False``: ``zoa_no_shift``).
        loss_on_shifted: an extension, not in the reference: evaluate the loss of both passes on the activation-shifted
            final feature and its logits, i.e. on the model that makes the predictions (its mean term then measures
            what the shift leaves, and the entropy is that of the shifted predictions). Costs one more call of the
            classifier head per batch, no forward pass. No effect while there is no shift.
        mode: ``"reference"`` or ``"corrected"``; the default of the four switches below.
        resnet_shift: CNN shift vector: ``"scalar"`` (reference: the last element of the source mean) or
            ``"vector"`` (corrected: the final feature's source mean). Vision transformers always use the vector.
        compact_similarity: compact the similarity matrix after an eviction (corrected) or leave it stale
            (reference).
        detector_passes: run the shift detector in every forward pass (2, reference) or in the prediction pass only
            (1, corrected). A detection in a perturbed pass is logged and counted, never stored.
        seed_detector_from_source: run the detector during CNN source-statistics collection, seeding it with clean
            statistics (reference ResNet behaviour; never for vision transformers).
        seed: seed of the engine's own perturbation generator (and of the initial logit ``α₀ ~ N(0, 1)``).
        max_abs_epsilon: update guard (not in the reference, which has none): a step that would move any epsilon
            beyond ``±max_abs_epsilon`` is rolled back like a non-finite one and counted as skipped. Normal runs stay
            far inside (the demo run ends with |ε| ≤ 0.03 and stored snapshots ≤ 0.12); a runaway learning rate hits it
            at its first step instead of driving the epsilons to ~1e23. ``None`` disables the guard.
        estimator: how pass B's loss difference becomes a gradient estimate (``docs/estimators.md``). ``"spsa"``
            (reference): one perturbation of every adapted value for the whole batch, ZOA's one-sided SPSA.
            ``"per_sample"``: every image of pass B gets its own perturbation (a per-image affine), and each image's
            loss difference is attributed through the linearised batch statistics, giving ``B`` directions from the
            same two passes; ViT-style networks without BatchNorm only (BatchNorm couples the images in the forward
            pass). ``"first_order"``: the oracle, **not zeroth-order**: the exact gradient of the same loss by autograd
            (through straight-through quantizers) from a forward and a backward pass instead of pass B; a diagnostic
            ceiling that needs ``trainer.inference_mode: false``.
        perturbation: the perturbation distribution, ``"segmented_uniform"`` (``[-1, -½] ∪ [½, 1]``, the reference's)
            or ``"rademacher"`` (``±1``); default: segmented uniform for ``spsa``, Rademacher for ``per_sample``.
        normalize_step: divide the estimate by a running estimate of its own spread (an EMA of its root-mean-square,
            momentum ``normalize_momentum``), floored at ``normalize_floor``, before the SGD step: ``lr`` then bounds
            the typical per-coordinate step, so a large learning rate cannot blow up. Off in the reference.
        normalize_floor: the smallest spread the normalised step divides by.
        normalize_momentum: the momentum of the normalised step's running spread: 0.9 follows each domain's scale
            within about ten batches, 0.99 (about a hundred) keeps the ratio between hard and easy domains' steps.
        snr_step: the signal-scaled step (``per_sample`` only; ``docs/estimators.md``): scale the estimate's part of
            the epsilons' step by ``κ = clip(φ̄ / snr_reference, 0, 1)``, ``φ̄`` a running mean (momentum
            ``snr_momentum``, from 0) of the fraction of the estimate's squared norm that is signal, measured from the
            images' own estimates (``1 − Σ_i‖x_i‖² / ‖Σ_i x_i‖²``): a mostly-noise estimate makes small steps and
            weight decay pulls the epsilons back. Off in the reference.
        snr_reference: the signal fraction at and above which the signal-scaled step takes its full step.
        snr_momentum: the momentum of the signal-scaled step's running signal fraction.
        guard: the source guard (``docs/estimators.md``): on the first batch of every detected domain (and every
            ``guard_every`` batches) the perturbed pass runs with the source (pretrained) parameters instead, and if
            the adapted parameters' loss on the batch exceeds ``guard_ratio`` times theirs, the learned part is set
            aside for the domain (the effective parameters become the source ones; the bank's entries stay) and comes
            back at the next detected shift. Still two passes; that batch takes no step. Off in the reference.
        guard_every: also check every this many batches after the last check (``None``: only on detected shifts).
        guard_ratio: reject when the adapted parameters' loss exceeds ``guard_ratio`` times the source parameters'.
        tap_attribution: with the per-sample estimator, split each image's loss difference by loss tap and credit
            every epsilon only with the taps computed after its layer (unbiased, lower variance: docs/estimators.md).
            Ignored by the other estimators.
        pool_images: a batch with fewer images (all processes together) pools its loss statistics with the batches
            just before it up to this many images, its detector statistics join a chunk tested every
            ``detector_min_batch`` images, and its step is scaled to its share (``docs/small_batches.md``). A batch of
            this many or more, or a small one right after such a batch (a domain's short last batch), stands alone as
            in the reference.
        bn_prior: in a pooled small batch every BatchNorm mixes the batch's statistics with a running estimate of
            the layer's test statistics (started at its source statistics) at this prior strength ``N₀``:
            ``(N₀·estimate + n·batch) / (N₀ + n)`` (Schneider et al., NeurIPS 2020; the estimate as in RoTTA's
            robust BatchNorm, CVPR 2023); 0: the batch's statistics alone.
        max_consecutive_skips: stop with :class:`~zoa_lightning.core.zoa.AdaptationDiverged` after this many batches
            in a row were rolled back (a run that can no longer adapt must not exit looking fine). ``None``: never.
    """

    lr: float = 0.005
    lr_alpha: float = 0.01
    spsa_c: float = 0.01
    spsa_c_alpha: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.4
    weight_decay_alpha: float = 0.1
    sp_avg: int = 1
    steps: int = 1
    max_weight_nums: int = 32
    alpha_scale: float = 10.0
    weight_margin: float = 0.01
    alpha_clip: float = 10.0
    domain_t: float = 0.1
    lambda_bp: float = 30.0
    detector_min_batch: int = 64
    detector_momentum: float = 0.8
    shift_momentum: float = 0.9
    use_bank: bool = True
    use_shift: bool = True
    loss_on_shifted: bool = False
    mode: Literal["reference", "corrected"] = "reference"
    resnet_shift: Literal["scalar", "vector"] | None = None
    compact_similarity: bool | None = None
    detector_passes: Literal[1, 2] | None = None
    seed_detector_from_source: bool | None = None
    seed: int = 2020
    max_abs_epsilon: float | None = 10.0
    max_consecutive_skips: int | None = 10
    estimator: Literal["spsa", "per_sample", "first_order"] = "spsa"
    perturbation: Literal["segmented_uniform", "rademacher"] | None = None
    normalize_step: bool = False
    normalize_floor: float = 1e-3
    normalize_momentum: float = 0.9
    snr_step: bool = False
    snr_reference: float = 0.01
    snr_momentum: float = 0.95
    guard: bool = False
    guard_every: int | None = None
    guard_ratio: float = 3.0
    tap_attribution: bool = False
    pool_images: int = 64
    bn_prior: float = 16.0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.lr >= 0, f"lr must be >= 0, got {self.lr}"),
            (self.lr_alpha >= 0, f"lr_alpha must be >= 0, got {self.lr_alpha}"),
            (self.spsa_c > 0, f"spsa_c must be > 0, got {self.spsa_c}"),
            (self.spsa_c_alpha > 0, f"spsa_c_alpha must be > 0, got {self.spsa_c_alpha}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.weight_decay_alpha >= 0, f"weight_decay_alpha must be >= 0, got {self.weight_decay_alpha}"),
            (self.sp_avg >= 1, f"sp_avg must be >= 1, got {self.sp_avg}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.max_weight_nums >= 1, f"max_weight_nums must be >= 1, got {self.max_weight_nums}"),
            (self.alpha_scale > 0, f"alpha_scale must be > 0, got {self.alpha_scale}"),
            (self.weight_margin > 0, f"weight_margin must be > 0, got {self.weight_margin}"),
            (self.domain_t >= 0, f"domain_t must be >= 0, got {self.domain_t}"),
            (self.lambda_bp >= 0, f"lambda_bp must be >= 0, got {self.lambda_bp}"),
            (self.detector_min_batch >= 2, f"detector_min_batch must be >= 2, got {self.detector_min_batch}"),
            (0 <= self.detector_momentum < 1, f"detector_momentum must be in [0, 1), got {self.detector_momentum}"),
            (0 <= self.shift_momentum < 1, f"shift_momentum must be in [0, 1), got {self.shift_momentum}"),
            (self.mode in ("reference", "corrected"), f"mode must be 'reference' or 'corrected', got {self.mode!r}"),
            (
                self.resnet_shift in (None, "scalar", "vector"),
                f"resnet_shift must be 'scalar' or 'vector', got {self.resnet_shift!r}",
            ),
            (self.detector_passes in (None, 1, 2), f"detector_passes must be 1 or 2, got {self.detector_passes!r}"),
            (
                self.max_abs_epsilon is None or self.max_abs_epsilon > 0,
                f"max_abs_epsilon must be > 0 or None, got {self.max_abs_epsilon}",
            ),
            (
                self.max_consecutive_skips is None or self.max_consecutive_skips >= 1,
                f"max_consecutive_skips must be >= 1 or None, got {self.max_consecutive_skips}",
            ),
            (
                self.estimator in ("spsa", "per_sample", "first_order"),
                f"estimator must be 'spsa', 'per_sample' or 'first_order', got {self.estimator!r}",
            ),
            (
                self.perturbation in (None, "segmented_uniform", "rademacher"),
                f"perturbation must be 'segmented_uniform' or 'rademacher', got {self.perturbation!r}",
            ),
            (self.normalize_floor > 0, f"normalize_floor must be > 0, got {self.normalize_floor}"),
            (0 <= self.normalize_momentum < 1, f"normalize_momentum must be in [0, 1), got {self.normalize_momentum}"),
            (
                not self.snr_step or self.estimator == "per_sample",
                f"snr_step needs estimator='per_sample' (it reads the per-image estimates), got {self.estimator!r}",
            ),
            (self.snr_reference > 0, f"snr_reference must be > 0, got {self.snr_reference}"),
            (0 <= self.snr_momentum < 1, f"snr_momentum must be in [0, 1), got {self.snr_momentum}"),
            (
                self.guard_every is None or self.guard_every >= 1,
                f"guard_every must be >= 1 or None, got {self.guard_every}",
            ),
            (self.guard_ratio >= 1, f"guard_ratio must be >= 1, got {self.guard_ratio}"),
            (self.pool_images >= 2, f"pool_images must be >= 2, got {self.pool_images}"),
            (self.bn_prior >= 0, f"bn_prior must be >= 0, got {self.bn_prior}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def resolved(self, kind: Literal["vit", "cnn"]) -> ZOAConfig:
        """Return a copy with every ``None`` switch filled in from ``mode`` for a ``"vit"`` or ``"cnn"`` model."""
        reference = self.mode == "reference"
        return dataclasses.replace(
            self,
            resnet_shift=self.resnet_shift or ("scalar" if reference else "vector"),
            compact_similarity=(not reference) if self.compact_similarity is None else self.compact_similarity,
            detector_passes=self.detector_passes or (2 if reference else 1),
            perturbation=self.perturbation or ("rademacher" if self.estimator == "per_sample" else "segmented_uniform"),
            seed_detector_from_source=(
                (reference and kind == "cnn")
                if self.seed_detector_from_source is None
                else self.seed_detector_from_source
            ),
        )
