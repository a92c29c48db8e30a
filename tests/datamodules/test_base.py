import inspect
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from datamodules import CorruptionStreamDataModule, ImageNetCDataModule
from datamodules.base import STREAM_SETTINGS, StreamDataModuleBase


@pytest.mark.parametrize("module", [CorruptionStreamDataModule, ImageNetCDataModule])
def test_every_argument_has_its_help_text_and_the_shared_ones_are_the_bases(module: type[StreamDataModuleBase]) -> None:
    parameters = list(inspect.signature(module.__init__).parameters)[1:]
    assert set(STREAM_SETTINGS) <= set(parameters)
    parser = ArgumentParser()
    parser.add_class_arguments(module, "data")
    helps = {action.dest: action.help for action in parser._actions}
    undocumented = [name for name in parameters if not (helps.get(f"data.{name}") or "").strip()]
    assert undocumented == []
    assert "first stream domain served by ``test_dataloader``" in str(helps["data.start_domain"])  # the base's text


def test_hyperparameters_are_the_data_modules_own_arguments(tmp_path: Path) -> None:
    dm = CorruptionStreamDataModule(corruptions=["fog"], cache_dir=str(tmp_path), seed=3)
    assert list(dm.hparams) == list(inspect.signature(CorruptionStreamDataModule.__init__).parameters)[1:]
    assert (dm.hparams["seed"], dm.hparams["corruptions"], dm.hparams["cache_dir"]) == (3, ["fog"], str(tmp_path))
    assert dm._log_hyperparams is False  # the stream's seed is not the model's: kept out of the logger's hparams
