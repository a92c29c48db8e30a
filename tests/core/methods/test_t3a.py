"""T3A: the support filter, the prototypes, the adapter against the published algorithm, fixed-shape state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import images, make_resnet, make_vit
from zoa_lightning.core import softmax_entropy
from zoa_lightning.core.methods.norm_adapt import use_batch_statistics
from zoa_lightning.core.methods.t3a import T3A, t3a_prototypes, t3a_select

INF = float("inf")


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
        x = images(6, seed=i)
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
    t3a(images(8, 1))
    assert {k: v.shape for k, v in t3a.state_dict().items()} == shapes
    other = T3A(make_vit(0), filter_k=4)
    other.load_state_dict(t3a.state_dict())
    x = images(8, 2)
    torch.testing.assert_close(other(x), t3a(x))


def test_t3a_rejects_bad_filter() -> None:
    with pytest.raises(ValueError, match="filter_k"):
        T3A(make_vit(0), filter_k=0)


def test_t3a_reports_its_supports() -> None:
    t3a = T3A(make_vit(0), filter_k=2)
    assert t3a.run_info() == {"supports": 10}  # one per class: the head's weight rows
    t3a(images(8, 3))
    assert t3a.run_info()["supports"] == int(t3a.support_counts().sum()) <= 20
