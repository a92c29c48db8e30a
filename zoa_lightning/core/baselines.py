"""Pure-torch baseline methods of the evaluation (spec §8): batch-statistics norms, T3A, FOA and Tent.

No Lightning import here; the LightningModules in :mod:`zoa_lightning.baselines` only wire these to the stream.

* :func:`use_batch_statistics`: ``bn_adapt``; every ``BatchNorm2d`` drops its running statistics and normalises with
  the statistics of the current batch. No parameter changes.
* :class:`T3A`: Test-Time Template Adjuster. A per-class support set of head-input features (the classifier's weight
  rows at start), filtered to the ``K`` lowest-entropy supports per pseudo-class, gives prototype logits. Stored in
  fixed-capacity buffers, so every ``state_dict`` shape is fixed at construction.
* :func:`prompt_forward` / :class:`FOA`: Forward-Optimization Adaptation of a timm ViT: learnable input prompt tokens
  searched by CMA-ES (the ``cma`` package) on a fitness made of feature-statistics discrepancy and prediction
  entropy, plus FOA's back-to-source activation shift (spec §4). No back-propagation.
* :class:`Tent`: first-order entropy minimisation of the norm layers' affine parameters (one SGD step per batch on the
  forward that also gives the prediction). The one method here that needs autograd.

Multi-process runs: :class:`FOA` reduces its fitness statistics through ``reduce_fn`` (as the ZOA engine does), so N
processes with the same seed adapt as one. :class:`T3A` and :class:`Tent` keep per-process state (support sets,
gradients); they are meant for one device.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
from collections.abc import Iterable
from typing import Any, NamedTuple

import cma
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.stats import ReduceFn, finish, moments, softmax_entropy

__all__ = [
    "FOA",
    "T3A",
    "PromptOutput",
    "Tent",
    "check_prompt_vit",
    "foa_fitness",
    "prompt_forward",
    "t3a_prototypes",
    "t3a_select",
    "use_batch_statistics",
]

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# ----------------------------------------------------------------------------------------------------------- bn_adapt
def use_batch_statistics(model: nn.Module) -> list[str]:
    """Make every ``nn.BatchNorm2d`` of ``model`` normalise with the current batch's statistics (``bn_adapt``).

    The running statistics are discarded (``track_running_stats=False``, ``running_mean = running_var = None``), so the
    layer uses batch statistics in train and in eval mode alike, and its ``state_dict`` no longer holds them. The
    affine parameters are untouched. LayerNorms are not affected: for a vision transformer this does nothing.

    Args:
        model: any network; modified in place.

    Returns:
        The qualified names of the converted layers (empty if the network has no ``BatchNorm2d``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> use_batch_statistics(net)
        ['1']
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------------- T3A
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


class T3A(nn.Module):
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
    counters: Tensor

    def __init__(self, model: nn.Module, filter_k: int = 20, *, head: str | None = None) -> None:
        super().__init__()
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
        model.eval()
        model.requires_grad_(False)
        self.model = model
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
        self.register_buffer("counters", torch.zeros(2, dtype=torch.long, device=rows.device))
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

    @property
    def batches(self) -> int:
        """Batches processed."""
        return int(self.counters[0])

    @property
    def forward_passes(self) -> int:
        """Network forward passes spent (one per batch)."""
        return int(self.counters[1])

    def forward(self, images: Tensor) -> Tensor:
        """Add the batch's features to the support set, then return the prototype logits ``z @ P`` of the batch."""
        with torch.no_grad():
            self._captured = None
            try:
                logits = self.model(images)
                features = self._captured
            finally:
                self._captured = None
            self.counters += 1
            if features is None:
                raise RuntimeError(f"the classifier {self.head_name!r} was not reached by the network's forward")
            features = features.flatten(1)
            self._add(features, logits)
            return features @ self.prototypes().to(features.dtype)


# ---------------------------------------------------------------------------------------------------------- prompts
class PromptOutput(NamedTuple):
    """What :func:`prompt_forward` returns."""

    features: Tensor
    """``(B, depth * width)``: ``blocks[i+1].norm1`` of block ``i``'s output CLS token for ``i < depth - 1``, then
    the head input (the final-norm CLS token): the loss features of spec §2.2."""
    head_input: Tensor
    """``(B, width)``: the classifier's input, the feature that the activation shift moves."""
    logits: Tensor
    """``(B, classes)``: the classifier's output on ``head_input``."""


def check_prompt_vit(model: nn.Module) -> None:
    """Check that ``model`` is a timm ``VisionTransformer`` that :func:`prompt_forward` can run.

    Raises:
        TypeError: for another architecture (a ResNet, say; FOA's convolutional input prompt, ``foa_resnet``, is not
            implemented).
        ValueError: for a ViT without a class token or with another pooling than ``"token"``.
    """
    needed = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head", "head", "embed_dim")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"FOA inserts prompt tokens into a timm VisionTransformer; {type(model).__name__} lacks {missing}. "
            "FOA's CNN variant (foa_resnet, a convolutional input prompt) is not implemented: use a ViT network"
        )
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
        raise ValueError(
            "FOA's features read the class token: build the VisionTransformer with class_token=True and "
            f"global_pool='token' (got global_pool={getattr(model, 'global_pool', None)!r})"
        )


def prompt_forward(model: nn.Module, images: Tensor, prompts: Tensor | None = None) -> PromptOutput:
    """Run a timm ``VisionTransformer`` with prompt tokens inserted after its prefix (CLS/register) tokens.

    The order follows timm's ``forward_features``: ``patch_embed`` → ``_pos_embed`` → ``patch_drop`` → **insert the
    prompts** (they get no position embedding) → ``norm_pre`` → blocks (one by one, collecting the CLS features) →
    ``norm`` → ``forward_head``. With ``prompts=None`` or zero prompt tokens this is the plain forward.

    Args:
        model: a timm ``VisionTransformer`` with class-token pooling (see :func:`check_prompt_vit`).
        images: ``(B, C, H, W)``.
        prompts: ``(P, width)`` prompt tokens, shared by every image; ``None`` for none.

    Returns:
        The per-block CLS features, the head input and the logits.
    """
    x = model._pos_embed(model.patch_embed(images))  # type: ignore[operator]
    x = model.patch_drop(x) if hasattr(model, "patch_drop") else x  # type: ignore[operator]
    if prompts is not None and prompts.numel():
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        tokens = prompts.to(x).reshape(1, -1, x.shape[-1]).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :prefix], tokens, x[:, prefix:]], dim=1)
    x = model.norm_pre(x)  # type: ignore[operator]
    blocks = list(model.blocks)  # type: ignore[arg-type]
    features = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i + 1 < len(blocks):
            features.append(blocks[i + 1].norm1(x[:, 0]))
    x = model.norm(x)  # type: ignore[operator]
    # A copy: the pooled view would pin the whole (B, N, C) token tensor for as long as the output is kept.
    head_input = model.forward_head(x, pre_logits=True).clone()  # type: ignore[operator]
    logits = model.head(head_input)  # type: ignore[operator]
    return PromptOutput(torch.cat([*features, head_input], dim=1), head_input, logits)


# ---------------------------------------------------------------------------------------------------------------- FOA
def _fitness_statistics(output: PromptOutput) -> Tensor:
    """Sufficient statistics of one candidate: feature sums, sums of squares, entropy sum, image count (float64)."""
    s1, s2 = moments(output.features, (0,))
    entropy = softmax_entropy(output.logits.float()).sum().double()
    return torch.cat([s1, s2, entropy.view(1), s1.new_tensor([output.features.shape[0]])])


def _fitness_from_statistics(
    stats: Tensor, src_mean: Tensor, src_std: Tensor, fitness_lambda: float, reference_batch: int
) -> tuple[Tensor, Tensor]:
    """Fitness and per-dimension batch means of ``(J, 2F + 2)`` candidate statistics; returns ``(J,)``, ``(J, F)``."""
    dim = src_mean.numel()
    n = stats[:, -1:]
    mean, var = finish(n, stats[:, :dim], stats[:, dim : 2 * dim])
    discrepancy = ((var.sqrt() - src_std.double()) ** 2).sum(1) + ((mean - src_mean.double()) ** 2).sum(1)
    fitness = fitness_lambda * discrepancy * n[:, 0] / reference_batch + stats[:, -2]
    return fitness, mean


def foa_fitness(
    features: Tensor,
    logits: Tensor,
    src_mean: Tensor,
    src_std: Tensor,
    fitness_lambda: float = 0.4,
    reference_batch: int = 64,
) -> Tensor:
    r"""FOA's fitness of one candidate (spec §8), to be minimised.

    :math:`\lambda\,(\sum_d(\hat\sigma_d-\sigma^{src}_d)^2+\sum_d(\hat\mu_d-\mu^{src}_d)^2)\cdot B/64+\sum_b H_b`, with
    unbiased batch standard deviations, **sums** (not means) over the feature dimensions and the batch, and the
    entropy :math:`H` of the unshifted logits.

    Args:
        features: ``(B, F)`` loss features (:attr:`PromptOutput.features`).
        logits: ``(B, classes)``.
        src_mean: ``(F,)`` source means.
        src_std: ``(F,)`` source (unbiased) standard deviations.
        fitness_lambda: weight of the discrepancy term (0.4).
        reference_batch: the batch size the discrepancy is scaled to (64).

    Returns:
        A float64 scalar.
    """
    stats = _fitness_statistics(PromptOutput(features, features[:, -1:], logits))[None]
    return _fitness_from_statistics(stats, src_mean, src_std, fitness_lambda, reference_batch)[0][0]


class FOA(nn.Module):
    """Forward-Optimization Adaptation of a timm ViT: prompt tokens searched by CMA-ES, plus activation shifting.

    Per batch (spec §8, reference behaviour): ask CMA-ES for ``popsize`` prompt sets and add the previous best (so
    ``popsize + 1`` forward passes), score each with :func:`foa_fitness` (the per-block CLS features computed **with**
    the prompts against source statistics computed **without** them), return the best candidate's logits with the
    back-to-source activation shift (``head(f + μ_src(final) - h)``, spec §4, from the second batch on), tell CMA-ES
    all candidates and their fitness, and update the EMA ``h`` (momentum ``shift_momentum``) with the mean over
    candidates of their batch means of the final feature. Continual: nothing is reset between domains; no class mask.

    CMA-ES: ``cma.CMAEvolutionStrategy`` with mean 0, ``sigma0``, population ``popsize``, sampling from a private
    ``numpy.random.RandomState(seed)`` (the reference seeds numpy's global generator with the same seed and samples from
    it, which gives the same stream; this one does not touch global state). The prompts initially counted as "previous
    best" are drawn uniformly in ``±sqrt(6 / (in_chans · patch_area + width))`` from ``torch.Generator(seed)``.

    State: the best prompts, source statistics, shift EMA and counters are buffers; the CMA-ES object (mean,
    covariance, evolution paths, its random generator) is pickled into the module's extra state as a ``uint8`` tensor,
    so ``state_dict``/``load_state_dict`` (and Lightning checkpoints) resume the search exactly. Its size grows with
    the square of ``num_prompts · width`` (about 0.75 MB for 192 dimensions; about 90 MB for ViT-B's 2,304). Loading
    unpickles that blob: load only checkpoints you trust.

    Args:
        model: a timm ``VisionTransformer`` with class-token pooling (modified: eval mode, no grad).
        num_prompts: prompt tokens inserted after the prefix tokens (3).
        popsize: CMA-ES population (27); each batch costs ``popsize + 1`` forward passes.
        sigma0: CMA-ES initial step size (1).
        fitness_lambda: weight of the discrepancy term (0.4).
        reference_batch: batch size the discrepancy term is scaled to (64).
        shift_momentum: EMA momentum of the running test mean ``h`` (0.9).
        use_shift: apply the activation shift to predictions.
        seed: seed of CMA-ES sampling and of the initial prompts (2020).
        reduce_fn: sums a float64 statistics tensor over processes (identity by default).

    Raises:
        TypeError, ValueError: for a network :func:`check_prompt_vit` rejects or an invalid hyperparameter.
    """

    best_prompts: Tensor
    src_mean: Tensor
    src_std: Tensor
    src_ready: Tensor
    hist: Tensor
    hist_ready: Tensor
    counters: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        num_prompts: int = 3,
        popsize: int = 27,
        sigma0: float = 1.0,
        fitness_lambda: float = 0.4,
        reference_batch: int = 64,
        shift_momentum: float = 0.9,
        use_shift: bool = True,
        seed: int = 2020,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        super().__init__()
        check_prompt_vit(model)
        checks = [
            (num_prompts >= 1, f"num_prompts must be >= 1, got {num_prompts}"),
            (popsize >= 2, f"popsize must be >= 2, got {popsize}"),
            (sigma0 > 0, f"sigma0 must be > 0, got {sigma0}"),
            (fitness_lambda >= 0, f"fitness_lambda must be >= 0, got {fitness_lambda}"),
            (reference_batch >= 1, f"reference_batch must be >= 1, got {reference_batch}"),
            (0 <= shift_momentum < 1, f"shift_momentum must be in [0, 1), got {shift_momentum}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.num_prompts, self.popsize, self.sigma0 = num_prompts, popsize, float(sigma0)
        self.fitness_lambda, self.reference_batch = float(fitness_lambda), reference_batch
        self.shift_momentum, self.use_shift, self.seed = float(shift_momentum), use_shift, seed
        self.reduce_fn: ReduceFn = reduce_fn if reduce_fn is not None else (lambda t: t)
        self.width = int(model.embed_dim)  # type: ignore[arg-type]
        depth = len(model.blocks)  # type: ignore[arg-type]
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        patch = tuple(int(p) for p in model.patch_embed.patch_size)  # type: ignore[union-attr]
        in_chans = int(getattr(getattr(model.patch_embed, "proj", None), "in_channels", 3))
        bound = math.sqrt(6.0 / (in_chans * math.prod(patch) + self.width))
        generator = torch.Generator().manual_seed(seed)
        initial = (torch.rand(num_prompts, self.width, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.register_buffer("best_prompts", initial.to(device=device, dtype=dtype))
        self.register_buffer("src_mean", torch.zeros(depth * self.width, device=device, dtype=dtype))
        self.register_buffer("src_std", torch.zeros(depth * self.width, device=device, dtype=dtype))
        self.register_buffer("src_ready", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("hist", torch.zeros(self.width, device=device, dtype=dtype))
        self.register_buffer("hist_ready", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("counters", torch.zeros(2, dtype=torch.long, device=device))
        self.es = self._new_strategy()
        self.last_fitness: list[float] = []

    def _new_strategy(self) -> cma.CMAEvolutionStrategy:
        options = {
            "popsize": self.popsize,
            "seed": np.nan,  # sampling uses the private generator below, never numpy's global one
            "randn": np.random.RandomState(self.seed).randn,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        return cma.CMAEvolutionStrategy(np.zeros(self.num_prompts * self.width), self.sigma0, inopts=options)

    # ------------------------------------------------------------------ state
    @property
    def batches(self) -> int:
        """Batches processed."""
        return int(self.counters[0])

    @property
    def forward_passes(self) -> int:
        """Network forward passes spent (``popsize + 1`` per batch)."""
        return int(self.counters[1])

    def get_extra_state(self) -> dict[str, Any]:
        """The pickled CMA-ES state as a ``uint8`` tensor (safe for ``weights_only`` loading as a container)."""
        blob = self.es.pickle_dumps()
        return {"cma": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the CMA-ES state saved by :meth:`get_extra_state` (unpickles it: trusted checkpoints only)."""
        self.es = pickle.loads(state["cma"].cpu().numpy().tobytes())

    # ------------------------------------------------------------------ source statistics
    def collect_source_statistics(self, loader: Iterable[Any], max_batches: int | None = None) -> None:
        """Per-dimension mean and unbiased std of the loss features on clean data, **without** prompts.

        Args:
            loader: yields image tensors, or tuples/lists whose first element is the image tensor.
            max_batches: use only the first ``max_batches`` batches.

        Raises:
            ValueError: if the loader yields no images.
        """
        total: Tensor | None = None
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0] if isinstance(batch, tuple | list) else batch
                features = prompt_forward(self.model, images.to(self.src_mean.device)).features
                s1, s2 = moments(features, (0,))
                vec = torch.cat([s1, s2, s1.new_tensor([features.shape[0]])])
                total = vec if total is None else total + vec
        if total is None:
            raise ValueError("collect_source_statistics got an empty loader: pass clean source images")
        total = self.reduce_fn(total)
        dim = self.src_mean.numel()
        mean, var = finish(total[-1], total[:dim], total[dim : 2 * dim])
        self.src_mean.copy_(mean)
        self.src_std.copy_(var.sqrt())
        self.src_ready.fill_(True)

    def shift_vector(self) -> Tensor | None:
        """``μ_src(final) - h`` (spec §4), or ``None`` before the first batch or with ``use_shift=False``."""
        if not self.use_shift or not bool(self.hist_ready):
            return None
        return self.src_mean[-self.width :] - self.hist

    # ------------------------------------------------------------------ adaptation
    def forward(self, images: Tensor) -> Tensor:
        """Evaluate ``popsize + 1`` prompt sets on ``images``, return the best one's (shifted) logits, update CMA-ES.

        Raises:
            ValueError: for a batch that is not ``(B, C, H, W)`` with ``B >= 2`` (the fitness needs a batch std).
            RuntimeError: before :meth:`collect_source_statistics`.
        """
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"FOA expects an image batch (B, C, H, W) with B >= 2, got shape {tuple(images.shape)}")
        if not bool(self.src_ready):
            raise RuntimeError("FOA has no source statistics: call collect_source_statistics(clean_loader) first")
        with torch.no_grad():
            shift = self.shift_vector()
            candidates = [*self.es.ask(), self.best_prompts.flatten().double().cpu().numpy()]
            stats, head_inputs, logits = [], [], []
            for candidate in candidates:
                prompts = torch.as_tensor(candidate, dtype=self.best_prompts.dtype, device=self.best_prompts.device)
                output = prompt_forward(self.model, images, prompts.view(self.num_prompts, self.width))
                stats.append(_fitness_statistics(output))
                head_inputs.append(output.head_input)
                logits.append(output.logits)
            self.counters[0] += 1
            self.counters[1] += len(candidates)
            fitness, means = _fitness_from_statistics(
                self.reduce_fn(torch.stack(stats)),
                self.src_mean,
                self.src_std,
                self.fitness_lambda,
                self.reference_batch,
            )
            fitness = torch.where(torch.isnan(fitness), torch.full_like(fitness, float("inf")), fitness)
            best = int(torch.argmin(fitness))  # the first minimum, as the reference's strict comparison
            self.last_fitness = fitness.tolist()
            self.es.tell(candidates, self.last_fitness)
            self.best_prompts.copy_(torch.as_tensor(candidates[best]).view_as(self.best_prompts))
            prediction = logits[best] if shift is None else self.model.head(head_inputs[best] + shift)  # type: ignore[operator]
            batch_mean = means[:, -self.width :].mean(0).to(self.hist.dtype)
            if bool(self.hist_ready):
                self.hist.mul_(self.shift_momentum).add_(batch_mean, alpha=1 - self.shift_momentum)
            else:
                self.hist.copy_(batch_mean)
                self.hist_ready.fill_(True)
            return prediction


# --------------------------------------------------------------------------------------------------------------- Tent
class Tent(nn.Module):
    """Tent: one gradient step of prediction-entropy minimisation on the norm layers' affine parameters per batch.

    Configuration: every ``BatchNorm2d`` uses batch statistics (:func:`use_batch_statistics`); the network stays in
    eval mode otherwise (so dropout and stochastic depth are off, unlike Tent's ``model.train()``, which only matters
    for BatchNorm here); all parameters are frozen except the ``weight``/``bias`` of every ``BatchNorm2d``,
    ``LayerNorm`` and ``GroupNorm``. Per batch: **one** forward with autograd, loss = mean softmax entropy, one
    backward, one SGD step; the logits of that forward (parameters from before the step) are the prediction. Unlike the
    zeroth-order methods, Tent keeps the activations of the forward for the backward pass (the memory contrast).

    Fake-quantized networks: gradients reach the norm parameters only through quantizers with a straight-through
    estimator. MQBench's fake quantizers (the CNN back-end) have one, so Tent adapts a quantized ResNet. The PTQ4ViT
    quantizers of :mod:`zoa_lightning.core.quant.vit` use a plain ``torch.round``, whose gradient is zero, and every
    LayerNorm of a ViT feeds a quantized linear input (``qkv``, ``fc1``, ``head``): all gradients are exactly zero and
    Tent leaves the network unchanged. Such steps are counted (:attr:`zero_gradient_steps`) and reported once with a
    warning.

    The optimizer state (momentum buffers) is part of the module's extra state, so ``state_dict`` resumes it.

    Args:
        model: the network (modified in place; its norm parameters are the adapted state).
        lr: SGD learning rate (default 0.001, FOA's setting for Tent on ViT-B at batch 64; Tent's own ImageNet
            ResNet-50 setting is 0.00025 at batch 64).
        momentum: SGD momentum (0.9).

    Raises:
        ValueError: for a negative ``lr``/``momentum`` or a network without affine norm layers.
    """

    counters: Tensor

    def __init__(self, model: nn.Module, lr: float = 0.001, momentum: float = 0.9) -> None:
        super().__init__()
        if lr < 0 or momentum < 0:
            raise ValueError(f"lr and momentum must be >= 0, got lr={lr}, momentum={momentum}")
        use_batch_statistics(model)
        model.eval()
        model.requires_grad_(False)
        self.param_names: list[str] = []
        params: list[nn.Parameter] = []
        for name, module in model.named_modules():
            if isinstance(module, _NORM_TYPES):
                for kind in ("weight", "bias"):
                    p = getattr(module, kind, None)
                    if isinstance(p, nn.Parameter):
                        p.requires_grad_(True)
                        params.append(p)
                        self.param_names.append(f"{name}.{kind}")
        if not params:
            raise ValueError(f"Tent adapts affine normalization layers; {type(model).__name__} has none")
        self.model = model
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        self.register_buffer("counters", torch.zeros(5, dtype=torch.long, device=params[0].device))
        self._warned = False

    @property
    def batches(self) -> int:
        """Batches processed."""
        return int(self.counters[0])

    @property
    def forward_passes(self) -> int:
        """Forward passes (one per batch)."""
        return int(self.counters[1])

    @property
    def backward_passes(self) -> int:
        """Backward passes (one per batch)."""
        return int(self.counters[2])

    @property
    def zero_gradient_steps(self) -> int:
        """Steps in which every adapted parameter got a zero gradient (quantizers without straight-through)."""
        return int(self.counters[3])

    @property
    def skipped_batches(self) -> int:
        """Batches whose loss was not finite (no step taken)."""
        return int(self.counters[4])

    def get_extra_state(self) -> dict[str, Any]:
        """The SGD state (momentum buffers and hyperparameters)."""
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the SGD state saved by :meth:`get_extra_state` (copied: nothing is shared with ``state``)."""
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def forward(self, images: Tensor) -> Tensor:
        """Predict ``images`` and take one entropy-minimisation step on the same forward; returns detached logits.

        Raises:
            RuntimeError: under ``torch.inference_mode()``, where no gradient can be computed.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Tent back-propagates and cannot run under torch.inference_mode(); run it outside")
        with torch.enable_grad():
            logits = self.model(images)
            loss = softmax_entropy(logits.float()).mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.counters[0] += 1
            self.counters[1] += 1
            if not bool(torch.isfinite(loss)):
                self.counters[4] += 1
                log.warning("Tent skipped batch %d: the entropy loss is not finite", self.batches)
                return logits.detach()
            loss.backward()
            self.counters[2] += 1
            grads = [p.grad for p in self.params if p.grad is not None]
            if not grads or not bool(torch.stack([g.ne(0).any() for g in grads]).any()):
                self.counters[3] += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "Tent got a zero gradient for all %d norm parameters: the network's fake quantizers have no "
                        "straight-through estimator (e.g. torch.round in the PTQ4ViT ViT quantizers), so Tent "
                        "leaves this network unchanged (see zoa_lightning.core.baselines.Tent)",
                        len(self.params),
                    )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()
