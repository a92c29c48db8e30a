"""Counters: named int64 buffers in the state dict, so a resumed run continues its counts."""

from __future__ import annotations

import re

import pytest
import torch

from zoa_lightning.core.counters import Counters


def test_each_name_is_an_int64_buffer_that_starts_at_zero() -> None:
    counters = Counters(["batches", "stores"])
    assert counters.names == ("batches", "stores")
    assert counters.as_dict() == {"batches": 0, "stores": 0}
    state = counters.state_dict()
    assert list(state) == ["batches", "stores"]
    assert all(t.dtype == torch.long and t.shape == () for t in state.values())


def test_add_set_and_read() -> None:
    counters = Counters(["batches", "stores"])
    counters.add("batches")
    counters.add("batches", 4)
    counters.add("stores", 0)
    assert (counters["batches"], counters["stores"]) == (5, 0)
    assert isinstance(counters["batches"], int)
    counters.set("batches", 2)
    counters.set("stores", 9)
    assert counters.as_dict() == {"batches": 2, "stores": 9}


def test_an_unknown_name_lists_the_known_ones() -> None:
    counters = Counters(["batches"])
    message = "unknown counter 'stored'; counters are ['batches']"
    for use in (lambda: counters["stored"], lambda: counters.add("stored"), lambda: counters.set("stored", 1)):
        with pytest.raises(KeyError, match=re.escape(message)):
            use()


def test_counts_survive_a_state_dict_round_trip() -> None:
    counters = Counters(["batches", "forward_passes"])
    counters.add("batches", 3)
    counters.add("forward_passes", 6)
    resumed = Counters(["batches", "forward_passes"])
    resumed.load_state_dict(counters.state_dict())
    resumed.add("batches")
    assert resumed.as_dict() == {"batches": 4, "forward_passes": 6}
    assert counters["batches"] == 3  # the copy is independent
