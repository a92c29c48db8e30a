"""ActivationShift: the running mean of the final feature, its EMA, its reset and the shift vector."""

from __future__ import annotations

import torch

from zoa_lightning.core.shift import ActivationShift


def test_no_vector_before_the_first_batch_then_source_minus_the_first_mean() -> None:
    shift = ActivationShift(3)
    source = torch.tensor([1.0, 2.0, 3.0])
    assert shift.vector(source) is None
    shift.update(torch.tensor([0.5, 0.5, 0.5]))
    assert bool(shift.ready)
    torch.testing.assert_close(shift.mean, torch.tensor([0.5, 0.5, 0.5]))  # the first batch is copied, not averaged
    torch.testing.assert_close(shift.vector(source), torch.tensor([0.5, 1.5, 2.5]))


def test_later_batches_follow_an_ema_with_the_given_momentum() -> None:
    shift = ActivationShift(2, momentum=0.9)
    first, second, third = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.0])
    shift.update(first)
    shift.update(second)
    expected = 0.9 * first + 0.1 * second
    torch.testing.assert_close(shift.mean, expected)
    shift.update(third, momentum=0.5)  # a small batch's momentum, for this batch only
    expected = 0.5 * expected + 0.5 * third
    torch.testing.assert_close(shift.mean, expected)
    shift.update(second)
    torch.testing.assert_close(shift.mean, 0.9 * expected + 0.1 * second)


def test_a_reset_drops_the_vector_and_the_next_batch_starts_the_mean_anew() -> None:
    shift = ActivationShift(2)
    shift.update(torch.tensor([1.0, 1.0]))
    shift.update(torch.tensor([2.0, 2.0]))
    shift.reset()
    assert shift.vector(torch.zeros(2)) is None
    shift.update(torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(shift.mean, torch.tensor([5.0, -5.0]))  # not mixed with the old domain's mean
    torch.testing.assert_close(shift.vector(torch.zeros(2)), torch.tensor([-5.0, 5.0]))


def test_the_running_mean_is_state() -> None:
    shift = ActivationShift(2, dtype=torch.float64)
    shift.update(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert set(shift.state_dict()) == {"mean", "ready"}
    resumed = ActivationShift(2, dtype=torch.float64)
    resumed.load_state_dict(shift.state_dict())
    resumed.update(torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(resumed.mean, torch.tensor([1.2, 2.2], dtype=torch.float64))
