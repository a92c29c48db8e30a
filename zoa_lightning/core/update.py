"""ZOA's parameter update (spec §3.3): SGD on the epsilons, a first AdamW step on the mixing logits, and its bounds.

Optionally (``normalize_step``, not in the reference) the epsilons' estimate is divided by a running estimate of its
own spread first, so that ``lr`` bounds the typical step whatever the scale of the loss differences.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.config import ZOAConfig
from zoa_lightning.core.spsa import adamw_first_step_, sgd_step_

__all__ = ["ZOAUpdate"]


class ZOAUpdate(nn.Module):
    """Applies gradient estimates to a bank's epsilons and mixing logits, with the optional SGD momentum buffer.

    Args:
        config: the learning rates, decays, momentum and ``max_abs_epsilon``.
        size: the number of epsilons.
        device: where the momentum buffer lives.
    """

    momentum_buffer: Tensor
    momentum_ready: Tensor
    spread: Tensor
    spread_ready: Tensor
    signal: Tensor

    def __init__(self, config: ZOAConfig, size: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("momentum_buffer", torch.zeros(size if config.momentum else 0, device=device))
        self.register_buffer("momentum_ready", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("spread", torch.zeros((), device=device))  # normalize_step's running RMS of the estimate
        self.register_buffer("spread_ready", torch.zeros((), dtype=torch.bool, device=device))
        # snr_step's running signal fraction of the epsilons' estimate (float64: a sum of ratios, equal on all ranks)
        self.register_buffer("signal", torch.zeros((), dtype=torch.float64, device=device))
        self.gain = 1.0  # the last step's signal gain (diagnostics; 1 without snr_step)

    def signal_gain(self, grad: Tensor, power: Tensor) -> float:
        """The signal-scaled step's gain ``κ = clip(φ̄ / snr_reference, 0, 1)`` after this estimate (updates ``φ̄``).

        ``φ_b = 1 − N/‖ĝ‖²`` is the fraction of the estimate's squared norm that is signal (``N``: the images' own
        estimates' summed squared norms, :func:`~zoa_lightning.core.estimators.sample_power`), clipped to
        ``[-1, 1]``; ``φ̄`` its running mean (momentum ``snr_momentum``, starting at 0).
        """
        cfg = self.config
        total = grad.double().pow(2).sum()
        fraction = (1 - power.to(total) / total).clamp(-1.0, 1.0) if bool(total > 0) else total.new_zeros(())
        self.signal.mul_(cfg.snr_momentum).add_(fraction, alpha=1 - cfg.snr_momentum)
        return float((self.signal / cfg.snr_reference).clamp(0.0, 1.0))

    def normalized(self, grad: Tensor) -> Tensor:
        """``grad / max(s, floor)``, ``s`` an EMA (``normalize_momentum``) of the estimates' RMS, this one included."""
        rms = grad.pow(2).mean().sqrt().to(self.spread.dtype)
        if bool(self.spread_ready):
            beta = self.config.normalize_momentum
            self.spread.mul_(beta).add_(rms, alpha=1 - beta)
        else:
            self.spread.copy_(rms)
            self.spread_ready.fill_(True)
        return grad / self.spread.clamp_min(self.config.normalize_floor).to(grad.dtype)

    def step(
        self,
        bank: KnowledgeBank,
        entries: int,
        grad_alpha: Tensor,
        grad_theta: Tensor,
        share: float = 1.0,
        power: Tensor | None = None,
    ) -> str | None:
        """Update ``bank.theta`` and the first ``entries`` mixing logits in place.

        ``share`` (a pooled small batch's ``n / N``, ``docs/small_batches.md``) scales both learning rates and divides
        the epsilons' estimate: the loss-gradient part of the step keeps its size, weight decay and the logits' step
        shrink to the batch's share. With ``snr_step``, ``power`` is the estimate's per-image power ``N`` and the
        estimate's part of the step (not the weight decay) is scaled by :meth:`signal_gain`.

        Returns:
            ``None``, or why the batch must be rolled back (a non-finite value, an epsilon beyond the bound).
        """
        cfg = self.config
        if not bool(torch.isfinite(grad_theta).all()) or not bool(torch.isfinite(grad_alpha).all()):
            return "gradient estimate is not finite"
        if cfg.snr_step:
            if power is None:
                raise ValueError("snr_step needs the estimate's per-image power (the per_sample estimator gives it)")
            self.gain = self.signal_gain(grad_theta, power)
        lr, lr_alpha = cfg.lr, cfg.lr_alpha
        if share != 1.0:
            grad_theta, lr, lr_alpha = grad_theta / share, lr * share, lr_alpha * share
        if cfg.normalize_step:
            grad_theta = self.normalized(grad_theta)
        if cfg.snr_step:
            grad_theta = grad_theta * self.gain
        momentum = self.momentum_buffer if cfg.momentum else None
        sgd_step_(bank.theta, grad_theta, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                  momentum_buffer=momentum, first_step=not bool(self.momentum_ready))  # fmt: skip
        self.momentum_ready.fill_(bool(cfg.momentum))
        if entries > 1:  # the logits move only once there is stored knowledge
            alpha = bank.alpha[:entries]
            adamw_first_step_(alpha, grad_alpha, lr=lr_alpha, weight_decay=cfg.weight_decay_alpha)
        if not bool(torch.isfinite(bank.theta).all()) or not bool(torch.isfinite(bank.alpha[:entries]).all()):
            return "updated parameter is not finite"
        largest = float(bank.theta.abs().max())
        if cfg.max_abs_epsilon is not None and largest > cfg.max_abs_epsilon:
            return f"update would move an epsilon to |{largest:.3g}| > max_abs_epsilon"
        return None
