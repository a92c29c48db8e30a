"""The pure-torch baselines: bn_adapt, T3A support filter and prototypes, prompt ViT forward, FOA fitness, Tent."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_resnet, make_vit
from zoa_lightning.core import softmax_entropy
from zoa_lightning.core.baselines import (
    FOA,
    T3A,
    Tent,
    foa_fitness,
    prompt_forward,
    t3a_prototypes,
    t3a_select,
    use_batch_statistics,
)

INF = float("inf")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (3-4x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ bn_adapt
def test_use_batch_statistics_converts_every_batchnorm_and_only_those() -> None:
    net = make_resnet(0)
    x = _images()
    expected = net.train()(x)  # train mode: batch statistics (and running-stat updates we do not care about)
    net = make_resnet(0).eval()
    names = use_batch_statistics(net)
    assert len(names) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0
    assert not any("running_mean" in k for k in net.state_dict())
    torch.testing.assert_close(net(x), expected)
    assert use_batch_statistics(make_vit(0)) == []


# ----------------------------------------------------------------------------------------------------------- T3A
def test_t3a_select_keeps_at_most_k_lowest_entropy_per_class() -> None:
    g = torch.Generator().manual_seed(0)
    classes, k, dim = 4, 3, 5
    supports = torch.zeros(classes, k, dim)
    entropy = torch.full((classes, k), INF)
    seen: list[tuple[int, float, torch.Tensor]] = []
    for _ in range(4):
        feats = torch.randn(7, dim, generator=g)
        labels = torch.randint(0, classes - 1, (7,), generator=g)  # the last class never gets a support
        ent = torch.rand(7, generator=g)
        supports, entropy = t3a_select(supports, entropy, feats, labels, ent)
        seen += [(int(c), float(e), f) for c, e, f in zip(labels, ent, feats, strict=True)]
        for c in range(classes):
            want = sorted(e for cc, e, _ in seen if cc == c)[:k]
            got = sorted(entropy[c][torch.isfinite(entropy[c])].tolist())
            assert got == pytest.approx(want)
            for e, f in zip(entropy[c].tolist(), supports[c], strict=True):
                match = [ff for cc, ee, ff in seen if cc == c and ee == e]
                assert torch.equal(f, match[0] if e != INF else torch.zeros(dim))
    assert torch.isinf(entropy[classes - 1]).all()


def test_t3a_select_ignores_nan_entropy() -> None:
    supports, entropy = t3a_select(
        torch.zeros(1, 2, 1),
        torch.full((1, 2), INF),
        torch.ones(2, 1),
        torch.zeros(2, dtype=torch.long),
        torch.tensor([float("nan"), 0.25]),
    )
    assert entropy.tolist() == [[0.25, INF]]
    assert supports.flatten().tolist() == [1.0, 0.0]


def test_t3a_prototypes_hand_example() -> None:
    # class 0: supports (3, 4) and (2, 0) -> normalised (0.6, 0.8) + (1, 0) = (1.6, 0.8) -> (2, 1) / sqrt(5)
    # class 1: one support (0, -5) -> (0, -1); the empty slot is ignored; class 2: no support -> zero column
    supports = torch.tensor([[[3.0, 4.0], [2.0, 0.0]], [[0.0, -5.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    entropy = torch.tensor([[0.1, 0.2], [0.3, INF], [INF, INF]])
    p = t3a_prototypes(supports, entropy)
    s5 = 5**0.5
    expected = torch.tensor([[2 / s5, 0.0, 0.0], [1 / s5, -1.0, 0.0]])
    torch.testing.assert_close(p, expected)
    # the general formula normalize_col(normalize_row(S)^T Y) over the flat list gives the same matrix
    flat = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, -5.0]])
    y = F.one_hot(torch.tensor([0, 0, 1]), 3).float()
    torch.testing.assert_close(p, F.normalize(F.normalize(flat, dim=1).T @ y, dim=0))


class _ReferenceT3A:
    """The published algorithm with growing tensors (no slots), written from the specification."""

    def __init__(self, head: nn.Module, k: int) -> None:
        self.head, self.k = head, k
        w = head.weight.detach()
        logits = head(w)
        self.s, self.y, self.e = w, logits.argmax(1), softmax_entropy(logits)
        self.classes = logits.shape[1]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.head(z)
        self.s = torch.cat([self.s, z])
        self.y = torch.cat([self.y, logits.argmax(1)])
        self.e = torch.cat([self.e, softmax_entropy(logits)])
        keep = []
        for c in range(self.classes):
            idx = torch.nonzero(self.y == c).flatten()
            keep.append(idx[torch.argsort(self.e[idx], stable=True)][: self.k])
        keep_idx = torch.cat(keep)
        self.s, self.y, self.e = self.s[keep_idx], self.y[keep_idx], self.e[keep_idx]
        w = F.normalize(self.s, dim=1).T @ F.one_hot(self.y, self.classes).float()
        return z @ F.normalize(w, dim=0)


@pytest.mark.parametrize("make", [make_vit, make_resnet])
def test_t3a_matches_the_growing_list_algorithm(make: object) -> None:
    net = make(0)  # type: ignore[operator]
    use_batch_statistics(net)
    t3a = T3A(net, filter_k=3)
    head = net.get_submodule(t3a.head_name)
    captured: list[torch.Tensor] = []
    reference = None
    for i in range(4):
        x = _images(6, seed=i)
        out = t3a(x)
        with torch.no_grad():
            handle = head.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
            net(x)
            handle.remove()
            if reference is None:
                reference = _ReferenceT3A(head, 3)
            want = reference(captured[-1].flatten(1))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert t3a.forward_passes == t3a.batches == 4
    assert int(t3a.support_counts().max()) <= 3


def test_t3a_state_dict_shapes_are_fixed_and_restore_the_supports() -> None:
    t3a = T3A(make_vit(0), filter_k=4)
    shapes = {k: v.shape for k, v in t3a.state_dict().items()}
    t3a(_images(8, 1))
    assert {k: v.shape for k, v in t3a.state_dict().items()} == shapes
    other = T3A(make_vit(0), filter_k=4)
    other.load_state_dict(t3a.state_dict())
    x = _images(8, 2)
    torch.testing.assert_close(other(x), t3a(x))


def test_t3a_rejects_bad_filter() -> None:
    with pytest.raises(ValueError, match="filter_k"):
        T3A(make_vit(0), filter_k=0)


# ------------------------------------------------------------------------------------------------------- prompts
def test_prompt_forward_without_prompts_is_the_plain_forward() -> None:
    net = make_vit(0)
    x = _images()
    with torch.no_grad():
        plain = net(x)
        for prompts in (None, torch.zeros(0, net.embed_dim)):
            out = prompt_forward(net, x, prompts)
            torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-6)
            torch.testing.assert_close(out.head_input, out.features[:, -net.embed_dim :])
        assert out.features.shape == (8, len(net.blocks) * net.embed_dim)


def test_prompt_forward_features_match_the_zoa_taps_and_prompts_change_them() -> None:
    net = make_vit(0)
    x = _images()
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
    foa.collect_source_statistics([_images(16, 10), _images(16, 11)])
    return foa


def test_foa_spends_popsize_plus_one_passes_and_shifts_from_the_second_batch() -> None:
    foa = _foa(popsize=27)
    x = _images(8, 3)
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
    foa(_images(8, 4))
    assert foa.forward_passes == 56


def test_foa_state_dict_resumes_cma_exactly() -> None:
    full = _foa()
    first, second = _images(8, 5), _images(8, 6)
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
        foa(_images(4))


# ---------------------------------------------------------------------------------------------------------- Tent
@pytest.mark.parametrize("make", [make_vit, make_resnet])
def test_tent_steps_reduce_entropy_on_a_fixed_batch(make: object) -> None:
    tent = Tent(make(0), lr=0.01, momentum=0.0)  # type: ignore[operator]
    x = _images(16, 7)
    entropies = [float(softmax_entropy(tent(x)).mean()) for _ in range(4)]
    assert entropies[-1] < entropies[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(entropies))
    assert tent.forward_passes == tent.backward_passes == 4
    assert tent.zero_gradient_steps == 0
    assert all(name.endswith(("weight", "bias")) for name in tent.param_names)


def test_tent_refuses_inference_mode() -> None:
    tent = Tent(make_vit(0))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tent(_images(4))


def test_tent_optimizer_state_is_in_the_state_dict() -> None:
    tent = Tent(make_resnet(0))
    tent(_images(8))
    other = Tent(make_resnet(0))
    other.load_state_dict(tent.state_dict())
    x = _images(8, 1)
    torch.testing.assert_close(other(x), tent(x))
    torch.testing.assert_close(other(x), tent(x))  # the momentum buffers were restored too


def test_tent_adapts_a_ptq4vit_quantized_vit_through_straight_through_rounding() -> None:
    from zoa_lightning.core.quant.vit import prepare_vit_quantization, vit_quant_modules

    net = prepare_vit_quantization(make_vit(0), 8, 8)
    for _, module in vit_quant_modules(net):
        for name, buf in module.named_buffers(recurse=False):
            if name.endswith(("delta", "split")):
                buf.fill_(0.05)
        module.mark_calibrated()
    tent = Tent(net, lr=0.01)
    before = [p.clone() for p in tent.params]
    with torch.no_grad():
        quantized = net(_images(8))
    tent(_images(8))
    assert tent.zero_gradient_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tent.params, strict=True))
    with torch.no_grad():  # the forward values are unchanged by the estimator
        assert not torch.equal(net(_images(8)), quantized)


def test_tent_on_an_mqbench_quantized_cnn_adapts_through_straight_through_estimators() -> None:
    from zoa_lightning.core.quant.cnn import quantize_cnn

    net = quantize_cnn(make_resnet(0), _images(8, 9), 8, observer="minmax")
    tent = Tent(net, lr=0.01)
    before = [p.clone() for p in tent.params]
    tent(_images(8))
    assert tent.zero_gradient_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tent.params, strict=True))
