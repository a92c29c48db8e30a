"""Sufficient statistics: moments, their finish, the entropy, and the reduce that counts what it sends."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import ThreadAllReduce, run_ranks
from zoa_lightning.core.stats import (
    CountedReduce,
    channel_moments,
    finish,
    gather_rows,
    identity_reduce,
    moments,
    row_counts,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathered_rows_are_every_process_rows_bit_for_bit_in_rank_order(dtype: torch.dtype) -> None:
    # Uneven slices, values over many magnitudes and a NaN: the sum with the other processes' zeros changes no bit.
    sizes, width = [2, 5, 1], 7
    whole = (_x(sum(sizes), width) * 10.0 ** torch.randint(-8, 8, (sum(sizes), width))).to(dtype)
    whole[3, 2] = float("nan")
    slices = whole.split(sizes)
    comm, got = ThreadAllReduce(len(sizes)), [None] * len(sizes)

    def work(rank: int) -> None:
        counts = row_counts(len(slices[rank]), comm.for_rank(rank), rank, len(sizes))
        assert counts.tolist() == sizes
        got[rank] = gather_rows(slices[rank], comm.for_rank(rank), rank, counts)

    run_ranks(work, len(sizes))
    for rows in got:
        assert rows is not None
        assert rows.dtype == dtype
        assert torch.equal(rows.nan_to_num(7.0), whole.nan_to_num(7.0))
        assert bool(rows[3, 2].isnan())


def test_gathered_statistics_equal_one_process_where_summed_statistics_need_not() -> None:
    # Why the loss gathers rows under DDP: sums of two slices' moments round differently from the whole's moments.
    whole = _x(43, 576, seed=3)
    one = moments(whole, (0,))
    halves = [moments(part, (0,)) for part in whole.split([21, 22])]
    summed = (halves[0][0] + halves[1][0], halves[0][1] + halves[1][1])
    assert not (torch.equal(summed[0], one[0]) and torch.equal(summed[1], one[1]))
    counts = torch.tensor([21.0, 22.0], dtype=torch.float64)
    comm, got = ThreadAllReduce(2), [None, None]

    def work(rank: int) -> None:
        got[rank] = moments(gather_rows(whole.split([21, 22])[rank], comm.for_rank(rank), rank, counts), (0,))

    run_ranks(work, 2)
    for stats in got:
        assert stats is not None
        assert torch.equal(stats[0], one[0])
        assert torch.equal(stats[1], one[1])


def test_one_process_gathers_nothing() -> None:
    local = _x(4, 3)
    calls: list[torch.Tensor] = []
    counts = row_counts(4, lambda t: calls.append(t) or t, 0, 1)
    assert counts.tolist() == [4.0]
    assert len(calls) == 1
    assert gather_rows(local, lambda t: calls.append(t) or t, 0, counts) is local
    assert len(calls) == 1
