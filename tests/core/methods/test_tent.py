"""Tent: entropy descent, inference mode, optimizer state, quantized networks and the zero-gradient warning."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from tests.helpers import images, make_resnet, make_vit
from zoa_lightning.core import softmax_entropy
from zoa_lightning.core.methods.tent import Tent


@pytest.mark.parametrize("make", [make_vit, make_resnet])
def test_tent_steps_reduce_entropy_on_a_fixed_batch(make: object) -> None:
    tent = Tent(make(0), lr=0.01, momentum=0.0)  # type: ignore[operator]
    x = images(16, 7)
    entropies = [float(softmax_entropy(tent(x)).mean()) for _ in range(4)]
    assert entropies[-1] < entropies[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(entropies))
    assert tent.forward_passes == tent.backward_passes == 4
    assert tent.zero_gradient_steps == 0
    assert all(name.endswith(("weight", "bias")) for name in tent.param_names)


def test_tent_refuses_inference_mode() -> None:
    tent = Tent(make_vit(0))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tent(images(4))


def test_tent_optimizer_state_is_in_the_state_dict() -> None:
    tent = Tent(make_resnet(0))
    tent(images(8))
    other = Tent(make_resnet(0))
    other.load_state_dict(tent.state_dict())
    x = images(8, 1)
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
        quantized = net(images(8))
    tent(images(8))
    assert tent.zero_gradient_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tent.params, strict=True))
    with torch.no_grad():  # the forward values are unchanged by the estimator
        assert not torch.equal(net(images(8)), quantized)


def test_tent_on_an_mqbench_quantized_cnn_adapts_through_straight_through_estimators() -> None:
    from zoa_lightning.core.quant.cnn import quantize_cnn

    net = quantize_cnn(make_resnet(0), images(8, 9), 8, observer="minmax")
    tent = Tent(net, lr=0.01)
    before = [p.clone() for p in tent.params]
    tent(images(8))
    assert tent.zero_gradient_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tent.params, strict=True))


class _RoundedHead(nn.Module):
    """A LayerNorm feeding the head through a plain ``torch.round``: no straight-through estimator, no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.round(4 * self.norm(x.mean((2, 3)).repeat(1, 4))) / 4)


def test_tent_counts_and_reports_once_the_steps_of_a_network_that_blocks_every_gradient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tent = Tent(_RoundedHead(), lr=0.01)
    before = [p.clone() for p in tent.params]
    with caplog.at_level(logging.WARNING, logger="zoa_lightning.core.methods.tent"):
        tent(images(8))
        tent(images(8, 1))
    assert tent.zero_gradient_steps == 2
    assert all(torch.equal(a, p) for a, p in zip(before, tent.params, strict=True))
    reports = [r.getMessage() for r in caplog.records if "zero gradient" in r.getMessage()]
    assert len(reports) == 1
    assert "straight-through estimator" in reports[0]
    assert tent.run_info() == {"backward_passes": 2, "zero_gradient_steps": 2}
    assert tent.requires_autograd
