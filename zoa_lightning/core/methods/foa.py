"""FOA, Forward-Optimization Adaptation of a timm ViT (spec §8): prompt tokens searched by CMA-ES, activation shift.

* :func:`prompt_forward`: a ViT forward with learnable input prompt tokens after the class token.
* :func:`foa_fitness`: FOA's fitness (feature-statistics discrepancy and prediction entropy), to be minimised.
* :class:`FOA`: the adapter; CMA-ES (the ``cma`` package) over the prompts, no back-propagation, plus FOA's
  back-to-source activation shift (spec §4). Its fitness statistics go through ``reduce_fn`` (as the ZOA engine's
  do), so N processes with the same seed adapt as one.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable
from typing import Any, NamedTuple

import cma
import numpy as np
import torch
from torch import Tensor, nn

from zoa_lightning.core.layout import refuse_distilled_vit
from zoa_lightning.core.methods.base import Adapter
from zoa_lightning.core.shift import ActivationShift
from zoa_lightning.core.source import SourceStatistics
from zoa_lightning.core.stats import ReduceFn, finish, moments, softmax_entropy

__all__ = ["FOA", "PromptOutput", "check_prompt_vit", "foa_fitness", "prompt_forward"]


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
    refuse_distilled_vit(model, "FOA")
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


class FOA(Adapter):
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
        super().__init__(model)
        model.requires_grad_(False)
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
        self.source = SourceStatistics(depth * self.width, device, dtype)
        self.shift = ActivationShift(self.width, self.shift_momentum, device, dtype)
        self.es = self._new_strategy()
        self.last_fitness: list[float] = []

    @property
    def passes_per_batch(self) -> int:
        """``popsize`` candidates plus the previous best."""
        return self.popsize + 1

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

        def features(images: Tensor) -> Tensor:
            return prompt_forward(self.model, images.to(self.source.mean.device)).features

        self.source.collect(loader, features, self.reduce_fn, max_batches)

    def shift_vector(self) -> Tensor | None:
        """``μ_src(final) - h`` (spec §4), or ``None`` before the first batch or with ``use_shift=False``."""
        return self.shift.vector(self.source.final(self.width)) if self.use_shift else None

    # ------------------------------------------------------------------ adaptation
    def forward(self, images: Tensor) -> Tensor:
        """Evaluate ``popsize + 1`` prompt sets on ``images``, return the best one's (shifted) logits, update CMA-ES.

        Raises:
            ValueError: for a batch that is not ``(B, C, H, W)`` with ``B >= 2`` (the fitness needs a batch std).
            RuntimeError: before :meth:`collect_source_statistics`.
        """
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"FOA expects an image batch (B, C, H, W) with B >= 2, got shape {tuple(images.shape)}")
        if not bool(self.source.ready):
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
            self.counters.add("batches")
            self.counters.add("forward_passes", len(candidates))
            fitness, means = _fitness_from_statistics(
                self.reduce_fn(torch.stack(stats)),
                self.source.mean,
                self.source.std,
                self.fitness_lambda,
                self.reference_batch,
            )
            fitness = torch.where(torch.isnan(fitness), torch.full_like(fitness, float("inf")), fitness)
            best = int(torch.argmin(fitness))  # the first minimum, as the reference's strict comparison
            self.last_fitness = fitness.tolist()
            self.es.tell(candidates, self.last_fitness)
            self.best_prompts.copy_(torch.as_tensor(candidates[best]).view_as(self.best_prompts))
            prediction = logits[best] if shift is None else self.model.head(head_inputs[best] + shift)  # type: ignore[operator]
            self.shift.update(means[:, -self.width :].mean(0).to(self.shift.mean.dtype))
            return prediction
