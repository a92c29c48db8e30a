"""Graphs of the tiny test networks, exported once per test session (float, INT8, plain)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import make_resnet, make_vit
from zoa_lightning.core.layout import resolve_layout

GraphFactory = Callable[[str, str], Path]


@pytest.fixture(scope="session")
def graph(tmp_path_factory: pytest.TempPathFactory, digits: torch.Tensor) -> GraphFactory:
    """``graph(net, precision)``: the graph of ``make_vit(0)``/``make_resnet(0)`` (``net`` "vit", "resnet",
    "vit-plain", "resnet-plain"), ``precision`` "float" or "int8", built on first use (calibrated on 32 digits)."""
    from zoa_lightning.core.runtime.graphs import write_graphs

    folder = tmp_path_factory.mktemp("graphs")
    built: dict[str, dict[str, Path]] = {}

    def get(net: str, precision: str) -> Path:
        if net not in built:
            name, _, plain = net.partition("-")
            model = make_vit(0) if name == "vit" else make_resnet(0)
            layout = None if plain else resolve_layout(model)
            built[net] = write_graphs(model, layout, digits[:32], folder, net, sidecar=False)
        return built[net][precision]

    return get
