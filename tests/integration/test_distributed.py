"""Distributed ZOA: N processes, each adapting on its slice of every global batch, behave as one process.

* The shard sampler and ``make_loader`` cut the stream into the single-process global batches and split each one.
* Engine level, in-process: two adapters in two threads whose ``reduce_fn`` is a thread all-reduce take the same
  steps (and store the same knowledge) as one adapter on the concatenated batches.
* Lightning level (``ddp`` marker): a 2-process gloo ``ddp_spawn`` run of ``ZOAModule`` on a corruption stream,
  recorded from inside the ranks after every batch, against a single-process run of the same global batches.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from datamodules._common import GlobalBatchShardSampler, make_loader
from tests.helpers import (
    ThreadAllReduce,
    assert_ranks_step_as_one,
    corrupt_noise,
    load_recorded,
    make_resnet,
    make_stream,
    make_vit,
    rank_slice,
    run_ranks,
    single_and_gloo_runs,
    thread_ranks,
)
from zoa_lightning import ZOAModule
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.loop import check_sharded_loaders


def _fake_trainer(world_size: int, rank: int, use_distributed_sampler: bool = False) -> Any:
    connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
    return SimpleNamespace(world_size=world_size, global_rank=rank, _accelerator_connector=connector)


# ---------------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(("size", "batch", "shards"), [(1000, 64, 2), (1000, 43, 2), (100, 10, 3), (64, 64, 4)])
def test_shards_concatenate_to_the_single_process_batches(size: int, batch: int, shards: int) -> None:
    single = [list(b) for b in DataLoader(range(size), batch_size=batch)]
    per_rank = [list(GlobalBatchShardSampler(size, batch, shards, r)) for r in range(shards)]
    assert all(len(batches) == len(single) for batches in per_rank)  # equal batch counts: no rank waits alone
    for g, global_batch in enumerate(single):
        slices = [per_rank[r][g] for r in range(shards)]
        assert [i for s in slices for i in s] == [int(i) for i in global_batch]  # nothing duplicated or dropped
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_shard_sampler_rejects_batches_too_small_torank_slice() -> None:
    with pytest.raises(ValueError, match=r"batch_size=1 is the global batch.*batch_size >= 2"):
        GlobalBatchShardSampler(100, 1, 2, 0)
    with pytest.raises(ValueError, match=r"last global batch of a 1001-image loader holds 1 image"):
        GlobalBatchShardSampler(1001, 100, 2, 0)
    assert list(GlobalBatchShardSampler(6, 2, 2, 1)) == [[1], [3], [5]]  # one image per process is enough
    with pytest.raises(ValueError, match="rank must be"):
        GlobalBatchShardSampler(100, 10, 2, 2)


def test_make_loader_shards_under_a_multi_process_trainer() -> None:
    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    batches = [labels.tolist() for _, labels in make_loader(data, 6, 0, trainer=_fake_trainer(2, 1))]
    assert batches == [[3, 4, 5], [8, 9]]
    assert [len(y) for _, y in make_loader(data, 4, 0, trainer=_fake_trainer(1, 0))] == [4, 4, 2]  # one process
    with pytest.raises(ValueError, match=r"use_distributed_sampler: false"):
        make_loader(data, 6, 0, trainer=_fake_trainer(2, 0, use_distributed_sampler=True))


def test_stream_setup_checks_the_sampler_flag_and_the_global_batch(cache_dir: Path) -> None:
    data = make_stream(cache_dir, batch_size=64)
    data.trainer = _fake_trainer(2, 0, use_distributed_sampler=True)
    with pytest.raises(ValueError, match=r"trainer.use_distributed_sampler: false"):
        data.setup("test")
    data = make_stream(cache_dir, batch_size=1)
    data.trainer = _fake_trainer(2, 0)
    with pytest.raises(ValueError, match=r"batch_size=1 is the global batch"):
        data.setup("test")


def test_module_rejects_unsharded_loaders_and_batchnorm_networks() -> None:
    data = TensorDataset(torch.zeros(10, 1), torch.zeros(10))
    with pytest.raises(ValueError, match="is not sharded"):
        check_sharded_loaders({"r1/fog": DataLoader(data, batch_size=4)}, 2)
    with pytest.raises(ValueError, match="DistributedSampler"):
        check_sharded_loaders([DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0))], 2)
    check_sharded_loaders([make_loader(data, 6, 0, trainer=_fake_trainer(2, 0))], 2)

    network = make_resnet(0)
    network.fc = torch.nn.Sequential(torch.nn.BatchNorm1d(network.fc.in_features), network.fc)  # not synchronised
    module = ZOAModule(network=network)
    module._trainer = _fake_trainer(2, 0)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="BatchNorm1d"):
        module.setup_method(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("estimator", ["spsa", "per_sample", "per_sample+taps"])
def test_sharded_engine_steps_as_one_engine_on_the_global_batch(digits: torch.Tensor, estimator: str) -> None:
    # per_sample: every image's direction is drawn by its global index, so the ranks draw as the single engine does;
    # +taps: the per-tap differences (n, T) are all-reduced instead of the n totals.
    world, batch = 2, 64
    name, _, taps = estimator.partition("+")
    config = ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, detector_min_batch=batch, estimator=name,  # type: ignore[arg-type]
                       tap_attribution=bool(taps))  # fmt: skip
    source = digits[:256].split(batch)
    pool = digits[512:]
    # Clean, then noisy (a shift the detector must see), then an uneven 43-image tail (21 + 22 images).
    stream = [
        pool[:batch],
        pool[batch : 2 * batch],
        corrupt_noise(pool[2 * batch : 3 * batch]),
        corrupt_noise(pool[:batch], seed=1),
    ]
    stream.append(corrupt_noise(pool[3 * batch : 3 * batch + 43], seed=2))

    single = ZOA(make_vit(0), config)
    single.collect_source_statistics(source)
    want = [(single(x), single.bank.theta.clone(), single.bank.alpha.clone(), int(single.bank.count)) for x in stream]
    assert single.counter("stores") >= 1, "the stream should make the single engine store knowledge"

    comm = ThreadAllReduce(world)
    engines = [ZOA(make_vit(0), config, reduce_fn=comm.for_rank(r), rank=r, world_size=world) for r in range(world)]
    got: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]] = [[] for _ in range(world)]

    def rank_work(rank: int) -> None:
        engine = engines[rank]
        engine.collect_source_statistics([rank_slice(x, world, rank) for x in source])
        for x in stream:
            logits = engine(rank_slice(x, world, rank))
            got[rank].append((logits, engine.bank.theta.clone(), engine.bank.alpha.clone(), int(engine.bank.count)))

    run_ranks(rank_work, world)
    assert torch.equal(engines[0].source.mean, single.source.mean)
    assert torch.equal(engines[0].source.std, single.source.std)
    for i, (logits, theta, alpha, count) in enumerate(want):
        r0, r1 = got[0][i], got[1][i]
        # Bit for bit: the loss statistics are computed on the gathered rows, as one engine computes them
        for rank, (_, rank_theta, rank_alpha, _) in enumerate((r0, r1)):
            assert torch.equal(rank_theta, theta), f"rank {rank}'s epsilons differ after batch {i}"
            assert torch.equal(rank_alpha, alpha), f"rank {rank}'s mixing logits differ after batch {i}"
        assert r0[3] == r1[3] == count, f"bank entries differ after batch {i}"
        assert torch.equal(torch.cat([r0[0], r1[0]]), logits), f"predictions differ at batch {i}"
    assert [e["batch"] for e in engines[0].events] == [e["batch"] for e in single.events]


def test_sharded_quantized_engine_steps_bit_for_bit_as_one_engine(digits: torch.Tensor) -> None:
    # On a fake-quantized ViT a last-bit difference in the loss statistics (per-process sums) moved activations across
    # rounding boundaries and the runs drifted apart; the gathered rows keep them identical.
    import copy

    from zoa_lightning.core.quant import quantize_vit

    world, batch = 2, 43  # 21 + 22: uneven slices
    config = ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, detector_min_batch=batch)
    quantized = quantize_vit(make_vit(0), digits[:16], w_bits=4, a_bits=4, search_rounds=1, num_candidates=8)
    source = digits[:172].split(batch)
    pool = digits[512:]
    stream = [corrupt_noise(pool[i * batch : (i + 1) * batch], seed=i // 3) for i in range(9)]

    single = ZOA(copy.deepcopy(quantized), config)
    single.collect_source_statistics(source)
    want = [(single(x), single.bank.theta.clone(), single.bank.alpha.clone()) for x in stream]
    assert float(want[-1][1].abs().max()) > 0, "the single engine should adapt"

    engines, got = thread_ranks([copy.deepcopy(quantized) for _ in range(world)], config, source, stream)
    assert_ranks_step_as_one(want, got, atol=0.0, logits_atol=0.0)
    assert torch.equal(engines[0].source.std, single.source.std)


def test_reduced_elements_per_batch_are_a_few_feature_vectors(digits: torch.Tensor) -> None:
    seen: list[int] = []
    adapter = ZOA(make_vit(0), ZOAConfig(detector_min_batch=16), reduce_fn=lambda t: seen.append(t.numel()) or t)
    adapter.collect_source_statistics([digits[:64]])
    assert adapter.reduce.elements == sum(seen)
    seen.clear()
    adapter(digits[:32])
    features, channels = adapter.loss.dim, adapter.detector.mean.numel()
    # Pass A: detector moments (2C + 2) and loss moments (2F + 2); pass B reuses the detector's and sends the loss's.
    assert seen == [2 * channels + 2, 2 * features + 2, 2 * features + 2]
    assert adapter.reduce.last_batch_calls == 3
    assert adapter.reduce.last_batch_elements == sum(seen)
    assert adapter.reduce.last_batch_bytes == 8 * sum(seen)  # float64
    assert adapter.reduce.last_batch_elements < sum(p.numel() for p in adapter.model.parameters()) / 10


# ---------------------------------------------------------------------------------------------------- Lightning DDP
@pytest.mark.slow  # two spawned gloo processes; the thread-rank tests above check the same equality in seconds
@pytest.mark.ddp
def test_two_gloo_processes_adapt_exactly_as_one(cache_dir: Path, tmp_path: Path) -> None:
    # A 43-image global batch splits 21 + 22: uneven slices. The detector needs 43 images: only the global count has.
    batch, batches = 43, 3
    options = {"lr": 0.005, "spsa_c": 0.05, "domain_t": 0.1, "detector_min_batch": batch}

    want, got = single_and_gloo_runs(
        tmp_path,
        lambda: ZOAModule(network=make_vit(0), **options),
        lambda: make_stream(cache_dir, batch_size=batch),
        batches,
    )

    steps = 3 * batches
    for i in range(steps):
        ref = load_recorded(tmp_path / f"single0_batch{i}.pt")
        r0, r1 = load_recorded(tmp_path / f"ddp0_batch{i}.pt"), load_recorded(tmp_path / f"ddp1_batch{i}.pt")
        assert (len(r0["labels"]), len(r1["labels"])) == (21, 22)
        assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), ref["labels"]), f"batch {i} was not split"
        for key in ("theta", "alpha"):  # bit for bit (one thread per process against two in the single run)
            assert torch.equal(r0[key], ref[key]), f"rank 0's {key} differs after batch {i}"
            assert torch.equal(r1[key], ref[key]), f"rank 1's {key} differs after batch {i}"
        assert r0["count"] == r1["count"] == ref["count"], f"bank entries differ after batch {i}"
        assert [e["batch"] for e in r0["events"]] == [e["batch"] for e in ref["events"]]
        assert torch.equal(torch.cat([r0["logits"], r1["logits"]]), ref["logits"]), f"predictions differ at batch {i}"
    assert ref["count"] >= 2, "the corruption change should store a knowledge entry"
    assert not (tmp_path / f"ddp0_batch{steps}.pt").exists()

    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6)
    rows, ref_rows = load_recorded(tmp_path / "ddp0_rows.pt"), load_recorded(tmp_path / "single0_rows.pt")
    assert [(r["n"], r["batches"]) for r in rows] == [(r["n"], r["batches"]) for r in ref_rows] == [(129, 3)] * 3
    assert [r["acc1"] for r in rows] == pytest.approx([r["acc1"] for r in ref_rows], abs=1e-6)


def test_sharded_batchnorm_network_steps_as_one_engine_on_the_global_batch(digits: torch.Tensor) -> None:
    # Every BatchNorm (adapted or not) normalises with the all-reduced statistics of the global batch.
    world, batch = 2, 32
    config = ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, detector_min_batch=batch)
    source = digits[:128].split(batch)
    pool = digits[512:]
    stream = [pool[:batch], corrupt_noise(pool[batch : 2 * batch]), corrupt_noise(pool[:batch], seed=1)]
    stream.append(corrupt_noise(pool[2 * batch : 2 * batch + 21], seed=2))  # uneven: 10 + 11 images

    single = ZOA(make_resnet(0), config)
    single.collect_source_statistics(source)
    want = [(single(x), single.bank.theta.clone(), single.bank.alpha.clone()) for x in stream]

    networks = [make_resnet(0) for _ in range(world)]
    engines, got = thread_ranks(networks, config, source, stream)
    assert_ranks_step_as_one(want, got)
    assert float(want[-1][1].abs().max()) > 0  # the single engine did adapt
    assert [e["batch"] for e in engines[0].events] == [e["batch"] for e in single.events]
