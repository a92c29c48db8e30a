"""Every method's adapter, discovered: each ``Adapter`` subclass in ``zoa_lightning.core.methods``, and ZOA's engine.

Nothing here lists the methods: a new adapter file is found, built with its defaults on a tiny ViT and run on a batch,
and must count exactly the forward passes it says a batch costs (``passes_per_batch``), keep its network in eval mode,
round-trip its state and report plain run info; its optional capabilities are exercised when it has them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import zoa_lightning.core.methods as methods_package
from tests.helpers import make_vit
from zoa_lightning.core import ZOA
from zoa_lightning.core.methods import Adapter
from zoa_lightning.core.protocols import BankAdapter, SourceStatisticsAdapter


def _method_modules() -> list[str]:
    return [f"{methods_package.__name__}.{m.name}" for m in pkgutil.iter_modules(methods_package.__path__)]


def _adapter_classes() -> list[type[Adapter]]:
    found: list[type[Adapter]] = [ZOA]
    for name in _method_modules():
        module = importlib.import_module(name)
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Adapter) and cls is not Adapter and cls.__module__ == name
        ]
    return found


ADAPTERS = _adapter_classes()


def test_every_method_file_is_discovered() -> None:
    names = {cls.__name__ for cls in ADAPTERS}
    assert {"ZOA", "NoAdapt", "NormAdapt", "T3A", "FOA", "Tent"} <= names


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.__name__)
def test_every_adapter_counts_the_passes_it_claims_and_round_trips_its_state(cls: type[Adapter]) -> None:
    g = torch.Generator().manual_seed(0)
    net = make_vit(0)
    adapter = cls(net)
    assert adapter.model is net
    assert (adapter.forward_passes, adapter.batches, adapter.skipped_batches) == (0, 0, 0)
    if isinstance(adapter, SourceStatisticsAdapter):
        adapter.collect_source_statistics([torch.rand(8, 3, 32, 32, generator=g)])
    adapter.train()
    assert not net.training, "an adapter keeps its network in eval mode"
    images = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        logits = adapter(images)
    assert logits.shape == (4, 10)
    assert (adapter.batches, adapter.forward_passes) == (1, adapter.passes_per_batch)
    info = adapter.run_info()
    assert all(isinstance(v, bool | int | float | str) for v in info.values()), info
    if isinstance(adapter, BankAdapter):
        assert float(adapter.bank.mixing_weights().sum()) == pytest.approx(1.0)
    restored = cls(make_vit(0))
    restored.load_state_dict(adapter.state_dict())
    assert (restored.batches, restored.forward_passes) == (1, adapter.passes_per_batch)
