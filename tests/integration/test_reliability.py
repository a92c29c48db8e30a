"""Runs a user can trust: nothing lost, nothing mixed up, refusals before any work (through the `zoa` command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import datamodules.cache as cache_mod
from callbacks import QuantizationCallback
from cli import ConfigError, main, make_cli, warning_line
from tests.helpers import quick_zoa_config
from zoa_lightning import run_folder
from zoa_lightning.files import checksum_path
from zoa_lightning.run_folder import RunFolderBusy


def _no_data_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any data preparation fails the test: a refusal must come before it."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("data was prepared before the refusal")

    monkeypatch.setattr("datamodules.CorruptionStreamDataModule.prepare_data", refuse)


def _first_domain(tmp_path: Path, cache_dir: Path) -> tuple[Path, Path]:
    """Run the quick config's first domain; its config file and its stream checkpoint."""
    config = quick_zoa_config(tmp_path, cache_dir)
    make_cli(["test", "-c", str(config), "--data.init_args.stop_domain", "1"])
    return config, tmp_path / "run" / "zoa" / "stream-last.ckpt"


def test_a_second_run_into_the_same_folder_stops_before_any_work(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = quick_zoa_config(tmp_path, cache_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util, sys, time; "  # run_folder.py alone: the package takes seconds
         f"spec = importlib.util.spec_from_file_location('run_folder', {run_folder.__file__!r}); "
         "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
         "m.claim_run_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tmp_path / "run" / "zoa")],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        _no_data_work(monkeypatch)
        with pytest.raises(RunFolderBusy, match=rf"run folder {tmp_path / 'run' / 'zoa'} is in use by another run"):
            make_cli(["test", "-c", str(config)])
    finally:
        holder.kill()
        holder.wait()


def test_an_unwritable_run_folder_is_refused_before_any_work(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should go")
    config = quick_zoa_config(tmp_path, cache_dir, default_root_dir=str(blocker / "run"))
    _no_data_work(monkeypatch)
    with pytest.raises(ConfigError, match=rf"cannot write the run folder {blocker / 'run' / 'zoa'}"):
        make_cli(["test", "-c", str(config)])


def test_a_fresh_run_names_an_earlier_run_and_keeps_its_results_and_checkpoint(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli as cli_mod

    config = quick_zoa_config(tmp_path, cache_dir)
    folder = tmp_path / "run" / "zoa"
    make_cli(["test", "-c", str(config), "--data.init_args.stop_domain", "2"])  # an unfinished earlier run
    earlier = (folder / "stream-last.ckpt").read_bytes()
    earlier_results = (folder / "results.json").read_bytes()
    messages: list[str] = []
    monkeypatch.setattr(cli_mod, "rank_zero_info", messages.append)

    class Killed(Exception):
        pass

    def kill(*_: Any, **__: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:  # the fresh run is killed in its first domain
        patch.setattr("zoa_lightning.methods.base.StreamModule.adapt_step", kill)
        with pytest.raises(Killed):
            make_cli(["test", "-c", str(config)])
    assert any(f"{folder} holds an earlier run" in m and "resume it with --ckpt_path" in m for m in messages)
    assert (folder / "stream-last.ckpt").read_bytes() == earlier, "nothing of the earlier run was touched"
    assert (folder / "results.json").read_bytes() == earlier_results

    make_cli(["test", "-c", str(config)])  # a fresh run that finishes
    assert (folder / "stream-last.previous.ckpt").read_bytes() == earlier, "the earlier checkpoint is kept aside"
    assert checksum_path(folder / "stream-last.previous.ckpt").is_file()
    assert (folder / "results.json").read_bytes() != earlier_results


def test_resuming_a_finished_stream_writes_results_it_lacks(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = quick_zoa_config(tmp_path, cache_dir)
    folder = tmp_path / "run" / "zoa"
    make_cli(["test", "-c", str(config)])
    written = (folder / "results.json").read_text()
    (folder / "results.json").unlink()  # lost, e.g. killed between the last checkpoint and the results
    make_cli(["test", "-c", str(config), "--ckpt_path", str(folder / "stream-last.ckpt")])
    again = yaml.safe_load((folder / "results.json").read_text())
    assert again["domains"] == yaml.safe_load(written)["domains"]
    assert again["fingerprint"]["method"]["class"] == "ZOAModule"


def test_a_damaged_checkpoint_of_the_same_size_is_refused(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, ckpt = _first_domain(tmp_path, cache_dir)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the size is unchanged
    ckpt.write_bytes(bytes(data))
    _no_data_work(monkeypatch)
    with pytest.raises(ConfigError, match=r"does not match its checksum .*: the file is damaged"):
        make_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt)])
    checksum_path(ckpt).unlink()
    with pytest.raises(ConfigError, match="has no readable checksum file"):
        make_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt)])


def test_resuming_at_another_precision_is_refused_before_quantizing(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, ckpt = _first_domain(tmp_path, cache_dir)  # a float run
    quantized = yaml.safe_load(config.read_text())
    quantized["trainer"]["callbacks"].insert(0, {"class_path": "callbacks.QuantizationCallback"})
    config.write_text(yaml.safe_dump(quantized))

    def calibrate(*_: Any, **__: Any) -> None:
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(QuantizationCallback, "_calibrate", calibrate)
    monkeypatch.setattr(QuantizationCallback, "_load", calibrate)
    with pytest.raises(
        ConfigError, match=r"differs from the run that wrote it in precision: checkpoint 'float', this run"
    ):
        make_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt)])


def test_resuming_another_corruption_list_is_refused_before_building_its_cache(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, ckpt = _first_domain(tmp_path, cache_dir)

    def build(*_: Any, **__: Any) -> None:
        raise AssertionError("a corruption cache was built before refusing")

    monkeypatch.setattr(cache_mod, "corrupt_images", build)
    with pytest.raises(ConfigError, match=r"differs from the run that wrote it in data\.corruptions: checkpoint"):
        make_cli(["test", "-c", str(config), "--data.init_args.corruptions", "[fog]", "--ckpt_path", str(ckpt)])


def test_an_unsupported_bit_width_is_one_line_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = tmp_path / "bits.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "callbacks.QuantizationCallback", "init_args": {"bits": 17}}]}}))  # fmt: skip
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", str(demo), "-c", str(overlay)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("zoa: error: QuantizationCallback bits=17 is not a supported bit width")


def test_warnings_print_as_one_line() -> None:
    line = warning_line(RuntimeWarning("ZOA skipped batch 3"), RuntimeWarning, "/x/transaction.py", 106, "warn(...)")
    assert line == "RuntimeWarning: ZOA skipped batch 3\n"


def test_a_batch_of_another_dtype_is_refused_with_the_fix(cache_dir: Path, tmp_path: Path) -> None:
    cli = make_cli(["-c", str(quick_zoa_config(tmp_path, cache_dir))], run=False)
    module = cli.model
    module.setup_method(cli.datamodule)
    for dtype in (torch.uint8, torch.float16, torch.float64):
        with pytest.raises(ValueError, match=rf"the network takes torch.float32 images, got a {dtype} batch"):
            module.adapt_step(torch.zeros(2, 3, 32, 32, dtype=dtype))
