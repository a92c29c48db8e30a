"""The signal-scaled step and the source guard under two processes (threads whose ``reduce_fn`` is an all-reduce).

Every decision of both is made from sums that went through ``reduce_fn`` (the all-reduced per-image differences and
the global directions, the reduced losses), so two ranks hold bit-identical state after every batch and follow the
single engine on the concatenated batch: the same checks, the same resets, the same steps within float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.helpers import ThreadAllReduce, corrupt_noise, make_vit, rank_slice, run_ranks
from zoa_lightning.core import ZOA, ZOAConfig

WORLD, BATCH = 2, 32


Record = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]  # logits, θ, α, signal, checks, resets


def _record(engine: ZOA, logits: torch.Tensor) -> Record:
    guard = engine.guard
    return (logits, engine.bank.theta.clone(), engine.bank.alpha.clone(), engine.update.signal.clone(),
            int(guard.checks), int(guard.resets))  # fmt: skip


def _run(
    engine: ZOA, source: list[torch.Tensor], stream: list[torch.Tensor], part: Callable[[torch.Tensor], torch.Tensor]
) -> list[Record]:
    engine.collect_source_statistics([part(x) for x in source])
    out = []
    for i, x in enumerate(stream):
        if i == 3:  # a learned part far worse than the source before the shift: the guard must reset it
            engine.bank.theta.add_(torch.linspace(-0.8, 0.8, engine.bank.size))
        out.append(_record(engine, engine(part(x))))
    return out


def test_two_ranks_scale_and_guard_as_one_engine(digits: torch.Tensor) -> None:
    config = ZOAConfig(estimator="per_sample", normalize_step=True, lr=0.05, spsa_c=0.1, detector_min_batch=BATCH,
                       pool_images=BATCH, snr_step=True, snr_reference=0.005, guard=True, guard_every=2,
                       guard_ratio=1.5)  # fmt: skip
    source = list(digits[:256].split(64))
    pool = digits[512:]
    stream = [pool[i * BATCH : (i + 1) * BATCH] for i in range(3)]
    stream += [corrupt_noise(pool[i * BATCH :][:BATCH], seed=i) for i in range(5)]

    single = ZOA(make_vit(0), config)
    want = _run(single, source, stream, lambda x: x)
    assert single.guard.checks >= 2, "the stream should make the guard check"
    assert single.guard.resets >= 1, "the stream should make the guard reset"
    assert float(single.update.signal) != 0.0

    comm = ThreadAllReduce(WORLD)
    engines = [ZOA(make_vit(0), config, reduce_fn=comm.for_rank(r), rank=r, world_size=WORLD) for r in range(WORLD)]
    got: list[list[Record]] = [[] for _ in range(WORLD)]

    def work(rank: int) -> None:
        got[rank] = _run(engines[rank], source, stream, lambda x: rank_slice(x, WORLD, rank))

    run_ranks(work, WORLD)
    for i, (logits, theta, alpha, signal, checks, resets) in enumerate(want):
        r0, r1 = got[0][i], got[1][i]
        for k, name in ((1, "epsilons"), (2, "mixing logits"), (3, "signal fraction")):
            assert torch.equal(r0[k], r1[k]), f"ranks' {name} differ after batch {i}"
        assert r0[4:] == r1[4:] == (checks, resets), f"guard decisions differ after batch {i}"
        torch.testing.assert_close(r0[1], theta, rtol=1e-4, atol=1e-5)  # epsilons up to 0.8: float32 rounding
        torch.testing.assert_close(r0[2], alpha, rtol=0, atol=1e-5)
        torch.testing.assert_close(r0[3], signal, rtol=1e-4, atol=1e-7)  # from the float32 estimate
        torch.testing.assert_close(torch.cat([r0[0], r1[0]]), logits, rtol=0, atol=1e-4)
