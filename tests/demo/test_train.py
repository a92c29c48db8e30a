"""`python -m zoa_lightning.demo.train` on an image folder: the stream's split, the folder's classes, a user path."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import make_cli
from datamodules import CorruptionStreamDataModule
from zoa_lightning.data import load_mnist_split
from zoa_lightning.demo import load_demo_model
from zoa_lightning.demo.recipes import load_training_data
from zoa_lightning.demo.train import DEFAULT_OUT, _parse_args, main

CLASSES = 3
PER_CLASS = 14  # 42 images: 34 training (enough for 32 calibration images), 8 test


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/<digit>/*.png``: the first MNIST training-part images of the digits 0, 1 and 2, as 28-px PNGs."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    images, labels, _, _ = load_mnist_split(28)
    for digit in range(CLASSES):
        (root / f"digit{digit}").mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == digit)[:PER_CLASS]):
            Image.fromarray(np.asarray(images[index])).save(root / f"digit{digit}" / f"{i:02d}.png")
    return root


@pytest.fixture
def _restore_torch_globals() -> Iterator[None]:
    """`main` sets torch's thread count and deterministic mode for the whole process; undo it after the test."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_default_output_is_a_user_folder_not_the_package() -> None:
    out = _parse_args(["--model", "demo_vit"]).out
    assert out == DEFAULT_OUT == Path("runs") / "demo-weights"
    assert not out.is_absolute()


def test_training_data_is_the_stream_split_with_the_folder_classes(folder: Path) -> None:
    data = load_training_data(str(folder))
    stream = CorruptionStreamDataModule(dataset=str(folder), image_size=32).clean_split()
    for got, want in zip(
        (data.train_images, data.train_labels, data.test_images, data.test_labels), stream, strict=True
    ):
        assert np.array_equal(got, want)
    assert data.num_classes == CLASSES
    assert (len(data.train_labels), len(data.test_labels)) == (34, 8)
    assert "for testing" in data.description


@pytest.mark.usefixtures("_restore_torch_globals")
def test_train_on_a_folder_then_adapt_with_the_printed_command(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "weights"
    with caplog.at_level(logging.INFO, logger="zoa_lightning.demo.train"):
        (record,) = main(["--model", "demo_vit", "--dataset", str(folder), "--epochs", "1", "--out", str(out)])
    weights = out / "demo_vit.safetensors"
    assert record["num_classes"] == CLASSES
    assert json.loads((out / "demo_vit.json").read_text())["dataset"] == str(folder)
    assert load_demo_model("demo_vit", weights, num_classes=CLASSES).head.out_features == CLASSES

    (command,) = [line.strip() for r in caplog.records for line in r.getMessage().splitlines() if "zoa test" in line]
    args = shlex.split(command)
    assert args[:4] == ["zoa", "test", "-c", "configs/demo.yaml"]
    assert f"--model.init_args.weights {weights}" in command
    assert f"--data.init_args.dataset {folder}" in command

    # The printed command adapts the trained model on the folder's corruption stream (one batch, one cheap corruption;
    # the quantization callback is left out to keep the test short: the network is the trained float model).
    cli = make_cli(
        [
            *args[1:],
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--data.init_args.corruptions",
            "[brightness]",
            "--trainer.limit_test_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.callbacks",
            "[{class_path: callbacks.ResultsCallback, init_args: {plot: false, table: false}}]",
        ]
    )
    (row,) = cli.model.stream_results()
    assert row["domain"] == "r1/brightness"
    assert row["n"] == 8
    assert cli.model.num_classes == CLASSES
    assert (tmp_path / "run" / "zoa" / "results.json").is_file()
