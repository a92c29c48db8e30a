"""Small batches down to one image: pooled loss statistics, chunked detection, scaled steps, BatchNorm prior."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.helpers import MODEL_FACTORIES, corrupt_noise
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.loss import loss_statistics
from zoa_lightning.core.small_batch import SmallBatches


def _adapter(kind: str, digits: torch.Tensor, **config: object) -> ZOA:
    cfg = {"lr": 0.005, "spsa_c": 0.05, "domain_t": 0.1, **config}
    adapter = ZOA(MODEL_FACTORIES[kind](0), ZOAConfig(**cfg))  # type: ignore[arg-type]
    adapter.collect_source_statistics(digits[:512].split(64))
    return adapter


def _stats(rows: torch.Tensor) -> torch.Tensor:
    return loss_statistics(rows, torch.zeros(rows.shape[0], 3))


# ---------------------------------------------------------------------------------------------- the pool itself
def test_the_pool_adds_the_most_recent_batches_until_it_holds_enough_images() -> None:
    pool = SmallBatches(2 * 2 + 2, pool_images=8)
    data = torch.randn(20, 2)
    for start in (0, 3, 6):  # three committed batches of 3
        pool.begin(3)
        pool.pooled(_stats(data[start : start + 3]))
        pool.finish(_stats(data[start : start + 3]), detected=False)
    pool.begin(3)
    current = _stats(data[9:12])
    pooled = pool.pooled(current)
    # 3 of its own need 5 more: the two most recent batches (6 images), not the oldest
    torch.testing.assert_close(pooled, _stats(data[3:12]))
    assert pool.share == pytest.approx(3 / 9)
    assert pool.momentum(0.9) == pytest.approx(0.9 ** (3 / 8))


def test_a_full_batch_stands_alone_and_so_does_the_short_batch_right_after_it() -> None:
    pool = SmallBatches(6, pool_images=8)
    x = torch.randn(20, 2)
    pool.begin(4)
    assert pool.active  # the first small batch of a stream is pooled (with nothing yet)
    pool.finish(_stats(x[:4]), detected=False)
    pool.begin(8)
    assert not pool.active
    stats = _stats(x[4:12])
    assert pool.pooled(stats) is stats
    assert pool.share == 1.0
    assert pool.momentum(0.9) == 0.9
    pool.finish(stats, detected=False)
    assert int(pool.filled) == 0  # a full batch empties the pool
    pool.begin(3)
    assert not pool.active  # a domain's short last batch in the 64-image protocol: as in the reference
    pool.finish(_stats(x[12:15]), detected=False)
    pool.begin(3)
    assert pool.active  # two small batches in a row: a small-batch stream


def test_a_detected_shift_and_a_rolled_back_batch_leave_the_right_pool() -> None:
    pool = SmallBatches(6, pool_images=8)
    x = torch.randn(20, 2)
    pool.begin(2)
    pool.finish(_stats(x[:2]), detected=False)
    before = copy.deepcopy(pool.state_dict())
    pool.begin(2)
    pool.finish(None, detected=False)  # rolled back: nothing changes
    assert all(torch.equal(v, pool.state_dict()[k]) for k, v in before.items())
    pool.begin(2)
    pool.finish(_stats(x[2:4]), detected=True)  # a new domain: the past is not its statistics
    assert int(pool.filled) == 0


def test_a_pooled_batch_steps_by_its_share(digits: torch.Tensor) -> None:
    # The same batch of 8 after 56 earlier images, with lr and the estimate scaled by 8/64: the loss-gradient part of
    # the step keeps the size the pooled loss gives it, weight decay shrinks to the share.
    adapter = _adapter("vit", digits, weight_decay=0.0)
    for i in range(7):
        adapter(digits[600 + 8 * i : 608 + 8 * i])
    assert adapter.small.history[:, -1].sum() == 56
    theta = adapter.bank.theta.clone()
    state, generator = copy.deepcopy(adapter.state_dict()), adapter.generator.get_state()
    adapter(digits[700:708])
    step = adapter.bank.theta - theta
    adapter.load_state_dict(state)
    adapter.generator.set_state(generator)
    adapter.config = ZOAConfig(**{**adapter.config.__dict__, "weight_decay": 0.4})
    adapter(digits[700:708])
    decayed = adapter.bank.theta - theta
    torch.testing.assert_close(decayed - step, -0.005 * (8 / 64) * 0.4 * theta)


def test_the_detector_tests_chunks_of_small_batches_and_the_bank_stores(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    clean = digits[512:]
    for i in range(16):  # 128 clean images in batches of 8: the detector is seeded by the first 64-image chunk
        adapter(clean[8 * i : 8 * i + 8])
    assert bool(adapter.detector.ready)
    assert adapter.counter("stores") == 0
    noisy = corrupt_noise(clean[:64], seed=0)
    detected_at = None
    for i in range(8):
        adapter(noisy[8 * i : 8 * i + 8])
        if adapter.counter("stores") and detected_at is None:
            detected_at = i
    assert detected_at == 7, "the first full chunk of the new domain is tested at its eighth batch"
    assert adapter.events[-1]["event"] == "shift"
    assert int(adapter.small.filled) == 0


def test_batches_of_the_paper_size_are_untouched_by_pooling(digits: torch.Tensor) -> None:
    stream = [digits[512 + 64 * i : 576 + 64 * i] for i in range(3)] + [digits[600:640]]
    a, b = _adapter("resnet", digits), _adapter("resnet", digits, pool_images=2, bn_prior=0.0)
    for batch in stream:  # pool_images=2: nothing is ever pooled, the engine as it was
        torch.testing.assert_close(a(batch), b(batch), rtol=0, atol=0)
    torch.testing.assert_close(a.bank.theta, b.bank.theta, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- BatchNorm prior


def test_a_pooled_batch_sets_the_prior_only_while_it_runs(digits: torch.Tensor) -> None:
    adapter = _adapter("resnet", digits)
    seen: list[float | None] = []
    bn = next(m for m in adapter.model.modules() if type(m).__name__ == "FusedBatchNorm2d")
    bn.register_forward_hook(lambda *_: seen.append(adapter.batch_statistics.prior))
    adapter(digits[600:604])
    adapter(digits[512:576])
    assert seen[:2] == [16.0, 16.0]
    assert seen[2:] == [None, None]
    assert adapter.batch_statistics.prior is None
    assert math.isclose(adapter.config.bn_prior, 16.0)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_run_resumed_in_the_middle_of_a_pool_continues_bit_identically(kind: str, digits: torch.Tensor) -> None:
    # The pool, the detector's pending chunk and the BatchNorms' running estimates are all in the state dict.
    stream = [*digits[512:600].split(5), *corrupt_noise(digits[600:700]).split(5)]
    adapter = _adapter(kind, digits)
    for batch in stream[:9]:
        adapter(batch)
    assert int(adapter.small.filled) > 0
    assert float(adapter.detector.pending[-1]) > 0
    state = copy.deepcopy(adapter.state_dict())
    rest = [adapter(batch) for batch in stream[9:]]
    resumed = _adapter(kind, digits)
    resumed.load_state_dict(state)
    for batch, logits in zip(stream[9:], rest, strict=True):
        assert torch.equal(resumed(batch), logits)
    assert torch.equal(resumed.bank.theta, adapter.bank.theta)
    assert torch.equal(resumed.batch_statistics.running, adapter.batch_statistics.running)
    assert resumed.counter("stores") == adapter.counter("stores") >= 1
