"""Every core adapter follows the StreamAdapter protocol and offers exactly the capabilities it claims.

Also: the docstring examples of ``zoa_lightning.core.methods`` run, and the old ``zoa_lightning.core.baselines``
import path still gives the same objects.
"""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Callable

import pytest
from torch import nn

from tests.conftest import make_vit
from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.core.methods import FOA, T3A, NoAdapt, NormAdapt, Tent
from zoa_lightning.core.protocols import (
    BankAdapter,
    ReportingAdapter,
    RollbackAdapter,
    SourceStatisticsAdapter,
    StreamAdapter,
    missing_members,
)

ADAPTERS: dict[str, tuple[Callable[[nn.Module], object], set[type]]] = {
    # name: (builder, the optional capabilities it has)
    "no_adapt": (NoAdapt, set()),
    "norm_adapt": (NormAdapt, {ReportingAdapter}),
    "t3a": (lambda net: T3A(net, filter_k=2), {ReportingAdapter}),
    "foa": (lambda net: FOA(net, popsize=2), {SourceStatisticsAdapter}),
    "tent": (Tent, {ReportingAdapter, RollbackAdapter}),
    "zoa": (lambda net: ZOA(net, ZOAConfig()), {SourceStatisticsAdapter, RollbackAdapter, BankAdapter}),
}
CAPABILITIES = (SourceStatisticsAdapter, RollbackAdapter, BankAdapter, ReportingAdapter)


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_is_a_stream_adapter_with_its_capabilities(name: str) -> None:
    build, capabilities = ADAPTERS[name]
    net = make_vit(0)
    adapter = build(net)
    assert isinstance(adapter, StreamAdapter), missing_members(adapter, StreamAdapter)
    assert adapter.model is net
    assert adapter.forward_passes == 0
    assert {c for c in CAPABILITIES if isinstance(adapter, c)} == capabilities
    assert getattr(adapter, "requires_autograd", False) is (name == "tent")


def test_missing_members_names_what_an_object_lacks() -> None:
    assert missing_members(object(), StreamAdapter) == ["forward_passes", "__call__", "model"]
    assert missing_members(NoAdapt(nn.Linear(2, 2)), StreamAdapter) == []


@pytest.mark.parametrize("module", ["no_adapt", "norm_adapt", "t3a", "foa", "tent"])
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"zoa_lightning.core.methods.{module}"), verbose=False)
    assert result.failed == 0


def test_the_old_core_baselines_path_reexports_the_same_objects() -> None:
    old = importlib.import_module("zoa_lightning.core.baselines")
    new = importlib.import_module("zoa_lightning.core.methods")
    assert old.__all__
    assert all(getattr(old, name) is getattr(new, name) for name in old.__all__)
