"""The shift policy (store in the prediction pass only) and the unadapted fallback prediction."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers import images, make_vit
from zoa_lightning.core import ZOA, KnowledgeBank, ZOAConfig
from zoa_lightning.core.counters import Counters
from zoa_lightning.core.policies import UnadaptedPredictions, on_shift

COUNTERS = ("batches", "forward_passes", "stores", "evictions", "perturbed_detections")


def _bank(max_entries: int = 2) -> KnowledgeBank:
    bank = KnowledgeBank([2], torch.tensor([1.0, 1.0, 0.0, 0.0]), max_entries=max_entries)
    bank.theta += 0.5
    return bank


def _counters(batches: int = 7) -> Counters:
    counters = Counters(COUNTERS)
    counters.set("batches", batches)
    return counters


def test_a_shift_in_the_prediction_pass_stores_and_is_counted() -> None:
    bank, counters = _bank(), _counters()
    event = on_shift(bank, counters, perturbed=False, store=True)
    assert bank.num_entries == 2
    assert (event["event"], event["batch"], event["entries"], event["evicted"]) == ("shift", 7, 2, 0)
    assert {"scale_factor", "alpha_new"} <= set(event)
    assert (counters["stores"], counters["evictions"], counters["perturbed_detections"]) == (1, 0, 0)


def test_a_store_into_a_full_bank_counts_the_eviction() -> None:
    bank, counters = _bank(max_entries=1), _counters()
    on_shift(bank, counters, perturbed=False, store=True)
    bank.theta += 0.25
    event = on_shift(bank, counters, perturbed=False, store=True)
    assert event["evicted"] >= 1
    assert (counters["stores"], counters["evictions"]) == (2, 1)


def test_a_shift_in_a_perturbed_pass_is_logged_and_counted_never_stored(caplog: pytest.LogCaptureFixture) -> None:
    bank, counters = _bank(), _counters()
    with caplog.at_level(logging.WARNING, logger="zoa_lightning.core.policies"):
        event = on_shift(bank, counters, perturbed=True, store=True)
    assert event == {"event": "perturbed_detection", "batch": 7}
    assert bank.num_entries == 1
    assert (counters["stores"], counters["perturbed_detections"]) == (0, 1)
    assert any("perturbed pass: not stored" in r.getMessage() for r in caplog.records)


def test_without_the_bank_a_shift_is_an_event_only() -> None:
    bank, counters = _bank(), _counters()
    assert on_shift(bank, counters, perturbed=False, store=False) == {"event": "shift", "batch": 7}
    assert bank.num_entries == 1
    assert counters["stores"] == 0


def test_unadapted_predictions_use_the_pretrained_parameters_and_count_one_pass() -> None:
    x = images(4)
    with torch.no_grad():
        want = make_vit(0)(x)
    adapter = ZOA(make_vit(0), ZOAConfig())
    adapter.bank.theta.add_(0.3)  # the adapted network now predicts differently
    with torch.no_grad():
        assert not torch.allclose(adapter.model(x), want, atol=1e-4)
    unadapted = UnadaptedPredictions(adapter.model, adapter.bank, adapter.counters)
    passes = adapter.counter("forward_passes")
    torch.testing.assert_close(unadapted.pretrained(x), want)
    assert adapter.counter("forward_passes") == passes + 1
    with torch.no_grad():
        assert not torch.allclose(adapter.model(x), want, atol=1e-4)  # outside the call the bank is in use again
