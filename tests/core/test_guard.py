"""The source guard (``guard``): when it checks, what it decides, and that it costs no forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import corrupt_noise, per_sample_engine
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.bank import KnowledgeBank
from zoa_lightning.core.guard import SourceGuard

B = 16


def test_decide_resets_to_the_source_only_beyond_the_ratio() -> None:
    bank = KnowledgeBank([2], torch.ones(4), max_entries=4)
    bank.theta.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4]))
    bank.store()  # a stored snapshot: the source values need the epsilons to cancel the mixture
    bank.theta.add_(0.05)
    guard = SourceGuard(ZOAConfig(guard=True, guard_ratio=3.0), bank.size)
    before = bank.theta.clone()
    assert not guard.decide(bank, torch.tensor(2.9), torch.tensor(1.0))
    assert torch.equal(bank.theta, before)
    assert int(guard.resets) == 0
    assert guard.decide(bank, torch.tensor(3.1), torch.tensor(1.0))
    assert torch.equal(bank.current_delta(), torch.zeros(4))  # exactly the source parameters
    assert int(guard.resets) == 1
    assert bank.num_entries == 2  # the bank's entries stay


def test_a_rejected_part_is_set_aside_and_comes_back_at_the_next_shift() -> None:
    bank = KnowledgeBank([2], torch.ones(4), max_entries=4)
    bank.theta.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4]))
    bank.store()
    bank.theta.add_(0.05)
    learned = bank.current_delta().clone()
    guard = SourceGuard(ZOAConfig(guard=True, guard_ratio=3.0), bank.size)
    assert guard.decide(bank, torch.tensor(4.0), torch.tensor(1.0))
    bank.theta.add_(torch.tensor([0.01, 0.02, -0.01, 0.0]))  # the rejected domain learns from the source values
    assert guard.decide(bank, torch.tensor(4.0), torch.tensor(1.0))  # rejected again: the first part stays aside
    assert int(guard.resets) == 2
    bank.theta.add_(0.02)
    domain = bank.current_delta().clone()
    bank.store()  # the next detected shift stores what the rejected domain learned...
    torch.testing.assert_close(bank.deltas[bank.num_entries - 1], domain)
    guard.restore(bank)  # ...and the part set aside comes back
    torch.testing.assert_close(bank.current_delta(), learned)
    assert not bool(guard.parked_active)
    before = bank.theta.clone()
    guard.restore(bank)  # nothing set aside: nothing changes
    assert torch.equal(bank.theta, before)


def test_guard_ratio_and_every_are_checked() -> None:
    with pytest.raises(ValueError, match="guard_ratio must be >= 1"):
        ZOAConfig(guard=True, guard_ratio=0.5)
    with pytest.raises(ValueError, match="guard_every must be >= 1 or None"):
        ZOAConfig(guard=True, guard_every=0)


def _engine(digits: torch.Tensor, **config: object) -> ZOA:
    return per_sample_engine(digits, B, **{"guard": True, **config})


def _clean(digits: torch.Tensor, count: int) -> list[torch.Tensor]:
    pool = digits[512:]
    return [pool[i * B : (i + 1) * B] for i in range(count)]


def _noisy(digits: torch.Tensor, count: int) -> list[torch.Tensor]:
    pool = digits[512:]
    return [corrupt_noise(pool[i * B :][:B], seed=i) for i in range(count)]


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_detected_shift_checks_the_source_in_pass_b_and_resets_a_bad_learned_part(digits: torch.Tensor) -> None:
    adapter = _engine(digits)
    calls = _count_calls(adapter.model.patch_embed)  # type: ignore[arg-type]
    for x in _clean(digits, 3):
        adapter(x)
    assert int(adapter.guard.checks) == 0  # no shift yet
    adapter.bank.theta.add_(torch.linspace(-0.8, 0.8, adapter.bank.size))  # a learned part far worse than the source
    stores = adapter.counter("stores")
    adapter(_noisy(digits, 1)[0])  # the detector fires in pass A: this batch is a check
    assert adapter.counter("stores") == stores + 1
    assert int(adapter.guard.checks) == 1
    assert int(adapter.guard.resets) == 1
    assert torch.equal(adapter.bank.current_delta(), torch.zeros(adapter.bank.size))  # no step after the check
    loss_adapted, loss_source = adapter.last_losses
    assert loss_adapted > 3 * loss_source
    assert calls[0] == 2 * 4 == adapter.counter("forward_passes")  # still two passes per batch
    for x in _noisy(digits, 3)[1:]:
        adapter(x)  # learning goes on from the source values
    assert bool(adapter.bank.current_delta().ne(0).any())


def test_a_good_learned_part_is_kept(digits: torch.Tensor) -> None:
    adapter = _engine(digits, guard_ratio=1e6)
    for x in _clean(digits, 3):
        adapter(x)
    theta = adapter.bank.theta.clone()
    delta = adapter.bank.current_delta().clone()
    adapter(_noisy(digits, 1)[0])
    assert int(adapter.guard.checks) == 1
    assert int(adapter.guard.resets) == 0
    torch.testing.assert_close(adapter.bank.current_delta(), delta)  # the store re-bases: same parameters, no step
    assert not torch.equal(adapter.bank.theta, theta)


def test_periodic_checks_and_no_check_before_anything_is_learned(digits: torch.Tensor) -> None:
    adapter = _engine(digits, guard_every=2, guard_ratio=1e6)
    checks = []
    for x in _clean(digits, 7):
        adapter(x)
        checks.append(int(adapter.guard.checks))
    assert adapter.counter("stores") == 0
    assert checks == [0, 0, 1, 1, 1, 2, 2]  # every third batch: two batches after each check


def test_guard_off_never_checks(digits: torch.Tensor) -> None:
    adapter = _engine(digits, guard=False)
    for x in _clean(digits, 2) + _noisy(digits, 2):
        adapter(x)
    assert adapter.counter("stores") == 1
    assert int(adapter.guard.checks) == int(adapter.guard.since) == 0


def test_guard_state_round_trips_through_the_state_dict(digits: torch.Tensor) -> None:
    stream = _clean(digits, 3) + _noisy(digits, 4)
    adapter = _engine(digits, guard_every=2, guard_ratio=1.2)
    for x in stream[:4]:
        adapter(x)
    saved = copy.deepcopy(adapter.state_dict())
    assert {"guard.since", "guard.checks", "guard.resets", "guard.parked", "guard.parked_active"} <= set(saved)
    want = [adapter(x) for x in stream[4:]]
    restored = _engine(digits, guard_every=2, guard_ratio=1.2)
    restored.load_state_dict(saved)
    for x, logits in zip(stream[4:], want, strict=True):
        assert torch.equal(restored(x), logits)
    for name in ("since", "checks", "resets", "parked", "parked_active"):
        assert torch.equal(getattr(restored.guard, name), getattr(adapter.guard, name))
    assert torch.equal(restored.bank.theta, adapter.bank.theta)
