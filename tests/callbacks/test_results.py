"""ResultsCallback: files written at the end of ``trainer.test``, protocol check, state, plots."""

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

import callbacks.results as results_mod
from callbacks.results import ResultsCallback
from tests.helpers import RESULT_ROWS, RUN_INFO, make_trainer
from zoa_lightning.core.protocols import ResultsModule
from zoa_lightning.reporting import ROW_COLUMNS, RUN_COLUMNS, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class StreamModel(BoringModel):
    def __init__(self, rows: list[dict[str, Any]] | None = None, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._rows = RESULT_ROWS if rows is None else rows
        self._info = RUN_INFO if info is None else info

    def stream_results(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._rows]

    def run_info(self) -> dict[str, Any]:
        return dict(self._info)


class HalfStreamModel(BoringModel):
    def stream_results(self) -> list[dict[str, Any]]:
        return []


def _trainer(root: Path, *cbs: ResultsCallback) -> Trainer:
    return make_trainer(list(cbs), batches=1, default_root_dir=root)


def test_writes_json_csv_png_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cb = ResultsCallback(out_dir=out)
    _trainer(tmp_path, cb).test(StreamModel())

    data = json.loads((out / "results.json").read_text())
    summary = data["summary"]
    assert list(summary)[:15] == ["method", "model", "bits", "mean_acc1", "mean_acc5", "domains", "samples",
                                  "batches", "forward_passes", "forward_passes_per_batch", "skipped_batches", "seconds",
                                  "seconds_per_batch", "peak_memory_mb", "memory_kind"]  # fmt: skip
    assert (summary["method"], summary["model"], summary["bits"], summary["seed"]) == ("zoa", "test_vit", "W8A8", 7)
    assert summary["mean_acc1"] == pytest.approx(55.0)
    assert summary["mean_acc5"] == pytest.approx(81.25)
    assert (summary["domains"], summary["samples"], summary["batches"], summary["forward_passes"]) == (4, 800, 16, 48)
    assert summary["forward_passes_per_batch"] == pytest.approx(3.0)
    # Wall time is the callback's own measurement, not the rows' sum (2 s).
    assert 0 < summary["seconds"] < 2.0
    assert summary["seconds_per_batch"] == pytest.approx(summary["seconds"] / 16, abs=1e-6)
    assert summary["memory_kind"] == "cpu_max_rss"
    assert summary["peak_memory_mb"] > 1
    assert data["domains"] == RESULT_ROWS

    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == (*ROW_COLUMNS, *RUN_COLUMNS)
        csv_rows = list(reader)
    assert [r["domain"] for r in csv_rows] == [r["domain"] for r in RESULT_ROWS]
    assert [float(r["acc1"]) for r in csv_rows] == [r["acc1"] for r in RESULT_ROWS]
    assert {(r["method"], r["model"], r["bits"]) for r in csv_rows} == {("zoa", "test_vit", "W8A8")}

    png = (out / "accuracy.png").read_bytes()
    assert len(png) > 1000
    assert png.startswith(PNG_MAGIC)

    printed = capsys.readouterr().out
    assert "r2/fog" in printed
    assert "mean" in printed
    assert "55.00" in printed
    assert "81.25" in printed


def test_prefix_no_plot_no_table_and_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: list[str] = []
    monkeypatch.setattr(results_mod, "rank_zero_info", messages.append)
    cb = ResultsCallback(out_dir=str(tmp_path / "a" / "b"), filename_prefix="zoa_", plot=False, table=False)
    _trainer(tmp_path, cb).test(StreamModel())

    assert _files(tmp_path / "a" / "b") == ["zoa_results.csv", "zoa_results.json"]
    assert "r1/fog" not in capsys.readouterr().out
    assert len(messages) == 1
    assert str(tmp_path / "a" / "b" / "zoa_results.json") in messages[0]
    assert "zoa_results.csv" in messages[0]


def test_files_are_overwritten(tmp_path: Path) -> None:
    _trainer(tmp_path, ResultsCallback(out_dir=tmp_path, plot=False, table=False)).test(StreamModel())
    _trainer(tmp_path, ResultsCallback(out_dir=tmp_path, plot=False, table=False)).test(
        StreamModel(rows=RESULT_ROWS[:1])
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["domains"] == 1
    assert data["summary"]["mean_acc1"] == pytest.approx(50.0)


def test_protocol_is_checked_in_setup(tmp_path: Path) -> None:
    assert isinstance(StreamModel(), ResultsModule)
    assert not isinstance(BoringModel(), ResultsModule)
    with pytest.raises(TypeError, match=r"BoringModel lacks \[.stream_results., .run_info.\]"):
        _trainer(tmp_path, ResultsCallback(out_dir=tmp_path)).test(BoringModel())
    with pytest.raises(TypeError, match=r"HalfStreamModel lacks \[.run_info.\]$"):
        _trainer(tmp_path, ResultsCallback(out_dir=tmp_path)).test(HalfStreamModel())
    assert not list(tmp_path.glob("results.*"))


def test_run_info_without_required_keys_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run_info\(\) lacks the keys \['bits'\]"):
        _trainer(tmp_path, ResultsCallback(out_dir=tmp_path)).test(StreamModel(info={"method": "m", "model": "x"}))


def test_no_finished_domains_warns_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no finished domains"):
        _trainer(tmp_path, ResultsCallback(out_dir=out)).test(StreamModel(rows=[]))
    assert _files(out) == []  # the folder was claimed (made and checked writable) up front, nothing written


def test_state_dict_round_trip_and_state_key() -> None:
    cb = ResultsCallback(out_dir="runs/a")
    cb.load_state_dict({"elapsed_seconds": 12.5})
    assert cb.state_dict() == {"elapsed_seconds": 12.5}
    other = ResultsCallback(out_dir="runs/a")
    other.load_state_dict(cb.state_dict())
    assert other.state_dict() == cb.state_dict()
    assert "runs/a" in cb.state_key
    assert cb.state_key == other.state_key
    assert cb.state_key != ResultsCallback(out_dir="runs/b").state_key
    assert cb.state_key != ResultsCallback(out_dir="runs/a", filename_prefix="x_").state_key


def test_resume_from_checkpoint_accumulates_seconds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cb = ResultsCallback(out_dir=out, plot=False, table=False)
    trainer = _trainer(tmp_path, cb)
    model = StreamModel()
    trainer.test(model)
    first = json.loads((out / "results.json").read_text())["summary"]["seconds"]
    assert cb.state_dict()["elapsed_seconds"] == pytest.approx(first, abs=1e-6)  # the file keeps microseconds

    ckpt_path = tmp_path / "stream.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["callbacks"][cb.state_key] == {"elapsed_seconds": pytest.approx(first, abs=1e-6)}
    ckpt["callbacks"][cb.state_key]["elapsed_seconds"] = 1000.0
    torch.save(ckpt, ckpt_path)

    resumed = ResultsCallback(out_dir=out, plot=False, table=False)
    _trainer(tmp_path, resumed).test(model, ckpt_path=ckpt_path)
    seconds = json.loads((out / "results.json").read_text())["summary"]["seconds"]
    assert 1000.0 < seconds < 1010.0

    # A fresh test with the same instance starts again at zero.
    _trainer(tmp_path, resumed).test(model)
    assert json.loads((out / "results.json").read_text())["summary"]["seconds"] < 10.0


def test_init_validation_and_cli_arguments() -> None:
    with pytest.raises(ValueError, match="path separator"):
        ResultsCallback(filename_prefix="a/b")
    parser = ArgumentParser()
    parser.add_class_arguments(ResultsCallback, "results")
    assert "Folder for the result files" in parser.format_help()
    cfg = parser.parse_args(["--results.out_dir=runs/x", "--results.plot=false", "--results.filename_prefix=zoa_"])
    cb = parser.instantiate(cfg).results
    assert isinstance(cb, ResultsCallback)
    assert (cb.out_dir, cb.filename_prefix, cb.plot, cb.table) == (Path("runs/x"), "zoa_", False, True)
    assert math.isfinite(cb.elapsed_seconds)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not the run folder's lock file


def test_an_older_runs_results_stay_until_a_new_run_has_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_results(RESULT_ROWS, RUN_INFO, out)  # an older run: json, csv and png
    older = {name: (out / name).read_bytes() for name in _files(out)}
    cb = ResultsCallback(out_dir=out, plot=False, table=False)

    class Failing(StreamModel):
        def test_step(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("crashed before the first domain finished")

    with pytest.raises(RuntimeError, match="crashed"):
        _trainer(tmp_path, cb).test(Failing())
    assert {name: (out / name).read_bytes() for name in _files(out)} == older, "a crashed run must not lose them"
    _trainer(tmp_path, ResultsCallback(out_dir=out, plot=False, table=False)).test(StreamModel(rows=RESULT_ROWS[:1]))
    assert _files(out) == ["results.csv", "results.json"]  # replaced whole (no plot asked), no temporary files left
    assert json.loads((out / "results.json").read_text())["summary"]["domains"] == 1


def test_rolled_back_batches_show_in_the_table_and_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{**row, "skipped_batches": 2 if i == 1 else 0} for i, row in enumerate(RESULT_ROWS)]
    with pytest.warns(UserWarning, match="rolled back its adaptation on 2 batch"):
        _trainer(tmp_path, ResultsCallback(out_dir=tmp_path / "o")).test(StreamModel(rows))
    printed = capsys.readouterr().out
    assert "skipped" in printed
    assert "2 batch(es) rolled back" in printed
    assert json.loads((tmp_path / "o" / "results.json").read_text())["summary"]["skipped_batches"] == 2
