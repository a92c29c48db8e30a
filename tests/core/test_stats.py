"""Sufficient statistics: moments, their finish, the entropy, and the reduce that counts what it sends."""

from __future__ import annotations

import math

import pytest
import torch

from zoa_lightning.core.stats import (
    CountedReduce,
    channel_moments,
    finish,
    identity_reduce,
    moments,
    softmax_entropy,
)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 2


@pytest.mark.parametrize("dims", [(0,), (0, 2, 3)])
def test_moments_are_float64_sums_and_sums_of_squares(dims: tuple[int, ...]) -> None:
    x = _x(5, 3, 4, 4)
    s1, s2 = moments(x, dims)
    assert s1.dtype == s2.dtype == torch.float64
    torch.testing.assert_close(s1, x.double().sum(dims), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(s2, (x.double() ** 2).sum(dims), rtol=1e-6, atol=1e-4)
    c1, c2 = channel_moments(x, dims)
    torch.testing.assert_close(c1, s1, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(c2, s2, rtol=1e-6, atol=1e-4)


def test_finish_gives_the_mean_and_the_unbiased_variance() -> None:
    x = _x(7, 3).double()
    mean, var = finish(torch.tensor(7.0, dtype=torch.float64), x.sum(0), (x * x).sum(0))
    want_var, want_mean = torch.var_mean(x, dim=0, correction=1)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)


def test_finish_never_returns_a_negative_variance() -> None:
    x = torch.full((3, 4), 0.1, dtype=torch.float64)  # constant: rounding may leave Σx² - n·mean² slightly below 0
    s2 = (x * x).sum(0) - 1e-12
    _, var = finish(torch.tensor(3.0, dtype=torch.float64), x.sum(0), s2)
    assert bool((var >= 0).all())
    assert float(var.max()) == 0.0


def test_moments_of_two_halves_finish_to_those_of_the_whole() -> None:
    x = _x(10, 4, seed=1)
    a, b = moments(x[:4], (0,)), moments(x[4:], (0,))
    mean, var = finish(torch.tensor(10.0, dtype=torch.float64), a[0] + b[0], a[1] + b[1])
    want_var, want_mean = torch.var_mean(x.double(), dim=0, correction=1)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=1e-5)


def test_softmax_entropy_per_sample() -> None:
    logits = _x(4, 6, seed=2)
    p = logits.double().softmax(1)
    torch.testing.assert_close(softmax_entropy(logits.double()), -(p * p.log()).sum(1))
    uniform = softmax_entropy(torch.zeros(2, 10))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(10)))
    certain = softmax_entropy(torch.tensor([[100.0, 0.0, 0.0]]))
    assert float(certain) == pytest.approx(0.0, abs=1e-6)
    assert float(softmax_entropy(torch.tensor([[1000.0, -1000.0]]))) == 0.0  # finite for extreme logits


def test_identity_reduce_returns_its_argument() -> None:
    stats = torch.zeros(3, dtype=torch.float64)
    assert identity_reduce(stats) is stats


def test_counted_reduce_counts_calls_elements_and_bytes_in_total_and_per_batch() -> None:
    reduce = CountedReduce(lambda t: 2 * t)
    reduce.begin_batch()
    out = reduce(torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full((3,), 2.0, dtype=torch.float64))  # the wrapped reduction ran
    reduce(torch.ones(5, dtype=torch.float32))
    reduce.end_batch()
    assert (reduce.calls, reduce.elements, reduce.bytes) == (2, 8, 3 * 8 + 5 * 4)
    assert (reduce.last_batch_calls, reduce.last_batch_elements, reduce.last_batch_bytes) == (2, 8, 44)
    reduce.begin_batch()
    reduce(torch.ones(1, dtype=torch.float64))
    reduce.end_batch()
    assert (reduce.calls, reduce.elements, reduce.bytes) == (3, 9, 52)
    assert (reduce.last_batch_calls, reduce.last_batch_elements, reduce.last_batch_bytes) == (1, 1, 8)
    reduce.begin_batch()
    reduce.end_batch()  # a batch that sent nothing
    assert (reduce.last_batch_calls, reduce.last_batch_elements, reduce.last_batch_bytes) == (0, 0, 0)


def test_counted_reduce_defaults_to_the_identity() -> None:
    stats = torch.arange(4.0, dtype=torch.float64)
    assert CountedReduce()(stats) is stats
