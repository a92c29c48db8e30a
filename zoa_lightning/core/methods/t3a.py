"""T3A, the Test-Time Template Adjuster (spec §8): prototype logits from filtered, pseudo-labelled test features.

* :func:`t3a_select`: merge new features into a fixed-capacity per-class support store (the ``K`` lowest-entropy).
* :func:`t3a_prototypes`: the prototype matrix of a support store.
* :class:`T3A`: the adapter; the support set lives in fixed-size buffers, so every ``state_dict`` shape is fixed at
  construction. Per-process state: meant for one device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.methods.base import Adapter
from zoa_lightning.core.stats import softmax_entropy

__all__ = ["T3A", "t3a_prototypes", "t3a_select"]


def t3a_select(
    supports: Tensor, entropy: Tensor, features: Tensor, labels: Tensor, feature_entropy: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge new features into a per-class support store, keeping per class the ``K`` lowest-entropy supports.

    The store has one row of ``K`` slots per class; an empty slot has entropy ``+inf`` (and a zero feature). A new
    feature competes only in the row of its pseudo-label. Ties keep stored supports before new ones and earlier before
    later (stable sort). Non-finite entropies never take a slot from a finite one and mark the slot empty.

    Args:
        supports: stored features ``(C, K, D)``.
        entropy: their entropies ``(C, K)`` (``inf`` = empty slot).
        features: new features ``(B, D)``.
        labels: their pseudo-labels ``(B,)`` in ``[0, C)``.
        feature_entropy: their entropies ``(B,)``.

    Returns:
        The new ``(supports, entropy)``, same shapes as the inputs.

    Example:
        >>> s, e = torch.zeros(2, 1, 1), torch.full((2, 1), float("inf"))
        >>> s, e = t3a_select(s, e, torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 0, 1]),
        ...                   torch.tensor([0.5, 0.25, 0.75]))
        >>> s.flatten().tolist(), e.flatten().tolist()
        ([2.0, 3.0], [0.25, 0.75])
    """
    classes, k, dim = supports.shape
    batch = features.shape[0]
    device = supports.device
    inf = torch.tensor(float("inf"), dtype=entropy.dtype, device=device)
    old = torch.arange(classes * k, device=device).view(classes, k)
    new = (classes * k + torch.arange(batch, device=device)).expand(classes, batch)
    index = torch.cat([old, new], dim=1)  # (C, K + B) positions in the pool
    pool_entropy = torch.cat([entropy.reshape(-1), feature_entropy.to(entropy.dtype)])
    candidate = pool_entropy[index]
    member = labels.to(device)[None, :] == torch.arange(classes, device=device)[:, None]
    candidate[:, k:] = torch.where(member, candidate[:, k:], inf)
    candidate = torch.where(torch.isnan(candidate), inf, candidate)
    order = candidate.argsort(dim=1, stable=True)[:, :k]
    kept_entropy = candidate.gather(1, order)
    pool = torch.cat([supports.reshape(classes * k, dim), features.to(supports.dtype)])
    kept = pool[index.gather(1, order)]
    valid = torch.isfinite(kept_entropy)
    return kept.masked_fill(~valid[..., None], 0), torch.where(valid, kept_entropy, inf)


def t3a_prototypes(supports: Tensor, entropy: Tensor) -> Tensor:
    """T3A's prototype matrix ``normalize_col(normalize_row(S)ᵀ Y)`` from a per-class support store.

    Row ``c`` of the store holds the supports whose one-hot pseudo-label ``Y`` is ``c``, so ``normalize_row(S)ᵀ Y``
    has column ``c`` equal to the sum of the L2-normalised supports of class ``c``; each column is then L2-normalised.
    A class without supports gets a zero column.

    Args:
        supports: ``(C, K, D)`` support features (not necessarily normalised).
        entropy: ``(C, K)``; a non-finite entry marks an empty slot.

    Returns:
        ``(D, C)``; the logits of features ``z`` are ``z @ prototypes``.
    """
    valid = torch.isfinite(entropy).to(supports.dtype)
    summed = (F.normalize(supports, dim=2) * valid[..., None]).sum(1)  # (C, D)
    return F.normalize(summed, dim=1).T


class T3A(Adapter):
    """Test-Time Template Adjuster on a classifier whose head input is its feature (spec §8).

    The network runs as it is (call :func:`use_batch_statistics` first for the ``bn_adapt`` configuration); a forward
    pre-hook on the head captures the feature ``z`` (the head input), and the head, quantized or not, is the
    classifier ``C``. The support set starts from the head's weight rows (pseudo-label ``argmax C(w_c)``, score the
    entropy of ``softmax(C(w_c))``). Each batch appends its features with their pseudo-labels and entropies, keeps per
    class the ``filter_k`` lowest-entropy supports (:func:`t3a_select`) and returns ``z @ P`` with the prototypes of
    :func:`t3a_prototypes`. The support set is never reset. One forward pass per batch.

    Storage is a fixed ``(C, filter_k, D)`` buffer (``inf`` entropy marks an empty slot), so ``state_dict`` shapes never
    change and a checkpoint restores the support set exactly.

    Args:
        model: the classifier (modified: eval mode, no grad).
        filter_k: supports kept per pseudo-class (``K``; 20 in the spec).
        head: qualified name of the classifier module; default the head of
            :func:`~zoa_lightning.core.layout.resolve_layout`.

    Raises:
        ValueError: if ``filter_k < 1``.
        TypeError: if the head has no 2-D weight to initialise the supports from.

    Example:
        >>> import timm
        >>> t3a = T3A(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8), filter_k=5)
        >>> t3a(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    supports: Tensor
    support_entropy: Tensor

    def __init__(self, model: nn.Module, filter_k: int = 20, *, head: str | None = None) -> None:
        super().__init__(model)
        if isinstance(filter_k, bool) or not isinstance(filter_k, int) or filter_k < 1:
            raise ValueError(f"filter_k must be an integer >= 1, got {filter_k!r}")
        self.head_name = head if head is not None else resolve_layout(model).head
        classifier = model.get_submodule(self.head_name)
        weight = getattr(classifier, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise TypeError(
                f"T3A initialises its supports from the classifier's weight rows, but {self.head_name!r} "
                f"({type(classifier).__name__}) has no 2-D weight"
            )
        model.requires_grad_(False)
        self.filter_k = filter_k
        self._captured: Tensor | None = None
        self._handle = classifier.register_forward_pre_hook(self._head_hook)
        with torch.no_grad():
            rows = weight.detach()
            logits = classifier(rows)
        self._captured = None
        classes, dim = int(logits.shape[1]), int(rows.shape[1])
        self.num_classes = classes
        self.register_buffer("supports", rows.new_zeros(classes, filter_k, dim))
        self.register_buffer("support_entropy", rows.new_full((classes, filter_k), float("inf")))
        self._add(rows, logits)

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured = args[0]

    def _add(self, features: Tensor, logits: Tensor) -> None:
        supports, entropy = t3a_select(
            self.supports,
            self.support_entropy,
            features.detach(),
            logits.argmax(1),
            softmax_entropy(logits.detach().float()),
        )
        self.supports.copy_(supports)
        self.support_entropy.copy_(entropy)

    def prototypes(self) -> Tensor:
        """The current prototype matrix ``(D, C)``."""
        return t3a_prototypes(self.supports, self.support_entropy)

    def support_counts(self) -> Tensor:
        """Number of supports held per class ``(C,)``."""
        return torch.isfinite(self.support_entropy).sum(1)

    def run_info(self) -> dict[str, Any]:
        """``{"supports": <supports held>}`` for the run's summary."""
        return {"supports": int(self.support_counts().sum())}

    def forward(self, images: Tensor) -> Tensor:
        """Add the batch's features to the support set, then return the prototype logits ``z @ P`` of the batch."""
        with torch.no_grad():
            self._captured = None
            try:
                logits = self.model(images)
                features = self._captured
            finally:
                self._captured = None
            self.counters.add("batches")
            self.counters.add("forward_passes")
            if features is None:
                raise RuntimeError(f"the classifier {self.head_name!r} was not reached by the network's forward")
            features = features.flatten(1)
            self._add(features, logits)
            return features @ self.prototypes().to(features.dtype)
