"""The source guard: the learned part of the norm parameters must beat the source parameters at ZOA's own loss.

With ``config.guard`` on, on the first batch of every detected domain (and every ``guard_every`` batches in a domain)
the engine spends that batch's perturbed pass on a check instead of a gradient estimate: pass B runs with the
source (pretrained) values, so the two passes give the loss of the same images with the adapted values (``L_A``) and
with the source ones (``L_S``). If ``L_A > guard_ratio·L_S`` the learned part is rejected: the epsilons are
set so that the effective parameters are the source ones again (the knowledge bank's entries are kept). No extra
forward pass, no gradient step on that batch, and both losses come from statistics summed through ``reduce_fn``, so
every process takes the same decision (``docs/estimators.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.config import ZOAConfig

__all__ = ["SourceGuard"]


class SourceGuard(nn.Module):
    """When to check the learned part against the source parameters, the decision, and its counts.

    Args:
        config: ``guard``, ``guard_every`` and ``guard_ratio``.
        device: where the buffers live.
    """

    since: Tensor
    checks: Tensor
    resets: Tensor

    def __init__(self, config: ZOAConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("since", torch.zeros((), dtype=torch.long, device=device))  # batches since a check
        self.register_buffer("checks", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("resets", torch.zeros((), dtype=torch.long, device=device))

    def due(self, detected: bool, bank: KnowledgeBank) -> bool:
        """Whether this batch is a check: a detected shift or ``guard_every`` batches since the last check.

        Counts the batch; a batch whose effective parameters are the source ones (nothing learned) is never a check.
        """
        cfg = self.config
        if not cfg.guard:
            return False
        self.since.add_(1)
        periodic = cfg.guard_every is not None and int(self.since) > cfg.guard_every
        if not (detected or periodic) or not bool(bank.current_delta().ne(0).any()):
            return False
        self.since.zero_()
        self.checks.add_(1)
        return True

    @staticmethod
    def source_theta(bank: KnowledgeBank, entries: int, alpha: Tensor) -> Tensor:
        """The epsilons that give the source parameters with mixing logits ``alpha`` over the first ``entries``."""
        return -(bank.mixing_weights(alpha) @ bank.deltas[:entries])

    def decide(self, bank: KnowledgeBank, loss_adapted: Tensor, loss_source: Tensor) -> bool:
        """Reject the learned part (epsilons reset to the source parameters) if its loss exceeds ``guard_ratio·L_S``.

        Returns:
            Whether the learned part was rejected.
        """
        if not bool(loss_adapted > self.config.guard_ratio * loss_source):
            return False
        k = bank.num_entries
        bank.theta.copy_(self.source_theta(bank, k, bank.alpha[:k]))
        self.resets.add_(1)
        return True
