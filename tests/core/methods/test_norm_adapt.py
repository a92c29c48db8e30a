"""no_adapt and norm_adapt: the plain-forward adapters and the BatchNorm batch-statistics conversion."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers import images, make_resnet, make_vit
from zoa_lightning.core.methods.no_adapt import NoAdapt
from zoa_lightning.core.methods.norm_adapt import NormAdapt, use_batch_statistics


def test_use_batch_statistics_converts_every_batchnorm_and_only_those() -> None:
    net = make_resnet(0)
    x = images()
    expected = net.train()(x)  # train mode: batch statistics (and running-stat updates we do not care about)
    net = make_resnet(0).eval()
    names = use_batch_statistics(net)
    assert len(names) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0
    assert not any("running_mean" in k for k in net.state_dict())
    torch.testing.assert_close(net(x), expected)
    assert use_batch_statistics(make_vit(0)) == []


def test_no_adapt_is_the_plain_eval_forward_and_counts_passes() -> None:
    net = make_resnet(0).train()
    adapter = NoAdapt(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        out = adapter(images())
        torch.testing.assert_close(out, make_resnet(0).eval()(images()))  # eval mode: running statistics
    assert adapter.forward_passes == 1
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_norm_adapt_uses_batch_statistics_and_reports_the_converted_layers() -> None:
    net = make_resnet(0)
    adapter = NormAdapt(net)
    with torch.no_grad():
        out = adapter(images())
        torch.testing.assert_close(out, make_resnet(0).train()(images()))
    assert adapter.model is net
    assert adapter.forward_passes == 1
    assert adapter.run_info() == {"batch_norms": len(adapter.batch_norms)}
    assert len(adapter.batch_norms) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_norm_adapt_on_a_vit_changes_nothing() -> None:
    adapter = NormAdapt(make_vit(0))
    with torch.no_grad():
        torch.testing.assert_close(adapter(images()), make_vit(0)(images()), rtol=0, atol=0)
    assert adapter.run_info() == {"batch_norms": 0}
