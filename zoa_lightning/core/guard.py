"""The source guard: per domain, the learned part of the norm parameters must not lose to the source parameters.

With ``config.guard`` on, on the first batch of every detected domain (and every ``guard_every`` batches in a domain)
the engine spends that batch's perturbed pass on a check instead of a gradient estimate: pass B runs with the
source (pretrained) values, so the two passes give ZOA's loss of the same images with the adapted values (``L_A``)
and with the source ones (``L_S``). If ``L_A > guard_ratio·L_S`` the learned part is rejected for this domain: it is
set aside and the epsilons are set so that the effective parameters are the source ones (the knowledge bank's
entries are kept); adaptation goes on from the source values, and at the next detected shift the set-aside part
comes back (what the rejected domain learned is in the bank's new entry). No extra forward pass, no gradient step on
the check's batch, and both losses come from statistics summed through ``reduce_fn``, so every process takes the
same decision (``docs/estimators.md``).
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
    parked: Tensor
    parked_active: Tensor

    def __init__(self, config: ZOAConfig, size: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        # the rejected learned part (effective minus source parameters), set aside until the next detected shift
        self.register_buffer("parked", torch.zeros(size, device=device))
        self.register_buffer("parked_active", torch.zeros((), dtype=torch.bool, device=device))
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
        """Reject the learned part for this domain if its loss exceeds ``guard_ratio·L_S``.

        A rejected part is set aside (:meth:`restore` brings it back) and the epsilons are set so that the effective
        parameters are the source ones.

        Returns:
            Whether the learned part was rejected.
        """
        if not bool(loss_adapted > self.config.guard_ratio * loss_source):
            return False
        if not bool(self.parked_active):  # still rejecting the part set aside earlier: keep that one
            self.parked.copy_(bank.current_delta())
            self.parked_active.fill_(True)
        k = bank.num_entries
        bank.theta.copy_(self.source_theta(bank, k, bank.alpha[:k]))
        self.resets.add_(1)
        return True

    def restore(self, bank: KnowledgeBank) -> None:
        """At a detected shift (after the bank stored the ending domain): bring back the part set aside, if any."""
        if not bool(self.parked_active):
            return
        k = bank.num_entries
        bank.theta.copy_(self.parked - bank.mixing_weights() @ bank.deltas[:k])
        self.parked_active.fill_(False)
