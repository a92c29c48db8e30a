"""zoa_lightning.reporting: the row and summary schema, the writers, the tables and the plot (no Lightning)."""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
from rich.console import Console

from tests.helpers import RESULT_ROWS, RUN_INFO, domain_row
from zoa_lightning import reporting
from zoa_lightning.reporting import (
    COMPARISON_COLUMNS,
    COMPARISON_FILES,
    ROW_COLUMNS,
    RUN_COLUMNS,
    SUMMARY_KEYS,
    DomainRow,
    RunSummary,
    plot_accuracy,
    results_table,
    summarize,
    write_comparison,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_columns_are_the_dataclass_fields() -> None:
    assert ROW_COLUMNS == ("index", "round", "corruption", "domain", "acc1", "acc5", "n", "batches",
                           "forward_passes", "skipped_batches", "seconds")  # fmt: skip
    assert SUMMARY_KEYS[:3] == RUN_COLUMNS
    assert tuple(f.name for f in dataclasses.fields(RunSummary) if f.name != "extras") == SUMMARY_KEYS
    assert set(COMPARISON_COLUMNS) <= set(SUMMARY_KEYS)
    assert COMPARISON_FILES == ("comparison.md", "comparison.csv", "comparison.png")


def test_domain_row_casts_keeps_extras_and_round_trips() -> None:
    raw = {**RESULT_ROWS[0], "acc1": torch.tensor(50.0), "n": torch.tensor(100), "lr": 0.5}
    parsed = DomainRow.from_mapping(raw)
    assert (parsed.acc1, parsed.n, parsed.extras) == (50.0, 100, {"lr": 0.5})
    assert type(parsed.acc1) is float
    assert type(parsed.n) is int
    assert list(parsed.as_dict()) == [*ROW_COLUMNS, "lr"]
    assert DomainRow.from_mapping(parsed.as_dict()) == parsed
    with pytest.raises(ValueError, match=r"Domain row 3 \('r1/gaussian_noise'\) lacks the keys \['acc5'\]"):
        DomainRow.from_mapping({k: v for k, v in RESULT_ROWS[0].items() if k != "acc5"}, 3)


def test_run_summary_matches_summarize() -> None:
    summary = RunSummary.from_rows(RESULT_ROWS, RUN_INFO)
    assert summary.as_dict() == summarize(RESULT_ROWS, RUN_INFO)
    assert summary.extras == {"seed": 7}
    assert RunSummary.from_rows([DomainRow.from_mapping(r) for r in RESULT_ROWS], RUN_INFO) == summary


def test_summarize_unweighted_mean_and_extras(caplog: pytest.LogCaptureFixture) -> None:
    rows = [dict(r) for r in RESULT_ROWS]
    rows[0]["acc1"] = torch.tensor(50.0)
    with caplog.at_level(logging.WARNING, logger="zoa_lightning.reporting"):
        summary = summarize(rows, {**RUN_INFO, "domains": 99, "lr": 1e-3})
    assert summary["mean_acc1"] == pytest.approx(55.0)
    assert summary["domains"] == 4
    assert summary["lr"] == 1e-3
    assert summary["seconds"] == pytest.approx(2.0)  # no measurement given: sum of the rows
    assert summary["peak_memory_mb"] is None
    assert "'domains'" in caplog.text


def test_write_results_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No domain rows"):
        write_results([], RUN_INFO, tmp_path)
    bad = {k: v for k, v in RESULT_ROWS[0].items() if k != "acc5"}
    with pytest.raises(ValueError, match=r"lacks the keys \['acc5'\]"):
        write_results([bad], RUN_INFO, tmp_path)
    with pytest.raises(ValueError, match=r"\['bits'\]"):
        write_results(RESULT_ROWS, {"method": "m", "model": "x"}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_write_results_files(tmp_path: Path) -> None:
    paths = write_results(RESULT_ROWS, {**RUN_INFO, "seconds": 4.0}, tmp_path, prefix="zoa_")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoa_accuracy.png", "zoa_results.csv", "zoa_results.json"]
    data = json.loads(paths["json"].read_text())
    assert data["domains"] == RESULT_ROWS
    assert data["summary"]["seconds_per_batch"] == 0.25
    with paths["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == (*ROW_COLUMNS, *RUN_COLUMNS)
        assert {r["method"] for r in reader} == {"zoa"}
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)
    write_results(RESULT_ROWS, RUN_INFO, tmp_path, prefix="zoa_", plot=False)
    assert not (tmp_path / "zoa_accuracy.png").exists(), "an older run's plot must not pass for this run's"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_result_files_get_the_umasks_permissions_like_ordinary_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        paths = write_results(RESULT_ROWS, RUN_INFO, tmp_path)
        comparison = write_comparison(
            [summarize(RESULT_ROWS, RUN_INFO)], {"zoa": RESULT_ROWS}, tmp_path / "cmp", Console(file=io.StringIO())
        )
    finally:
        os.umask(old)
    written = [*paths.values(), *comparison.values()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {oct(0o644)}  # not tempfile's owner-only 0o600
    assert not list(tmp_path.rglob("*.tmp"))


def test_plot_accuracy_two_methods(tmp_path: Path) -> None:
    backend = matplotlib.rcParams["backend"]
    corruptions = ("gaussian_noise", "shot_noise", "fog")
    stream = [(i, 1 + i // 3, c) for i, c in enumerate(corruptions * 3)]
    by_method = {
        "zoa": [domain_row(i, r, c, 50.0 + i, 80.0, 100) for i, r, c in stream],
        "no_adapt": [domain_row(i, r, c, 40.0, 70.0, 100) for i, r, c in stream[:5]],
    }
    path = plot_accuracy(by_method, tmp_path / "cmp.png", "ViT W4A4")
    assert path == tmp_path / "cmp.png"
    png = path.read_bytes()
    assert len(png) > 1000
    assert png.startswith(PNG_MAGIC)
    assert matplotlib.rcParams["backend"] == backend
    with pytest.raises(ValueError, match="No domain rows"):
        plot_accuracy({"zoa": []}, tmp_path / "empty.png")


def test_result_files_round_float_noise(tmp_path: Path) -> None:
    # Regression: the CSV carried float32 noise such as 89.60000276565552.
    rows = [{**RESULT_ROWS[0], "acc1": 89.60000276565552, "acc5": 99.90000128746033, "seconds": 1.23456789}]
    paths = write_results(rows, RUN_INFO, tmp_path, plot=False)
    text = paths["csv"].read_text()
    for expected in ("89.6,", "99.9,", "1.234568,"):
        assert expected in text
    assert "89.60000276565552" not in text
    assert json.loads(paths["json"].read_text())["domains"][0]["acc1"] == 89.6


def test_rows_written_before_skipped_batches_existed_still_load(tmp_path: Path) -> None:
    old = [{k: v for k, v in r.items() if k != "skipped_batches"} for r in RESULT_ROWS]
    assert summarize(old, RUN_INFO)["skipped_batches"] == 0
    plot_accuracy({"zoa": old}, tmp_path / "old.png")


def test_results_table_shows_rolled_back_batches_only_when_there_are_some() -> None:
    def render(rows: list[dict[str, Any]]) -> str:
        console = Console(record=True, width=120)
        console.print(results_table(rows, RUN_INFO))
        return console.export_text()

    plain = render(RESULT_ROWS)
    assert "r2/fog" in plain
    assert "55.00" in plain
    assert "skipped" not in plain
    rolled = render([{**r, "skipped_batches": 2 if i == 1 else 0} for i, r in enumerate(RESULT_ROWS)])
    assert "skipped" in rolled
    assert "2 batch(es) rolled back" in rolled


def test_write_comparison(tmp_path: Path) -> None:
    zoa = summarize(RESULT_ROWS, {**RUN_INFO, "seconds": 1.6, "peak_memory_mb": 456.7})
    base = summarize(RESULT_ROWS[:2], {**RUN_INFO, "method": "no_adapt", "seconds": 0.4, "peak_memory_mb": 400.0})
    console = Console(record=True, width=120)
    paths = write_comparison([zoa, base], {"zoa": RESULT_ROWS, "no_adapt": RESULT_ROWS[:2]}, tmp_path / "cmp", console)
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == sorted(COMPARISON_FILES)
    assert paths["md"].read_text().splitlines() == [
        "| method | mean top-1 % | mean top-5 % | passes/batch | s/batch | peak MB | bits |",
        "|---|---:|---:|---:|---:|---:|---|",
        "| zoa | 55.00 | 81.25 | 3.0 | 0.100 | 457 | W8A8 |",
        "| no_adapt | 45.00 | 75.00 | 3.0 | 0.050 | 400 | W8A8 |",
    ]
    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zoa", "no_adapt"]
    assert list(rows[0]) == list(COMPARISON_COLUMNS)
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)
    assert "zoa compare · test_vit · W8A8" in console.export_text()
    with pytest.raises(ValueError, match="No run summaries"):
        write_comparison([], {}, tmp_path)


def test_a_missing_measurement_reads_n_a() -> None:
    summary = {**summarize(RESULT_ROWS, RUN_INFO), "peak_memory_mb": None}
    console = Console(record=True, width=120)
    console.print(reporting.comparison_table([summary]))
    assert "n/a" in console.export_text()


def test_reporting_imports_no_lightning() -> None:
    for path in Path(reporting.__file__).parent.glob("*.py"):  # every module of the package
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {n for n in imported if n.split(".")[0] in ("lightning", "pytorch_lightning", "torch")}, path
