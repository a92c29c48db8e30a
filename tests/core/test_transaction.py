"""Transaction and BatchGuard: a rolled-back batch restores every adaptation buffer and the generator."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from zoa_lightning.core.counters import Counters
from zoa_lightning.core.transaction import AdaptationDiverged, BatchGuard, Rollback, Transaction

COUNTERS = ("batches", "forward_passes", "skipped_batches", "consecutive_skips")


class _Part(nn.Module):
    constant_buffers = ("fixed",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", torch.zeros(3))
        self.register_buffer("fixed", torch.zeros(2))


class _Adapter(nn.Module):
    """An adapter's shape: a wrapped network ``model``, parts with buffers, counters."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.BatchNorm1d(2)  # the network's own buffers (running statistics) are not adaptation state
        self.part = _Part()
        self.counters = Counters(COUNTERS)
        self.register_buffer("top", torch.zeros(()))


def _change(adapter: _Adapter) -> None:
    adapter.part.state += 1
    adapter.top += 5
    adapter.counters.add("batches")
    adapter.counters.add("forward_passes", 2)


def test_restore_puts_back_every_buffer_outside_the_network_and_the_generator_state() -> None:
    adapter, generator = _Adapter(), torch.Generator().manual_seed(0)
    adapter.part.state.copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.rand(4, generator=generator)
    transaction = Transaction(adapter, generator)
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    expected = torch.rand(4, generator=twin)  # what the generator draws next from the snapshot
    _change(adapter)
    adapter.model.running_mean += 7
    torch.rand(10, generator=generator)
    transaction.restore()
    assert adapter.part.state.tolist() == [1.0, 2.0, 3.0]
    assert float(adapter.top) == 0.0
    assert adapter.counters.as_dict() == dict.fromkeys(COUNTERS, 0)
    torch.testing.assert_close(adapter.model.running_mean, torch.full((2,), 7.0))  # model.* is not adaptation state
    assert torch.equal(torch.rand(4, generator=generator), expected)


def test_restore_is_in_place_and_constant_buffers_are_not_copied() -> None:
    adapter = _Adapter()
    state = adapter.part.state
    transaction = Transaction(adapter, torch.Generator())
    adapter.part.state += 1
    adapter.part.fixed += 1  # declared constant: never changed by a batch, so not part of the snapshot
    transaction.restore()
    assert adapter.part.state is state
    assert adapter.part.state.tolist() == [0.0, 0.0, 0.0]
    assert adapter.part.fixed.tolist() == [1.0, 1.0]


def test_a_rollback_with_a_reason_keeps_the_passes_counts_the_skip_and_warns() -> None:
    adapter, generator = _Adapter(), torch.Generator()
    events: list[dict] = [{"event": "old"}]
    guard = BatchGuard(adapter, generator, events, adapter.counters)
    _change(adapter)
    events.append({"event": "shift"})
    with pytest.warns(RuntimeWarning, match=r"ZOA skipped batch 0: the loss is not finite; all adaptation state was "
                                            r"rolled back \(1 skipped so far, 1 in a row\)"):  # fmt: skip
        guard.rollback("loss is not finite")
    assert guard.reason == "loss is not finite"
    assert adapter.part.state.tolist() == [0.0, 0.0, 0.0]
    assert events == [{"event": "old"}]  # the batch's events are dropped, earlier ones kept
    assert adapter.counters.as_dict() == {
        "batches": 0,
        "forward_passes": 2,
        "skipped_batches": 1,
        "consecutive_skips": 1,
    }


def test_a_rollback_for_an_exception_restores_everything_silently() -> None:
    adapter = _Adapter()
    guard = BatchGuard(adapter, torch.Generator(), [], adapter.counters)
    _change(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.rollback()
    assert adapter.counters.as_dict() == dict.fromkeys(COUNTERS, 0)
    assert guard.reason == ""


def test_a_commit_ends_the_run_of_consecutive_skips_and_the_limit_stops_a_diverged_run() -> None:
    adapter = _Adapter()
    adapter.counters.set("consecutive_skips", 2)
    guard = BatchGuard(adapter, torch.Generator(), [], adapter.counters)
    guard.check_limit(3, "Lower the learning rate")  # 2 < 3: carry on
    guard.check_limit(None, "never")
    with pytest.warns(RuntimeWarning):
        guard.rollback("update is not finite")
    with pytest.raises(AdaptationDiverged, match=r"ZOA rolled back 3 batches in a row \(the last one because the "
                                                 r"update is not finite\).*Lower the learning rate; "
                                                 r"max_consecutive_skips=3 sets this limit"):  # fmt: skip
        guard.check_limit(3, "Lower the learning rate")
    guard.check_limit(None, "never")  # no limit: never raises
    guard.commit()
    assert adapter.counters["consecutive_skips"] == 0
    assert adapter.counters["skipped_batches"] == 1  # the total stays
    guard.check_limit(1, "x")


def test_a_rollback_carries_its_reason_and_the_prediction() -> None:
    prediction = torch.ones(2, 3)
    failure = Rollback("perturbed loss is not finite", prediction)
    assert str(failure) == failure.what == "perturbed loss is not finite"
    assert failure.prediction is prediction
    assert issubclass(AdaptationDiverged, RuntimeError)
