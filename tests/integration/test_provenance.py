"""Runs record what they ran on: ``run_info()`` (and so ``results.json``) names the data set and the weights, and the
shipped demo weights meeting another data set are warned about at setup."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from callbacks import ResultsCallback
from datamodules import CorruptionStreamDataModule
from tests.helpers import make_stream, make_trainer, make_vit
from zoa_lightning import NoAdaptModule, ZOAModule
from zoa_lightning.demo.models import DEMO_MODEL_NAMES

SHIPPED_VIT = Path(__file__).resolve().parents[2] / "zoa_lightning" / "demo" / "weights" / "demo_vit.safetensors"


def test_results_json_names_the_data_set_and_the_shipped_weights(cache_dir: Path, tmp_path: Path) -> None:
    module = ZOAModule(network="demo_vit", lr=0.0, lr_alpha=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the embedded MNIST with its own weights: no warning
        warnings.filterwarnings("ignore", message=".*(does not have many workers|logging interval).*")
        make_trainer([ResultsCallback(out_dir=tmp_path, plot=False, table=False)], batches=1).test(
            module, datamodule=make_stream(cache_dir)
        )
    info = module.run_info()
    assert info["dataset"] == "mnist"
    assert info["weights"] == "shipped demo weights"
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["dataset"] == "mnist"
    assert summary["weights"] == "shipped demo weights"


def test_weights_label_of_every_kind_of_network() -> None:
    assert "demo_vit" in DEMO_MODEL_NAMES
    assert NoAdaptModule(network="demo_vit").run_info()["weights"] == "shipped demo weights"
    assert NoAdaptModule(network="demo_vit", weights=str(SHIPPED_VIT)).run_info()["weights"] == str(SHIPPED_VIT)
    assert NoAdaptModule(network=make_vit(0)).run_info()["weights"] == "given network module"
    assert NoAdaptModule(network=make_vit(0)).run_info()["dataset"] is None  # no data module yet


def _folder(root: Path) -> Path:
    """Ten classes of three random 8-pixel images each."""
    rng = np.random.default_rng(0)
    for label in range(10):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / f"c{label}" / f"{i}.png")
    return root


def _folder_stream(folder: Path, cache: Path) -> CorruptionStreamDataModule:
    return CorruptionStreamDataModule(dataset=str(folder), corruptions=["gaussian_noise"], batch_size=4,
                                      num_source_images=None, cache_dir=str(cache))  # fmt: skip


def test_shipped_demo_weights_on_a_folder_warn_with_the_training_command(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "my_digits")
    module = NoAdaptModule(network="demo_vit")
    with pytest.warns(UserWarning, match=r"shipped demo weights.*MNIST") as caught:
        make_trainer(batches=1).test(module, datamodule=_folder_stream(folder, tmp_path / "cache"))
    message = next(str(w.message) for w in caught if "shipped demo weights" in str(w.message))
    assert f"python -m zoa_lightning.demo.train --model demo_vit --dataset {folder}" in message
    assert module.run_info()["dataset"] == str(folder.resolve())


def test_own_weights_on_a_folder_do_not_warn(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "my_digits")
    module = NoAdaptModule(network="demo_vit", weights=str(SHIPPED_VIT))  # stands in for weights trained on it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(batches=1).test(module, datamodule=_folder_stream(folder, tmp_path / "cache"))
    assert not [w for w in caught if "shipped demo weights" in str(w.message)]
    assert module.run_info()["weights"] == str(SHIPPED_VIT)
