"""The Adapter base: the network kept in eval mode, named counters in the state, and the plain defaults."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from zoa_lightning.core.methods.base import Adapter, device_of


class _Plain(Adapter):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.counters.add("batches")
        self.counters.add("forward_passes")
        return self.model(images)


class _Skipping(_Plain):
    COUNTERS: ClassVar[tuple[str, ...]] = ("batches", "forward_passes", "skipped_batches")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))


def test_the_defaults_a_method_with_nothing_to_say_keeps() -> None:
    adapter = _Plain(_net())
    assert adapter.passes_per_batch == 1
    assert adapter.requires_autograd is False
    assert adapter.skipped_batches == 0  # no such counter: never skips
    assert adapter.run_info() == {}
    assert adapter.last_losses == ()
    assert adapter.COUNTERS == ("batches", "forward_passes")
    assert (adapter.batches, adapter.forward_passes) == (0, 0)
    adapter(torch.ones(2, 4))
    assert (adapter.batches, adapter.forward_passes, adapter.counter("batches")) == (1, 1, 1)


def test_a_skipped_batches_counter_is_reported_when_the_method_has_one() -> None:
    adapter = _Skipping(_net())
    adapter.counters.add("skipped_batches", 2)
    assert adapter.skipped_batches == 2
    assert "counters.skipped_batches" in adapter.state_dict()


def test_the_network_stays_in_eval_mode_whatever_train_is_asked() -> None:
    net = _net().train()
    adapter = _Plain(net)
    assert adapter.model is net
    assert not net.training
    assert adapter.train() is adapter
    assert adapter.training
    assert not any(m.training for m in net.modules())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(adapter(x), adapter(x))  # eval: no dropout, running BatchNorm statistics
    adapter.eval()
    assert not adapter.training
    assert not net.training


def test_the_adaptation_state_leaves_out_the_network_and_loads_around_it() -> None:
    adapter = _Plain(_net())
    adapter(torch.ones(2, 4))
    state = adapter.adaptation_state_dict()
    assert set(state) == {"counters.batches", "counters.forward_passes"}
    other = _Plain(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)))
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    other.load_adaptation_state_dict(state)
    assert (other.batches, other.forward_passes) == (1, 1)
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in weights.items())  # its own weights kept


def test_device_of_a_module() -> None:
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(nn.ReLU()) == torch.device("cpu")  # no tensors: the CPU
    buffers_only = nn.Module()
    buffers_only.register_buffer("x", torch.zeros(1, device="meta"))
    assert device_of(buffers_only) == torch.device("meta")
    with torch.device("meta"):
        assert device_of(nn.Linear(2, 2)) == torch.device("meta")
