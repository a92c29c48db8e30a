"""``foa``: FOA (ICML 2024) on a ViT, CMA-ES over input prompts plus the activation shift (spec §8)."""

from __future__ import annotations

import inspect

from torch import nn
from typing_extensions import override

from zoa_lightning.core.methods.foa import FOA, check_prompt_vit
from zoa_lightning.methods.base import StreamModule

__all__ = ["FOAModule"]

# FOA's hyperparameters are written once, in the adapter's signature; the module takes its defaults from there.
_FOA = {n: p.default for n, p in inspect.signature(FOA.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}


class FOAModule(StreamModule):
    """FOA (forward-optimization adaptation, ICML 2024) of a ViT: CMA-ES over input prompts, plus activation shifting.

    Setup wraps the network in :class:`~zoa_lightning.core.methods.foa.FOA` and computes the source statistics of its
    per-block CLS features **without** prompts from the data module's ``source_dataloader()``. Each batch evaluates
    ``popsize`` CMA-ES candidates plus the previous best (``popsize + 1`` = 28 forward passes), predicts with the best
    candidate's activation-shifted logits and tells CMA-ES all candidates. Continual: no reset between domains; no
    class mask.

    Vision transformers only (timm ``VisionTransformer`` with a class token): a CNN raises ``TypeError`` at
    construction (FOA's convolutional-prompt variant ``foa_resnet`` is not implemented).

    Checkpoints: the CMA-ES state is pickled into the adapter's extra state (a ``uint8`` tensor in the
    ``state_dict``), so a stream checkpoint resumes the search exactly; it holds a few covariance-sized matrices
    (``(num_prompts · width)²`` floats each; about 90 MB for ViT-B). Loading unpickles it: load only checkpoints you
    trust.

    Args:
        num_prompts: prompt tokens inserted after the class token (3).
        popsize: CMA-ES population (27); a batch costs ``popsize + 1`` forward passes.
        sigma0: CMA-ES initial step size (1).
        fitness_lambda: weight of the feature-statistics discrepancy in the fitness (0.4).
        reference_batch: batch size the discrepancy is scaled to (64).
        use_shift: apply the back-to-source activation shift to predictions.
        seed: seed of the CMA-ES sampling and the initial prompts.
        source_batches: clean batches used for source statistics (``None``: the whole source loader).
        compile_blocks: ``torch.compile`` each transformer block in place (``nn.Module.compile``, static shapes)
            before the stream. The 28 forward passes per batch dominate FOA's cost; on a 2-core CPU the fake-quantised
            demo ViT's forward runs about 2× faster compiled. The first batch pays the compilation (about 30 s on
            that CPU), a CPU needs a C++ compiler, and the numbers equal the eager ones up to float rounding (which
            can move a value across a quantisation step). State-dict keys are unchanged.
    """

    method_name = "foa"
    reported_hparams = ("popsize", "num_prompts", "compile_blocks")

    def __init__(
        self,
        network: str | nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        num_prompts: int = _FOA["num_prompts"],
        popsize: int = _FOA["popsize"],
        sigma0: float = _FOA["sigma0"],
        fitness_lambda: float = _FOA["fitness_lambda"],
        reference_batch: int = _FOA["reference_batch"],
        use_shift: bool = _FOA["use_shift"],
        seed: int = _FOA["seed"],
        source_batches: int | None = None,
        compile_blocks: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(network, weights, num_classes, name)
        check_prompt_vit(self.get_network())

    @override
    def build_adapter(self, network: nn.Module) -> FOA:
        h = self.hparams
        settings = {name: h[name] for name in _FOA if name in h}  # every FOA hyperparameter the module takes
        adapter = FOA(network, **settings, reduce_fn=self.reduce_sum)
        if h["compile_blocks"]:
            for block in network.blocks:  # type: ignore[union-attr]
                block.compile(dynamic=False)
        return adapter
