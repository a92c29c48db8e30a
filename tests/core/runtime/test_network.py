"""The engine on an ONNX Runtime float graph follows the engine on the torch network, batch by batch."""

from __future__ import annotations

import copy
import pickle
import threading
from typing import Any

import pytest
import torch

from tests.core.runtime.conftest import GraphFactory
from tests.helpers import ThreadAllReduce, corrupt_noise, make_resnet, make_vit
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.batch_norm import BatchStatistics
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.runtime.network import RuntimeNetwork

MAKE = {"vit": make_vit, "resnet": make_resnet}
PER_SAMPLE = {"estimator": "per_sample", "perturbation": "rademacher", "normalize_step": True, "lr": 0.05,
              "spsa_c": 0.1, "tap_attribution": True}  # fmt: skip


def _stream(digits: torch.Tensor, batch: int, batches: int) -> list[torch.Tensor]:
    """``batches`` batches of digits: clean, then noisy from a third of the way on (a shift to detect and store)."""
    pool = digits[256:]
    out = []
    for i in range(batches):
        images = pool[(i * batch) % (len(pool) - batch) :][:batch]
        out.append(corrupt_noise(images, seed=i) if i >= batches // 3 else images)
    return out


@pytest.mark.parametrize(
    ("net", "batch", "options"),
    [
        ("vit", 32, {"mode": "reference"}),
        ("vit", 32, {"mode": "corrected", "loss_on_shifted": True, **PER_SAMPLE}),
        ("resnet", 32, {"mode": "reference"}),
        ("resnet", 4, {}),  # pooled small batches: the BatchNorm prior, recorded statistics and running estimates
    ],
    ids=["vit-reference", "vit-per-sample", "resnet-reference", "resnet-small-batches"],
)
def test_runtime_float_graph_follows_the_torch_engine(
    graph: GraphFactory, digits: torch.Tensor, net: str, batch: int, options: dict[str, Any]
) -> None:
    config = ZOAConfig(**{"lr": 0.005, "spsa_c": 0.05, "domain_t": 0.1, "detector_min_batch": 32, **options})
    engines = [ZOA(MAKE[net](0), config), ZOA(RuntimeNetwork(graph(net, "float")), config)]
    for engine in engines:
        engine.collect_source_statistics(digits[:128].split(32))
    worst, same, images_seen = 0.0, 0, 0
    for i, images in enumerate(_stream(digits, batch, 40)):
        want, got = (engine(images) for engine in engines)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=lambda m, i=i: f"batch {i}: {m}")
        same, images_seen = same + int((got.argmax(1) == want.argmax(1)).sum()), images_seen + len(images)
        theta = [e.bank.theta for e in engines]
        worst = max(worst, float((theta[0] - theta[1]).abs().max()))
        torch.testing.assert_close(theta[1], theta[0], rtol=0, atol=1e-5, msg=lambda m, i=i: f"batch {i}: {m}")
        torch.testing.assert_close(engines[1].bank.alpha, engines[0].bank.alpha, rtol=0, atol=1e-5)
    counters = [{k: v for k, v in e.state_dict().items() if k.startswith("counters.")} for e in engines]
    assert counters[0] == counters[1]
    assert int(counters[0]["counters.stores"]) >= 1, "the noise should make both engines store knowledge"
    assert [e["batch"] for e in engines[0].events] == [e["batch"] for e in engines[1].events]
    torch.testing.assert_close(
        engines[1].batch_statistics.running, engines[0].batch_statistics.running, rtol=1e-4, atol=1e-5
    )
    assert float(engines[0].bank.theta.abs().max()) > 100 * worst, "the engines adapted (far more than they differ)"
    assert same >= 0.99 * images_seen  # (random networks have near ties: logits within 1e-4 may still flip one)


def test_engine_state_round_trips_on_the_runtime_backend(graph: GraphFactory, digits: torch.Tensor) -> None:
    config = ZOAConfig(lr=0.005, spsa_c=0.05, detector_min_batch=32)
    first, second = (ZOA(RuntimeNetwork(graph("vit", "int8")), config) for _ in range(2))
    first.collect_source_statistics(digits[:128].split(32))
    stream = _stream(digits, 32, 6)
    for images in stream[:3]:
        first(images)
    assert not any(k.startswith("model.") for k in first.state_dict())  # the graph is not state
    second.load_state_dict(first.state_dict())
    for images in stream[3:]:
        assert torch.equal(first(images), second(images))


def test_the_first_order_oracle_and_sharded_batchnorm_statistics_are_refused(graph: GraphFactory) -> None:
    with pytest.raises(ValueError, match="back-propagates through the network, which an ONNX Runtime session cannot"):
        ZOA(RuntimeNetwork(graph("vit", "float")), ZOAConfig(estimator="first_order"))
    with pytest.raises(ValueError, match=r"summed over the 2 processes .* run it on one process"):
        ZOA(RuntimeNetwork(graph("resnet", "float")), ZOAConfig(), world_size=2)
    runtime = RuntimeNetwork(graph("vit", "float"))
    ZOA(runtime, ZOAConfig())
    with pytest.raises(ValueError, match="already adapted by an engine"):
        ZOA(runtime, ZOAConfig())
    ZOA(copy.deepcopy(runtime), ZOAConfig())  # a copy shares the session, not the engine


def test_a_layout_other_than_the_graphs_is_refused(graph: GraphFactory) -> None:
    import dataclasses

    layout = resolve_layout(make_vit(0))
    other = dataclasses.replace(layout, norms=layout.norms[:2])
    with pytest.raises(ValueError, match=r"the graph was exported for adapted layers \[.*\], but this run adapts"):
        ZOA(RuntimeNetwork(graph("vit", "float")), ZOAConfig(), layout=other)


def test_runtime_network_pickles_without_its_session(graph: GraphFactory, digits: torch.Tensor) -> None:
    runtime = RuntimeNetwork(graph("vit", "int8"))
    clone = pickle.loads(pickle.dumps(runtime))
    assert clone.session is not runtime.session
    assert torch.equal(clone(digits[:3]), runtime(digits[:3]))
    assert dict(runtime.state_dict()) == {}
    assert "int8" in repr(runtime)
    statistics = BatchStatistics()
    with pytest.raises(ValueError, match="plain graph"):
        RuntimeNetwork(graph("vit-plain", "float")).bind(statistics, lambda *_: None, 1, "spsa")


@pytest.mark.parametrize("precision", ["float", "int8"])
def test_two_ranks_on_the_runtime_backend_adapt_as_one(
    graph: GraphFactory, digits: torch.Tensor, precision: str
) -> None:
    # INT8: activations that differ by float rounding (a 21-row call is not bit-identical to a 43-row one) fall into
    # neighbouring quantization bins now and then; a bin moves the perturbed loss by ~1e-5, so the adapted values drift
    # apart batch by batch (6e-4 after 9 batches here) while both ranks stay identical. The float graph is exact.
    logits_atol, theta_atol = (1e-4, 1e-5) if precision == "float" else (2e-2, 2e-3)
    config = ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, detector_min_batch=43)
    stream = _stream(digits, 43, 9)  # 43 images: 21 + 22 per rank
    single = ZOA(RuntimeNetwork(graph("vit", precision)), config)
    single.collect_source_statistics(digits[:128].split(32))
    want = [(single(x), single.bank.theta.clone()) for x in stream]
    comm = ThreadAllReduce(2)
    engines = [ZOA(RuntimeNetwork(graph("vit", precision)), config, reduce_fn=comm.for_rank(r), rank=r, world_size=2)
               for r in range(2)]  # fmt: skip
    got: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            engine = engines[rank]
            engine.collect_source_statistics([x[x.shape[0] * rank // 2 : x.shape[0] * (rank + 1) // 2]
                                              for x in digits[:128].split(32)])  # fmt: skip
            for x in stream:
                got[rank].append((engine(x[21 * rank : 21 + 22 * rank]), engine.bank.theta.clone()))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (logits, theta) in enumerate(want):
        assert torch.equal(got[0][i][1], got[1][i][1]), f"ranks differ after batch {i}"
        torch.testing.assert_close(got[0][i][1], theta, rtol=0, atol=theta_atol)
        torch.testing.assert_close(torch.cat([got[0][i][0], got[1][i][0]]), logits, rtol=0, atol=logits_atol)
    assert single.counter("stores") >= 1
    assert [e["batch"] for e in engines[0].events] == [e["batch"] for e in single.events]
