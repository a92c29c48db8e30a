"""FOA: the prompted ViT forward, the fitness, the CMA-ES search's pass count and its checkpointed state."""

from __future__ import annotations

import io

import pytest
import torch

from tests.helpers import images, make_resnet, make_vit
from zoa_lightning.core.methods.foa import FOA, foa_fitness, prompt_forward


def test_prompt_forward_without_prompts_is_the_plain_forward() -> None:
    net = make_vit(0)
    x = images()
    with torch.no_grad():
        plain = net(x)
        for prompts in (None, torch.zeros(0, net.embed_dim)):
            out = prompt_forward(net, x, prompts)
            torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-6)
            torch.testing.assert_close(out.head_input, out.features[:, -net.embed_dim :])
        assert out.features.shape == (8, len(net.blocks) * net.embed_dim)


def test_prompt_forward_features_match_the_zoa_taps_and_prompts_change_them() -> None:
    net = make_vit(0)
    x = images()
    taps: list[torch.Tensor] = []
    hooks = [net.blocks[i].norm1.register_forward_hook(lambda m, a, o: taps.append(o[:, 0])) for i in range(1, 3)]
    with torch.no_grad():
        net(x)  # the ZOA engine's taps: blocks[i].norm1 over all tokens, CLS token taken
        for h in hooks:
            h.remove()
        out = prompt_forward(net, x)
        torch.testing.assert_close(out.features[:, : 2 * net.embed_dim], torch.cat(taps, 1))
        prompted = prompt_forward(net, x, 0.5 * torch.randn(3, net.embed_dim))
    assert prompted.logits.shape == out.logits.shape
    assert not torch.allclose(prompted.logits, out.logits)


# ----------------------------------------------------------------------------------------------------------- FOA
def test_foa_fitness_hand_example() -> None:
    features = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4), unbiased std (sqrt 2, sqrt 8)
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # entropy ln 2 each
    src_mean, src_std = torch.tensor([1.0, 4.0]), torch.tensor([1.0, 2.0])
    discrepancy = (2**0.5 - 1) ** 2 + (8**0.5 - 2) ** 2 + 1.0 + 0.0
    want = 0.4 * discrepancy * 2 / 64 + 2 * torch.log(torch.tensor(2.0)).item()
    assert float(foa_fitness(features, logits, src_mean, src_std)) == pytest.approx(want, rel=1e-6)
    assert float(foa_fitness(features, logits, src_mean, src_std, 1.0, 2)) == pytest.approx(
        discrepancy + 2 * torch.log(torch.tensor(2.0)).item(), rel=1e-6
    )


def _foa(popsize: int = 4, **kwargs: object) -> FOA:
    foa = FOA(make_vit(0), popsize=popsize, **kwargs)  # type: ignore[arg-type]
    foa.collect_source_statistics([images(16, 10), images(16, 11)])
    return foa


def test_foa_spends_popsize_plus_one_passes_and_shifts_from_the_second_batch() -> None:
    foa = _foa(popsize=27)
    x = images(8, 3)
    assert foa.shift_vector() is None
    out = foa(x)
    assert out.shape == (8, 10)
    assert foa.forward_passes == 28
    assert foa.batches == 1
    assert len(foa.last_fitness) == 28
    best = min(range(28), key=lambda j: foa.last_fitness[j])
    # the first batch has no shift: the prediction is the best candidate's plain prompted forward
    with torch.no_grad():
        again = prompt_forward(foa.model, x, foa.best_prompts)
    torch.testing.assert_close(out, again.logits)
    assert best == min(range(28), key=foa.last_fitness.__getitem__)
    assert foa.shift_vector() is not None
    foa(images(8, 4))
    assert foa.forward_passes == 56


def test_foa_state_dict_resumes_cma_exactly() -> None:
    full = _foa()
    first, second = images(8, 5), images(8, 6)
    full(first)
    buffer = io.BytesIO()
    torch.save(full.state_dict(), buffer)
    want = full(second)
    buffer.seek(0)
    resumed = FOA(make_vit(0), popsize=4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(resumed(second), want, rtol=0, atol=0)
    assert resumed.forward_passes == full.forward_passes == 10


def test_foa_rejects_a_cnn_and_needs_source_statistics() -> None:
    with pytest.raises(TypeError, match="foa_resnet"):
        FOA(make_resnet(0))
    foa = FOA(make_vit(0), popsize=2)
    with pytest.raises(RuntimeError, match="source statistics"):
        foa(images(4))
